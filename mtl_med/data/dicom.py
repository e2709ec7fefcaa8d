"""DICOM series in: an MR (or CT) series folder read through MONAI's ITK reader after its headers are checked with
pydicom (one series, every slice readable and complete, a regular grid); and a volume written as an MR series of a
made-up patient, to try the DICOM path without patient data.

    folders = series_folders("in/")                  # one series folder, or a folder of series folders
    src = read_headers(folders[0])                   # the slices' datasets, in the volume's slice order
    mr = load_series(folders[0], headers=src)        # channel-first MetaTensor, RAS+ affine from the headers
    write_mr_series(mr_array, affine, "phantom_dicom/case")  # a NIfTI phantom as an MR series

The outputs written from a series (synthetic CT series, SEG, RTSTRUCT) are the predictor's:
:mod:`mtl_med.inference.dicom_outputs`.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtl_med.errors import InputError

__all__ = ["SeriesHeaders", "is_series_folder", "series_folders", "read_headers", "load_series", "write_mr_series"]

DICOMDIR = "1.2.840.10008.1.3.10"
MANUFACTURER = "mtl_med"
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

    from mtl_med.data.volumes import as_metatensor

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


def write_mr_series(volume: np.ndarray, affine_ras: np.ndarray, out_dir: str | os.PathLike, *,
                    description: str = "Phantom T2", patient_id: str = "PHANTOM",
                    body_part: str | None = None) -> list[Path]:
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
        ds.PatientPosition, ds.PositionReferenceIndicator = "HFS", ""
        if body_part:
            ds.BodyPartExamined = body_part
        else:  # no body part (type 3): Laterality (2C) empty, "unknown", since no validator can tell it is unpaired
            ds.Laterality = ""
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
