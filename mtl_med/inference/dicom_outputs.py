"""The pelvis predictor's DICOM outputs for a DICOM MR series input (read by :mod:`mtl_med.data.dicom`): the
synthetic CT as a CT series, the organs as a DICOM SEG and an RT Structure Set, all in the source's study and
frame of reference. The CT series needs only pydicom; SEG and RTSTRUCT need the ``dicom`` extra
(``pip install mtl_med[dicom]``: highdicom, contourpy).

    src = read_headers(series_folder)                # mtl_med.data.dicom
    write_ct_series(hu, src, "out/case_sct_dicom")  # hu: (i, j, k) on the series' own grid
    write_seg(labels, src, "out/case_seg.dcm", label_table=table)   # table: label -> organ name
    write_rtstruct(labels, src, "out/case_rtstruct.dcm", label_table=table)

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

from mtl_med.data.dicom import BODY_PART, MANUFACTURER, SeriesHeaders, _now, _set_plane
from mtl_med.errors import InputError

__all__ = ["RESEARCH_ONLY", "write_ct_series", "write_seg", "write_rtstruct"]

RESEARCH_ONLY = "RESEARCH USE ONLY - NOT FOR CLINICAL USE"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
CT_INTERCEPT = -1024  # stored value 0 is -1024 HU, the bottom of the CT range (A.3)
MODEL_NAME = "SFG-HighResNet pelvis sCT and organs"
# display colours (RTSTRUCT) and SNOMED CT codes (SEG) of the label table's organs
ORGAN_COLOURS = {1: (255, 220, 0), 2: (0, 200, 255), 3: (0, 200, 0), 4: (255, 255, 0), 5: (180, 90, 40)}
# (the segment label says left / right: SNOMED CT has one concept for both femoral heads)
ORGAN_CODES = {1: ("2812003", "Femoral head"), 2: ("2812003", "Femoral head"), 3: ("41216001", "Prostate"),
               4: ("89837001", "Bladder"), 5: ("34402009", "Rectum")}
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


def _contributing_equipment(ident: Any, what: str) -> Any:
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
    eq.ContributionDescription = (f"{what} by {MODEL_NAME} ({ident.model}, mtl_med {ident.package_version}, "
                                  f"{_weights(ident)}); {RESEARCH_ONLY}")
    eq.PurposeOfReferenceCodeSequence = [code]
    return eq


def _copy_body_part(ds: Any, src: Any) -> None:
    """Body Part Examined and Laterality (General Series). Laterality (type 2C) belongs to a paired body part
    only, and validators judge it by Body Part Examined: so both are copied as the source states them, and a
    source that names no body part is the pelvis, which has no laterality (empty would mean "unknown")."""
    if getattr(src, "BodyPartExamined", ""):
        ds.BodyPartExamined = src.BodyPartExamined
        if "Laterality" in src:
            ds.Laterality = src.Laterality
    else:
        ds.BodyPartExamined = BODY_PART
        if getattr(src, "Laterality", ""):
            ds.Laterality = src.Laterality


def write_ct_series(hu: np.ndarray, src: SeriesHeaders, out_dir: str | os.PathLike, *, series_number: int | None = None,
                    description: str = "Synthetic CT from MR", provenance: Any = None) -> list[Path]:
    """The synthetic CT as a CT series, one file per slice of the source grid (same positions, orientation and
    spacing), stored as unsigned 16 bit with Rescale Slope 1 and Intercept -1024 (HU = stored - 1024; HU are
    rounded to integers), in the source's patient, study and frame of reference, each slice referencing its MR
    slice (Source Image Sequence). New Series and SOP Instance UIDs."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    from mtl_med import __version__

    hu = _check_grid(hu, src, "synthetic CT")
    ident = _identity(provenance)
    equipment = _contributing_equipment(ident, "Synthetic CT predicted from the MR series")
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
        ds.DerivationDescription = (f"Synthetic CT predicted by {MODEL_NAME} ({MANUFACTURER} {ident.package_version}, "
                                    f"{ident.model}, {_weights(ident)}); {RESEARCH_ONLY}")
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SeriesDate = ds.ContentDate = date
        ds.SeriesTime = ds.ContentTime = time
        ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = MANUFACTURER, MODEL_NAME, __version__
        ds.ContributingEquipmentSequence = [equipment]
        if "PatientPosition" in mr:
            ds.PatientPosition = mr.PatientPosition
        _copy_body_part(ds, mr)
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
              label_table: Mapping[int, str], series_number: int | None = None, provenance: Any = None) -> Path:
    """The label map as a binary DICOM SEG (highdicom), one segment per organ of ``label_table`` (SNOMED CT
    codes), frames referencing the source MR slices."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from mtl_med import __version__

    logging.getLogger("highdicom").setLevel(max(logging.getLogger("highdicom").level, logging.WARNING))  # a line per module
    frames = _label_slices(labels, src)
    organs = [lab for lab in sorted(label_table) if lab > 0]
    ident = _identity(provenance)
    params = {"mtl_med": ident.package_version, "model": ident.model, "weights_md5": ident.weights_md5 or "none"}
    algo = hd.AlgorithmIdentificationSequence(name=MODEL_NAME, version=f"{ident.model} (mtl_med {ident.package_version})"[:64],
                                              family=codes.cid7162.ArtificialIntelligence, parameters=params)
    descs = []
    for n, lab in enumerate(organs, start=1):
        value, meaning = ORGAN_CODES.get(lab, ("91723000", "Anatomical Structure"))
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
        manufacturer_model_name=MODEL_NAME, software_versions=__version__, device_serial_number=ident.weights_md5 or "none",
        series_description=f"Organs - {RESEARCH_ONLY}"[:64], content_label="ORGANS",
        content_description=RESEARCH_ONLY[:64], omit_empty_frames=False,
    )
    seg.ImageComments = f"{RESEARCH_ONLY}: automatic segmentation of MR series {first.SeriesInstanceUID}"
    seg.ContributingEquipmentSequence = [*seg.get("ContributingEquipmentSequence", []),
                                         _contributing_equipment(ident, "Organ segmentation predicted from the MR series")]
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
                   provenance: Any = None) -> Path:
    """The label map as an RT Structure Set: one ROI per organ of ``label_table``, closed planar contours per
    slice in patient coordinates, each referencing its MR slice.

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
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = MANUFACTURER, MODEL_NAME, __version__
    ds.ContributingEquipmentSequence = [_contributing_equipment(ident, "Organ contours predicted from the MR series")]
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
        roi.ROIGenerationDescription = f"{MODEL_NAME}; {RESEARCH_ONLY}"[:64]
        ds.StructureSetROISequence.append(roi)
        rc = Dataset()
        rc.ReferencedROINumber = n
        rc.ROIDisplayColor = list(ORGAN_COLOURS.get(lab, (255, 0, 0)))
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
