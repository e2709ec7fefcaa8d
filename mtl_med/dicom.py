"""DICOM in and out for the pelvis inference: an MR series read through MONAI's ITK reader, and the outputs
written back as a CT series (synthetic CT), a DICOM SEG and an RT Structure Set that reference it.

Reading (pydicom headers first, then ``LoadImage(reader="ITKReader")``) and the series writers (pydicom) need
only the package's own dependencies; SEG and RTSTRUCT need the ``dicom`` extra (``pip install mtl_med[dicom]``:
highdicom, contourpy).

    folders = series_folders("in/")                  # one series folder, or a folder of series folders
    mr = load_series(folders[0])                     # channel-first MetaTensor, RAS+ affine from the headers
    src = read_headers(folders[0])                   # the slices' datasets, in the volume's slice order
    write_mr_series(mr_array, affine, "phantom_dicom/case")  # a NIfTI phantom as an MR series, to try it
    write_ct_series(hu, src, "out/case_sct_dicom")  # hu: (i, j, k) on the series' own grid
    write_seg(labels, src, "out/case_seg.dcm"); write_rtstruct(labels, src, "out/case_rtstruct.dcm")

Every output is marked research use only (series description, image comments, derivation description): a
synthetic CT and automatic contours from this package are not a clinical device.

Every output names what made it (``provenance``: a :class:`~mtl_med.provenance.ModelIdentity`, the package
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtl_med.errors import InputError
from mtl_med.pelvis import LABEL_TABLE

__all__ = [
    "RESEARCH_ONLY",
    "SeriesHeaders",
    "is_series_folder",
    "series_folders",
    "read_headers",
    "load_series",
    "write_mr_series",
    "write_ct_series",
    "write_seg",
    "write_rtstruct",
]

RESEARCH_ONLY = "RESEARCH USE ONLY - NOT FOR CLINICAL USE"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
DICOMDIR = "1.2.840.10008.1.3.10"
CT_INTERCEPT = -1024  # stored value 0 is -1024 HU, the bottom of the CT range (A.3)
MANUFACTURER = "mtl_med"
BODY_PART = "PELVIS"  # Body Part Examined of outputs whose source names none: what the network is trained on
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
PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF

logger = logging.getLogger(__name__)


def _is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _dicom_files(folder: Path) -> list[Path]:
    """The DICOM files of a series folder. Anything else beside them (README.txt, .DS_Store, Thumbs.db, a
    spreadsheet) is left out with one warning naming it, so a user who put a slice there under a wrong format
    sees why it was not read."""
    files, others = [], []
    for p in sorted(folder.iterdir()):
        if p.is_file():
            (files if not p.name.startswith(".") and _is_dicom_file(p) else others).append(p)
    if others:
        logger.warning("%s: ignoring %d file(s) that are not DICOM: %s", folder, len(others),
                       ", ".join(p.name for p in others))
    return files


def _read_slice_header(path: Path) -> Any:
    """The header of one DICOM file (no pixel data), once :func:`_truncation` finds the file whole.

    Raises:
        InputError: naming the file when pydicom cannot parse it or it is cut short."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        problem = None if _is_dicomdir(ds) else _truncation(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError, KeyError, TypeError) as err:
        raise InputError(path, f"unreadable or truncated DICOM file ({type(err).__name__}: {err})") from err
    if problem:
        raise InputError(path, problem)
    return ds


def _is_dicomdir(ds: Any) -> bool:
    return str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")) == DICOMDIR


def _truncation(path: Path) -> str | None:
    """Why ``path`` looks cut short (an interrupted copy or download), or None. pydicom reads such a file
    without an error, as a shorter header or shorter pixel data, and ITK then fails later with a grid or series
    message that names no file: so the Pixel Data element must be present and end within the file. Only its
    position and length are read (``defer_size=0``), not the pixels; encapsulated (compressed) pixel data, of
    undefined length, is read through to its delimiter, which pydicom reports missing with an EOFError."""
    import pydicom

    size = path.stat().st_size
    raw = pydicom.dcmread(path, specific_tags=[PIXEL_DATA], defer_size=0).get_item(PIXEL_DATA, keep_deferred=True)
    if raw is None:
        return f"truncated or not an image: no complete Pixel Data in its {size} bytes (a file cut short by a copy?)"
    if raw.length != UNDEFINED_LENGTH and raw.value_tell + raw.length > size:
        return (f"truncated: its Pixel Data needs {raw.length} bytes from byte {raw.value_tell}, the file ends at "
                f"byte {size} (a file cut short by a copy?)")
    return None


def is_series_folder(path: str | os.PathLike) -> bool:
    """A folder that holds DICOM files itself (not only in subfolders)."""
    p = Path(path)
    return p.is_dir() and any(_is_dicom_file(f) for f in p.iterdir() if f.is_file())


def series_folders(root: str | os.PathLike) -> list[Path]:
    """``root`` when it holds DICOM files, else its subfolders that do (a folder of series folders)."""
    root = Path(root)
    if is_series_folder(root):
        return [root]
    return [p for p in sorted(root.iterdir()) if p.is_dir() and is_series_folder(p)] if root.is_dir() else []


# ----------------------------------------------------------------------------------------------- reading
@dataclass
class SeriesHeaders:
    """The headers of one checked series. ``datasets[k]`` is slice ``k`` of the volume (ascending along the
    slice normal, as ITK orders them); ``affine_lps`` maps (column i, row j, slice k) to patient LPS mm."""

    folder: Path
    files: list[Path]
    datasets: list[Any]
    affine_lps: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        ds = self.datasets[0]
        return int(ds.Columns), int(ds.Rows), len(self.datasets)

    @property
    def affine_ras(self) -> np.ndarray:
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps


def read_headers(folder: str | os.PathLike, *, role: str = "mr", modality: str | None = "MR") -> SeriesHeaders:
    """Read and check the headers of one series folder (pydicom, no pixel data).

    Raises:
        InputError: naming the folder (or file) for an empty folder, an unreadable or truncated file, more than
            one series (mixed), a modality other than ``modality``, multi-frame files, slices of different size, spacing or
            orientation, two slices at one position, slices not stacked along their normal, and a gap in the
            slice positions (incomplete series).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, f"{role} DICOM series folder does not exist")
    files, dss = [], []
    for f in _dicom_files(folder):
        ds = _read_slice_header(f)
        if _is_dicomdir(ds):
            continue
        files.append(f)
        dss.append(ds)
    if not dss:
        raise InputError(folder, f"no DICOM files in the {role} series folder")
    from mtl_med.data.nifti import check_series_size

    check_series_size(folder, dss)  # rows x columns x files within limits before ITK allocates the volume
    uids = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in dss}
    if len(uids) > 1:
        descs = sorted({f"{getattr(ds, 'Modality', '?')}:{getattr(ds, 'SeriesDescription', '')!r}" for ds in dss})
        raise InputError(folder, f"mixed series: {len(uids)} SeriesInstanceUIDs in one folder ({', '.join(descs)}); "
                                 "put each series in a folder of its own")
    mods = {str(getattr(ds, "Modality", "")) for ds in dss}
    if modality is not None and mods != {modality}:
        raise InputError(folder, f"{role} series has modality {'/'.join(sorted(mods))}, expected {modality}")
    for f, ds in zip(files, dss):
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
                   if getattr(ds, k, None) in (None, "")]
        if missing:
            raise InputError(f, f"not a slice of a 3D series: no {', '.join(missing)}")
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise InputError(f, "multi-frame (enhanced) DICOM is not supported: give one file per slice")
    if len(dss) < 2:
        raise InputError(folder, f"incomplete series: {len(dss)} slice; a 3D volume needs at least two")

    def first_other(values, what):
        ref = values[0]
        for f, v in zip(files, values):
            if not np.allclose(v, ref, atol=1e-4):
                raise InputError(folder, f"mixed series: {f.name} has {what} {np.round(v, 4).tolist()}, "
                                         f"{files[0].name} has {np.round(ref, 4).tolist()}")

    iop = [np.asarray(ds.ImageOrientationPatient, float) for ds in dss]
    first_other(iop, "ImageOrientationPatient")
    first_other([np.asarray(ds.PixelSpacing, float) for ds in dss], "PixelSpacing")
    first_other([np.asarray([ds.Rows, ds.Columns], float) for ds in dss], "Rows x Columns")
    row_dir, col_dir = iop[0][:3], iop[0][3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1) > 1e-3:
        raise InputError(files[0], f"ImageOrientationPatient {iop[0].tolist()} is not two orthogonal unit vectors")
    ipp = np.asarray([np.asarray(ds.ImagePositionPatient, float) for ds in dss])
    dist = ipp @ normal
    order = np.argsort(dist, kind="stable")
    files, dss, ipp, dist = [files[i] for i in order], [dss[i] for i in order], ipp[order], dist[order]
    steps = np.diff(dist)
    if steps.min() < 1e-3:
        i = int(steps.argmin())
        raise InputError(folder, f"mixed or duplicated series: {files[i].name} and {files[i + 1].name} are at the "
                                 f"same position ({dist[i]:.2f} mm along the slice normal)")
    in_plane = ipp - dist[:, None] * normal
    off = np.abs(in_plane - in_plane[0]).max()
    if off > 1e-2 * float(np.min(dss[0].PixelSpacing)) + 1e-3:
        raise InputError(folder, f"slices are not stacked along their normal (in-plane offset {off:.3g} mm): a "
                                 "tilted-gantry or mixed series")
    spacing = float(np.median(steps))
    bad = np.abs(steps - spacing) > 1e-2 * spacing + 1e-3
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(folder, f"incomplete series: {steps[i]:.3g} mm between {files[i].name} and "
                                 f"{files[i + 1].name}, {spacing:.3g} mm elsewhere (a slice missing?); "
                                 f"{len(files)} slices")
    ps = np.asarray(dss[0].PixelSpacing, float)  # (between rows, between columns)
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 2] = row_dir * ps[1], col_dir * ps[0], normal * spacing
    aff[:3, 3] = ipp[0]
    return SeriesHeaders(folder, files, dss, aff)


def load_series(folder: str | os.PathLike, *, role: str = "mr", modality: str | None = "MR",
                headers: SeriesHeaders | None = None) -> Any:
    """One DICOM series as a channel-first float32 MetaTensor with its RAS+ affine (``space`` RAS), read by
    MONAI's ``ITKReader`` after :func:`read_headers` has checked the series; the affine read by ITK must agree
    with the one the headers give (ImagePositionPatient of every slice, ImageOrientationPatient, spacing)."""
    from monai.transforms import LoadImage

    from mtl_med.transforms.io import as_metatensor

    folder = Path(folder)
    hdr = headers if headers is not None else read_headers(folder, role=role, modality=modality)
    try:
        img = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(folder))
    except Exception as err:  # ITK's errors come wrapped in MONAI's RuntimeError
        raise InputError(folder, f"cannot read the {role} series with ITK ({type(err).__name__}: {err})") from err
    img.meta["filename_or_obj"] = str(folder)
    mt = as_metatensor(img, name=str(folder))
    got = np.asarray(mt.affine, float)
    if tuple(mt.shape[1:]) != hdr.shape or np.abs(got - hdr.affine_ras).max() > 1e-3 * max(1.0, np.abs(got).max()):
        raise InputError(folder, f"ITK read a {tuple(mt.shape[1:])} grid with affine {np.round(got, 3).tolist()}, "
                                 f"the headers give {hdr.shape} and {np.round(hdr.affine_ras, 3).tolist()}")
    return mt


# ----------------------------------------------------------------------------------------------- writing
def write_mr_series(volume: np.ndarray, affine_ras: np.ndarray, out_dir: str | os.PathLike, *,
                    description: str = "Phantom T2", patient_id: str = "PHANTOM") -> list[Path]:
    """A volume (i, j, k array, RAS+ ``affine_ras`` as in NIfTI) as an MR series of a made-up patient, one
    int16 file per slice k (column i, row j): phantoms in DICOM, to try the DICOM path without patient data."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    mr_storage = "1.2.840.10008.5.1.4.1.1.4"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine_ras, float)
    vol = np.clip(np.rint(np.asarray(volume, float)), -32768, 32767).astype(np.int16)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    date, time = _now()
    paths = []
    for k in range(vol.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = mr_storage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = mr_storage, meta.MediaStorageSOPInstanceUID, "MR"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = f"{patient_id}^", patient_id, "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = date, time, "1", "", ""
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = description, 1, k + 1
        ds.PatientPosition, ds.PositionReferenceIndicator, ds.BodyPartExamined = "HFS", "", BODY_PART
        ds.Manufacturer, ds.ImageType = MANUFACTURER, ["DERIVED", "SECONDARY", "OTHER"]
        # a made-up acquisition: research mode, the timing attributes (type 2) empty
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "RM", "NONE", "", "2D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "", "", ""
        _set_plane(ds, lps, k)
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(vol[:, :, k].T).tobytes()
        path = out_dir / f"MR_{k + 1:04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def _now() -> tuple[str, str]:
    t = datetime.datetime.now()
    return t.strftime("%Y%m%d"), t.strftime("%H%M%S")


def _ds(value: float) -> Any:
    """A DS (decimal string) value of at most 16 characters, the VR's limit: a float's own digits often need
    more (1.459999882257047), which strict readers and validators refuse. Rounded to what 16 characters hold,
    far below a micrometre for positions and spacings."""
    from pydicom.valuerep import DSfloat

    return DSfloat(float(value), auto_format=True)


def _set_plane(ds: Any, affine_lps: np.ndarray, k: int) -> None:
    """The Image Plane module of slice ``k`` of a grid whose LPS affine maps (column i, row j, slice k) to mm:
    position, orientation (row and column cosines), pixel spacing (between rows, between columns), slice
    thickness (the slice spacing) and slice location (position along the slice normal)."""
    sp = np.linalg.norm(affine_lps[:3, :3], axis=0)
    position = affine_lps[:3, :3] @ [0, 0, k] + affine_lps[:3, 3]
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in (*(affine_lps[:3, 0] / sp[0]), *(affine_lps[:3, 1] / sp[1]))]
    ds.PixelSpacing = [_ds(sp[1]), _ds(sp[0])]
    ds.SliceThickness = _ds(sp[2])
    ds.SliceLocation = _ds(position @ (affine_lps[:3, 2] / sp[2]))


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


def _identity(provenance: Any) -> Any:
    from mtl_med.provenance import package_identity

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
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

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
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        _copy_source(ds, mr)
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
              label_table: Mapping[int, str] = LABEL_TABLE, series_number: int | None = None, provenance: Any = None) -> Path:
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
                   label_table: Mapping[int, str] = LABEL_TABLE, series_number: int | None = None,
                   provenance: Any = None) -> Path:
    """The label map as an RT Structure Set: one ROI per organ of ``label_table``, closed planar contours per
    slice in patient coordinates, each referencing its MR slice.

    Written with pydicom: highdicom has no RT Structure Set writer, and rt-utils traces contours through the
    boundary voxels' centres with the GUI build of OpenCV (needs libGL on a server). Contours here are
    the 0.5 level between voxel centres (contourpy, which matplotlib already installs), so even-odd filling
    of the voxel centres gives back exactly the label map."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from mtl_med import __version__

    frames = _label_slices(labels, src)
    ident = _identity(provenance)
    first = src.datasets[0]
    date, time = _now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_STORAGE, meta.MediaStorageSOPInstanceUID
    _copy_source(ds, first)  # the Frame of Reference module too: planning systems and validators expect it
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
