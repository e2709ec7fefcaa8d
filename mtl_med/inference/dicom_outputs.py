"""The predictor's DICOM outputs for a DICOM MR series input (read by :mod:`mtl_med.data.dicom`): the
synthetic CT as a CT series, the organs as a DICOM SEG and an RT Structure Set, all in the source's study and
frame of reference. The CT series needs only pydicom; SEG and RTSTRUCT need the ``dicom`` extra
(``pip install mtl_med[dicom]``: highdicom, contourpy).

    src = read_headers(series_folder)                # mtl_med.data.dicom
    write_ct_series(hu, src, "out/case_sct_dicom")  # hu: (i, j, k) on the series' own grid
    write_seg(labels, src, "out/case_seg.dcm", label_table=table)   # table: label -> organ name
    write_rtstruct(labels, src, "out/case_rtstruct.dcm", label_table=table)

What the outputs call the model (``model_name``), the organs' SNOMED CT codes in the SEG (``organ_codes``), their
display colours in the RTSTRUCT (``organ_colours``) and the CT's Body Part Examined where the MR names none
(``body_part``) are the application's, passed by the caller (the pelvis bundle passes ``mtl_med.pelvis.MODEL_NAME``,
``ORGAN_CODES``, ``ORGAN_COLOURS`` and ``BODY_PART``); without them every organ is an
"Anatomical Structure" drawn in :data:`DEFAULT_COLOUR`, made by :data:`DEFAULT_MODEL_NAME`.

Every output is marked research use only (series description, image comments, derivation description): a
synthetic CT and automatic contours from this package are not a clinical device.

Every output names what made it (``provenance``: a :class:`~mtl_med.inference.provenance.ModelIdentity`, the package
alone when none is given): a Contributing Equipment Sequence item (purpose DCM 109102 "Processing Equipment";
model name; Software Versions: the package, the model, the weights' MD5; the weights' MD5 as the Device Serial
Number), the CT series' Derivation Description and the SEG's Algorithm Identification (version, and the
weights' MD5 among its parameters) too.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mtl_med.data.dicom import MANUFACTURER, SeriesHeaders, _now, _set_plane
from mtl_med.errors import InputError

__all__ = ["RESEARCH_ONLY", "DEFAULT_MODEL_NAME", "write_ct_series", "write_seg", "write_rtstruct"]

RESEARCH_ONLY = "RESEARCH USE ONLY - NOT FOR CLINICAL USE"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
CT_INTERCEPT = -1024  # stored value 0 is -1024 HU, the bottom of the CT range (A.3)
# what the outputs name as the model that made them, when the caller names none
DEFAULT_MODEL_NAME = "mtl_med multi-task network"
# SNOMED CT code (SEG) and display colour (RTSTRUCT) of a label the caller gives none for
DEFAULT_CODE = ("91723000", "Anatomical Structure")
DEFAULT_COLOUR = (255, 0, 0)
# attributes copied from the source series so a planning system files the outputs with the MR; those of type 2
# in the Patient and General Study modules are written empty when the source lacks them
PATIENT_STUDY = ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                 "IssuerOfPatientID", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                 "StudyDescription", "ReferringPhysicianName")
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName")


def _check_grid(arr: np.ndarray, src: SeriesHeaders, what: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.shape != src.shape:
        raise ValueError(f"{what} has shape {arr.shape}, the source series {src.folder} has {src.shape}")
    if not getattr(src.datasets[0], "FrameOfReferenceUID", ""):
        raise InputError(src.files[0], "no FrameOfReferenceUID: DICOM outputs would have no frame of reference "
                                       "shared with the MR")
    return arr


def _copy_source(ds: Any, src: Any) -> None:
    """The Patient, General Study and Frame of Reference modules of the source slice ``src``."""
    for key in PATIENT_STUDY:
        if key in src:
            setattr(ds, key, getattr(src, key))
        elif key in TYPE_2:
            setattr(ds, key, "")
    ds.FrameOfReferenceUID = src.FrameOfReferenceUID
    ds.PositionReferenceIndicator = getattr(src, "PositionReferenceIndicator", "")


def _new_instance(sop_class: str, src: Any) -> Any:
    """A new instance of ``sop_class`` (file meta, SOP Common UIDs, Explicit VR Little Endian) in the patient,
    study and frame of reference of the source slice ``src``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    _copy_source(ds, src)
    return ds


def _identity(provenance: Any) -> Any:
    from mtl_med.inference.provenance import package_identity

    return provenance if provenance is not None else package_identity()


def _weights(ident: Any) -> str:
    return f"weights MD5 {ident.weights_md5}" if ident.weights_md5 else "weights not from a file"


def _contributing_equipment(ident: Any, what: str, model_name: str) -> Any:
    """One Contributing Equipment Sequence item (SOP Common module): this package as the processing equipment
    that made ``what`` from the source series, with the model and the weights' MD5."""
    from pydicom.dataset import Dataset

    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "109102", "DCM", "Processing Equipment"
    eq = Dataset()
    eq.Manufacturer = MANUFACTURER
    eq.ManufacturerModelName = ident.model[:64]
    eq.DeviceSerialNumber = ident.weights_md5 or "none"
    eq.SoftwareVersions = ident.software_versions()
    eq.ContributionDateTime = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
    eq.ContributionDescription = (f"{what} by {model_name} ({ident.model}, mtl_med {ident.package_version}, "
                                  f"{_weights(ident)}); {RESEARCH_ONLY}")
    eq.PurposeOfReferenceCodeSequence = [code]
    return eq


def _copy_body_part(ds: Any, src: Any, body_part: str | None) -> None:
    """Body Part Examined and Laterality (General Series). Laterality (type 2C) belongs to a paired body part
    only, and validators judge it by Body Part Examined: so both are copied as the source states them; a source
    that names no body part gets ``body_part`` (the application's: the pelvis bundle passes ``PELVIS``, which
    has no laterality); with neither, the body part stays absent (type 3) and Laterality is written empty
    ("unknown"), as the validators ask when they cannot tell whether the part is paired."""
    if getattr(src, "BodyPartExamined", ""):
        ds.BodyPartExamined = src.BodyPartExamined
        if "Laterality" in src:
            ds.Laterality = src.Laterality
    elif body_part:
        ds.BodyPartExamined = body_part
        if getattr(src, "Laterality", ""):
            ds.Laterality = src.Laterality
    else:
        ds.Laterality = getattr(src, "Laterality", "") or ""


def write_ct_series(hu: np.ndarray, src: SeriesHeaders, out_dir: str | os.PathLike, *, series_number: int | None = None,
                    description: str = "Synthetic CT from MR", provenance: Any = None,
                    model_name: str = DEFAULT_MODEL_NAME, body_part: str | None = None) -> list[Path]:
    """The synthetic CT as a CT series, one file per slice of the source grid (same positions, orientation and
    spacing), stored as unsigned 16 bit with Rescale Slope 1 and Intercept -1024 (HU = stored - 1024; HU are
    rounded to integers), in the source's patient, study and frame of reference, each slice referencing its MR
    slice (Source Image Sequence). New Series and SOP Instance UIDs. ``model_name``: the manufacturer's model
    name and the maker named in the derivation description; ``body_part``: Body Part Examined where the source
    names none."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    from mtl_med import __version__

    hu = _check_grid(hu, src, "synthetic CT")
    ident = _identity(provenance)
    equipment = _contributing_equipment(ident, "Synthetic CT predicted from the MR series", model_name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stored = np.clip(np.rint(hu) - CT_INTERCEPT, 0, np.iinfo(np.uint16).max).astype(np.uint16)
    series_uid = generate_uid()
    date, time = _now()
    first = src.datasets[0]
    number = series_number if series_number is not None else int(getattr(first, "SeriesNumber", 0) or 0) + 1000
    paths = []
    for k, mr in enumerate(src.datasets):
        ds = _new_instance(CT_IMAGE_STORAGE, mr)
        ds.Modality = "CT"
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series_uid, number, k + 1
        ds.SeriesDescription = f"{description} - {RESEARCH_ONLY}"[:64]
        ds.ImageComments = f"{RESEARCH_ONLY}: synthetic CT computed from MR series {mr.SeriesInstanceUID}"
        ds.DerivationDescription = (f"Synthetic CT predicted by {model_name} ({MANUFACTURER} {ident.package_version}, "
                                    f"{ident.model}, {_weights(ident)}); {RESEARCH_ONLY}")
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SeriesDate = ds.ContentDate = date
        ds.SeriesTime = ds.ContentTime = time
        ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = MANUFACTURER, model_name, __version__
        ds.ContributingEquipmentSequence = [equipment]
        if "PatientPosition" in mr:
            ds.PatientPosition = mr.PatientPosition
        _copy_body_part(ds, mr, body_part)
        ds.KVP = ""
        ds.AcquisitionNumber = ""
        _set_plane(ds, src.affine_lps, k)
        ds.Rows, ds.Columns = int(mr.Rows), int(mr.Columns)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = CT_INTERCEPT, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = mr.SOPClassUID, mr.SOPInstanceUID
        ds.SourceImageSequence = [ref]
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows are j, columns are i
        path = out_dir / f"CT_{k + 1:04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def _label_slices(labels: np.ndarray, src: SeriesHeaders) -> np.ndarray:
    """(k, rows, columns) label frames, frame k on ``src.datasets[k]``."""
    labels = _check_grid(labels, src, "label map")
    return np.ascontiguousarray(np.rint(labels).astype(np.uint8).transpose(2, 1, 0))


def write_seg(labels: np.ndarray, src: SeriesHeaders, path: str | os.PathLike, *,
              label_table: Mapping[int, str], series_number: int | None = None, provenance: Any = None,
              model_name: str = DEFAULT_MODEL_NAME,
              organ_codes: Mapping[int, tuple[str, str]] | None = None) -> Path:
    """The label map as a binary DICOM SEG (highdicom), one segment per organ of ``label_table``, frames
    referencing the source MR slices. ``organ_codes``: label -> SNOMED CT (code value, meaning) of its segment's
    property type (a label without one: :data:`DEFAULT_CODE`); ``model_name``: the algorithm's and the
    manufacturer's model name."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from mtl_med import __version__

    logging.getLogger("highdicom").setLevel(max(logging.getLogger("highdicom").level, logging.WARNING))  # a line per module
    frames = _label_slices(labels, src)
    organs = [lab for lab in sorted(label_table) if lab > 0]
    ident = _identity(provenance)
    params = {"mtl_med": ident.package_version, "model": ident.model, "weights_md5": ident.weights_md5 or "none"}
    algo = hd.AlgorithmIdentificationSequence(name=model_name, version=f"{ident.model} (mtl_med {ident.package_version})"[:64],
                                              family=codes.cid7162.ArtificialIntelligence, parameters=params)
    descs = []
    for n, lab in enumerate(organs, start=1):
        value, meaning = (organ_codes or {}).get(lab, DEFAULT_CODE)
        descs.append(hd.seg.SegmentDescription(
            segment_number=n, segment_label=label_table[lab][:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=hd.sr.CodedConcept(value, "SCT", meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo))
    # segment n is label organs[n - 1]
    remap = np.zeros(256, np.uint8)
    for n, lab in enumerate(organs, start=1):
        remap[lab] = n
    first = src.datasets[0]
    number = series_number if series_number is not None else int(getattr(first, "SeriesNumber", 0) or 0) + 2000
    seg = hd.seg.Segmentation(
        source_images=list(src.datasets), pixel_array=remap[frames], segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descs, series_instance_uid=generate_uid(), series_number=number,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=model_name, software_versions=__version__, device_serial_number=ident.weights_md5 or "none",
        series_description=f"Organs - {RESEARCH_ONLY}"[:64], content_label="ORGANS",
        content_description=RESEARCH_ONLY[:64], omit_empty_frames=False,
    )
    seg.ImageComments = f"{RESEARCH_ONLY}: automatic segmentation of MR series {first.SeriesInstanceUID}"
    seg.ContributingEquipmentSequence = [*seg.get("ContributingEquipmentSequence", []),
                                         _contributing_equipment(ident, "Organ segmentation predicted from the MR series",
                                                                 model_name)]
    path = Path(path)
    seg.save_as(path)
    return path


def _contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed polygons (column, row) of a 2D mask (rows, columns) at level 0.5 between voxel centres: every
    inside centre is inside an odd number of polygons, every outside centre in an even number."""
    import contourpy

    padded = np.pad(mask.astype(np.float64), 1)
    gen = contourpy.contour_generator(x=np.arange(-1, mask.shape[1] + 1), y=np.arange(-1, mask.shape[0] + 1), z=padded,
                                      line_type=contourpy.LineType.Separate)
    return [np.asarray(line[:-1]) if np.allclose(line[0], line[-1]) else np.asarray(line) for line in gen.lines(0.5)
            if len(line) >= 4]


def write_rtstruct(labels: np.ndarray, src: SeriesHeaders, path: str | os.PathLike, *,
                   label_table: Mapping[int, str], series_number: int | None = None,
                   provenance: Any = None, model_name: str = DEFAULT_MODEL_NAME,
                   organ_colours: Mapping[int, tuple[int, int, int]] | None = None) -> Path:
    """The label map as an RT Structure Set: one ROI per organ of ``label_table``, closed planar contours per
    slice in patient coordinates, each referencing its MR slice. ``organ_colours``: label -> ROI display colour
    (RGB; a label without one: :data:`DEFAULT_COLOUR`); ``model_name``: the manufacturer's model name.

    Written with pydicom: highdicom has no RT Structure Set writer, and rt-utils traces contours through the
    boundary voxels' centres with the GUI build of OpenCV (needs libGL on a server). Contours here are
    the 0.5 level between voxel centres (contourpy, which matplotlib already installs), so even-odd filling
    of the voxel centres gives back exactly the label map."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    from mtl_med import __version__

    frames = _label_slices(labels, src)
    ident = _identity(provenance)
    first = src.datasets[0]
    date, time = _now()
    ds = _new_instance(RTSTRUCT_STORAGE, first)  # the Frame of Reference module too: planning systems expect it
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number if series_number is not None else int(getattr(first, "SeriesNumber", 0) or 0) + 3000
    ds.InstanceNumber = 1
    ds.SeriesDescription = f"Organs - {RESEARCH_ONLY}"[:64]
    ds.StructureSetLabel = "mtl_med organs"
    ds.StructureSetName = "RESEARCH USE ONLY"
    ds.StructureSetDescription = f"{RESEARCH_ONLY}: automatic contours of MR series {first.SeriesInstanceUID}"
    ds.StructureSetDate = ds.SeriesDate = date
    ds.StructureSetTime = ds.SeriesTime = time
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = MANUFACTURER, model_name, __version__
    ds.ContributingEquipmentSequence = [_contributing_equipment(ident, "Organ contours predicted from the MR series",
                                                                model_name)]
    ds.OperatorsName = ""
    ds.ApprovalStatus = "UNAPPROVED"

    def image_ref(mr):
        r = Dataset()
        r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = mr.SOPClassUID, mr.SOPInstanceUID
        return r

    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = [image_ref(mr) for mr in src.datasets]
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Study Component Management, as planning systems write
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    aff = src.affine_lps
    for n, lab in enumerate([lab for lab in sorted(label_table) if lab > 0], start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID = n, first.FrameOfReferenceUID
        roi.ROIName, roi.ROIGenerationAlgorithm = label_table[lab], "AUTOMATIC"
        roi.ROIGenerationDescription = f"{model_name}; {RESEARCH_ONLY}"[:64]
        ds.StructureSetROISequence.append(roi)
        rc = Dataset()
        rc.ReferencedROINumber = n
        rc.ROIDisplayColor = list((organ_colours or {}).get(lab, DEFAULT_COLOUR))
        contours = []
        for k, mr in enumerate(src.datasets):
            if not (frames[k] == lab).any():
                continue
            for line in _contours(frames[k] == lab):
                ijk = np.c_[line, np.full(len(line), k), np.ones(len(line))]
                c = Dataset()
                c.ContourImageSequence = [image_ref(mr)]
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(line)
                c.ContourData = [round(float(v), 4) for v in (ijk @ aff.T)[:, :3].ravel()]
                contours.append(c)
        if contours:
            rc.ContourSequence = contours
        ds.ROIContourSequence.append(rc)
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber = n, n
        obs.RTROIInterpretedType, obs.ROIInterpreter = "ORGAN", ""
        ds.RTROIObservationsSequence.append(obs)
    path = Path(path)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path
