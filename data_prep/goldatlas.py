"""Convert a local copy of the Gold Atlas male pelvis collection (Nyholm et al., Med Phys 2018) to NIfTI and a
datalist.

Each patient is a flat folder of DICOM files: MR T1 and T2 series, the CT, the CT deformably registered to the
MR, and an RTSTRUCT with per-observer and consensus contours. For every patient this tool

* reads the DICOM headers (pydicom) and groups the files by series;
* picks the T2 MR and the MR-registered CT by series description (regular expressions, options);
* reads both series with SimpleITK (slice order and geometry from GDCM);
* rasterises the consensus contours of our five organs onto the MR grid (even-odd polygon filling per
  slice) and maps them to the label table (1 left / 2 right femoral head, 3 prostate, 4 bladder, 5 rectum);
* writes ``OUT/<patient>/{mr,ct,label}.nii.gz`` atomically and ``OUT/datalist.json``.

    python -m data_prep.goldatlas --src /data/GoldAtlas --out DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from matplotlib.path import Path as PolyPath
from pydicom.errors import InvalidDicomError
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mtl_med.data.nifti import check_array, check_overlap
from mtl_med.errors import InputError
from mtl_med.io import atomic_write, atomic_write_json
from mtl_med.pelvis.phantoms import split_cases
from data_prep.report import finish, refuse_existing_output

__all__ = ["ROI_PATTERNS", "Series", "scan_folder", "pick_series", "match_rois", "rasterise_rtstruct",
           "convert_patient", "convert", "main"]

logger = logging.getLogger("data_prep.goldatlas")

# ROI name patterns (on the lower-cased name with punctuation as spaces) for each label of the table
ROI_PATTERNS: dict[int, str] = {
    1: r"(fem\w*.*\b(l|lt|left|sin)\b)|(\b(l|lt|left)\b.*fem)",
    2: r"(fem\w*.*\b(r|rt|right|dx|dex)\b)|(\b(r|rt|right)\b.*fem)",
    3: r"prostat",
    4: r"bladder|vesica|\bblad",
    5: r"rect",
}
CONSENSUS_PATTERN = r"consensus|staple|\bcons\b"
# painted in this order, later wins where contours overlap (the small prostate last)
PAINT_ORDER = (4, 5, 1, 2, 3)


@dataclass
class Series:
    uid: str
    modality: str
    description: str
    files: list[Path] = field(default_factory=list)


def scan_folder(folder: Path) -> dict[str, Series]:
    """Group the DICOM files of a flat folder by SeriesInstanceUID (non-DICOM files are skipped)."""
    series: dict[str, Series] = {}
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError):
            logger.debug("skipping non-DICOM file %s", f)
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", ""))
        if not uid:
            continue
        s = series.setdefault(uid, Series(uid, str(getattr(ds, "Modality", "")), str(getattr(ds, "SeriesDescription", ""))))
        s.files.append(f)
    return series


def pick_series(series: Mapping[str, Series], modality: str, pattern: str, folder: Path, what: str) -> Series:
    """The one series of ``modality`` whose description matches ``pattern``."""
    rx = re.compile(pattern, re.IGNORECASE)
    hits = [s for s in series.values() if s.modality == modality and rx.search(s.description)]
    if len(hits) != 1:
        have = sorted(f"{s.modality}:{s.description!r}" for s in series.values())
        raise InputError(folder, f"expected one {what} series ({modality}, description matching /{pattern}/), "
                                 f"found {len(hits)}; series present: {have}")
    return hits[0]


def read_series(folder: Path, s: Series) -> sitk.Image:
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), s.uid)
    if not names:
        names = [str(f) for f in s.files]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(names))
    try:
        img = reader.Execute()
    except RuntimeError as err:
        raise InputError(folder, f"cannot read {s.modality} series {s.description!r}: {err}") from err
    if img.GetDimension() != 3 or min(img.GetSize()) < 2:
        raise InputError(folder, f"{s.modality} series {s.description!r} is not a 3D volume (size {img.GetSize()})")
    return img


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", name.lower()).strip()


def match_rois(names: Sequence[str], path: Path, *, patterns: Mapping[int, str] = ROI_PATTERNS,
               consensus: str = CONSENSUS_PATTERN, explicit: Mapping[str, int] | None = None) -> dict[int, str]:
    """Label -> ROI name. ``explicit`` (ROI name -> label) wins; otherwise the ROI matching the label's pattern,
    preferring the consensus one when observers' contours are also present."""
    out: dict[int, str] = {}
    if explicit:
        for name, lab in explicit.items():
            if name not in names:
                raise InputError(path, f"ROI {name!r} not in the RTSTRUCT (ROIs: {list(names)})")
            out[int(lab)] = name
    cons = re.compile(consensus, re.IGNORECASE)
    for lab, pat in patterns.items():
        if lab in out:
            continue
        rx = re.compile(pat)
        cands = [n for n in names if rx.search(_norm(n))]
        if len(cands) > 1:
            cands = [n for n in cands if cons.search(n)] or cands
        if not cands:
            raise InputError(path, f"no ROI for label {lab} (pattern /{pat}/); ROIs: {list(names)}")
        if len(cands) > 1:
            raise InputError(path, f"ambiguous ROIs for label {lab}: {cands}; name one with --roi NAME=LABEL")
        out[lab] = cands[0]
    return out


def rasterise_rtstruct(rt_path: Path, ref: sitk.Image, roi_for_label: Mapping[int, str] | None = None,
                       **match_kwargs) -> np.ndarray:
    """Label array (SimpleITK order z, y, x) of the RTSTRUCT's contours on the grid of ``ref``."""
    ds = pydicom.dcmread(rt_path)
    if getattr(ds, "Modality", "") != "RTSTRUCT":
        raise InputError(rt_path, "not an RTSTRUCT")
    num_to_name = {int(r.ROINumber): str(r.ROIName) for r in getattr(ds, "StructureSetROISequence", [])}
    if roi_for_label is None:
        roi_for_label = match_rois(list(num_to_name.values()), rt_path, **match_kwargs)
    contours: dict[str, list[np.ndarray]] = {}
    for rc in getattr(ds, "ROIContourSequence", []):
        name = num_to_name.get(int(rc.ReferencedROINumber))
        for c in getattr(rc, "ContourSequence", []) or []:
            pts = np.asarray(c.ContourData, float).reshape(-1, 3)
            contours.setdefault(name, []).append(pts)
    size = ref.GetSize()
    direction = np.asarray(ref.GetDirection()).reshape(3, 3)
    to_index = np.linalg.inv(direction @ np.diag(ref.GetSpacing()))
    origin = np.asarray(ref.GetOrigin())
    jj, ii = np.mgrid[0:size[1], 0:size[0]]
    centres = np.stack([ii.ravel(), jj.ravel()], axis=1).astype(float)
    label = np.zeros(size[::-1], np.uint8)
    for lab in PAINT_ORDER:
        if lab not in roi_for_label:
            continue
        name = roi_for_label[lab]
        mask = np.zeros(size[::-1], bool)
        for pts in contours.get(name, []):
            idx = (to_index @ (pts - origin).T).T  # continuous (i, j, k)
            k = np.round(idx[:, 2])
            if np.ptp(idx[:, 2]) > 0.5 or not 0 <= k[0] < size[2]:
                raise InputError(rt_path, f"ROI {name!r}: a contour is not on an MR slice (slice index "
                                          f"{idx[:, 2].min():.2f}..{idx[:, 2].max():.2f})")
            inside = PolyPath(idx[:, :2]).contains_points(centres).reshape(size[1], size[0])
            mask[int(k[0])] ^= inside  # even-odd: inner contours are holes
        if not mask.any():
            raise InputError(rt_path, f"ROI {name!r} (label {lab}) has no voxels on the MR grid")
        label[mask] = lab
    return label


def _write(img: sitk.Image, path: Path) -> None:
    with atomic_write(path) as tmp:
        sitk.WriteImage(img, str(tmp), True)


def convert_patient(folder: Path, out_dir: Path, *, mr_pattern: str = r"t2", ct_pattern: str = r"deform|regist|to mr",
                    roi_map: Mapping[str, int] | None = None, min_overlap: float = 0.5) -> dict[str, str]:
    """Convert one patient folder; every check runs before anything is written. Returns the datalist item."""
    if not folder.is_dir():
        raise InputError(folder, "patient folder does not exist")
    series = scan_folder(folder)
    if not series:
        raise InputError(folder, "no DICOM files found")
    mr_s = pick_series(series, "MR", mr_pattern, folder, "T2 MR")
    ct_s = pick_series(series, "CT", ct_pattern, folder, "MR-registered CT")
    rts = [s for s in series.values() if s.modality == "RTSTRUCT"]
    if len(rts) != 1 or len(rts[0].files) != 1:
        raise InputError(folder, f"expected one RTSTRUCT file, found {sum(len(s.files) for s in rts)}")
    mr = sitk.Cast(read_series(folder, mr_s), sitk.sitkFloat32)
    ct = read_series(folder, ct_s)
    check_array(sitk.GetArrayViewFromImage(mr), f"{folder} (MR {mr_s.description!r})", role="mr")
    check_array(sitk.GetArrayViewFromImage(ct), f"{folder} (CT {ct_s.description!r})", role="ct")

    def geom(img):  # RAS affine of a SimpleITK (LPS) image, for the overlap check
        a = np.eye(4)
        a[:3, :3] = np.diag([-1, -1, 1]) @ np.asarray(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
        a[:3, 3] = np.diag([-1, -1, 1]) @ np.asarray(img.GetOrigin())
        return img.GetSize(), a

    check_overlap({"mr": (f"{folder} (MR {mr_s.description!r})", *geom(mr)),
                   "ct": (f"{folder} (CT {ct_s.description!r})", *geom(ct))}, min_overlap=min_overlap)
    rt_path = rts[0].files[0]
    roi_for_label = None
    if roi_map:
        ds = pydicom.dcmread(rt_path, stop_before_pixels=True)
        names = [str(r.ROIName) for r in getattr(ds, "StructureSetROISequence", [])]
        roi_for_label = match_rois(names, rt_path, explicit=roi_map)
    lab_arr = rasterise_rtstruct(rt_path, mr, roi_for_label)
    label = sitk.GetImageFromArray(lab_arr)
    label.CopyInformation(mr)
    case = out_dir / folder.name
    _write(mr, case / "mr.nii.gz")
    _write(ct, case / "ct.nii.gz")
    _write(label, case / "label.nii.gz")
    return {k: f"{folder.name}/{k}.nii.gz" for k in ("mr", "ct", "label")}


def convert(src, out, *, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2,
            progress: bool = True, **kwargs) -> tuple[dict, list[str]]:
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise InputError(src, "Gold Atlas source folder does not exist")
    patients = sorted(p for p in src.iterdir() if p.is_dir())
    if not patients:
        raise InputError(src, "no patient folders found")
    splits = split_cases(len(patients), seed, val_fraction, test_fraction)
    section_of = {i: s for s, idx in splits.items() for i in idx}
    datalist = {"name": "Gold Atlas male pelvis", "training": [], "validation": [], "test": []}
    failed = []
    with logging_redirect_tqdm():
        for i, pat in enumerate(tqdm(patients, desc="goldatlas", unit="patient", disable=not progress)):
            try:
                logger.info("converting %s", pat.name)
                datalist[section_of[i]].append(convert_patient(pat, out, **kwargs))
            except (InputError, OSError) as err:
                logger.error("%s", err)
                failed.append(pat.name)
    atomic_write_json(datalist, out / "datalist.json")
    return datalist, failed


def _roi_arg(text: str) -> tuple[str, int]:
    name, sep, lab = text.rpartition("=")
    if not sep or not name or not lab.isdigit() or not 1 <= int(lab) <= 5:
        raise argparse.ArgumentTypeError(f"expected ROI_NAME=LABEL with LABEL in 1..5, got {text!r}")
    return name, int(lab)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.goldatlas",
                                description="Gold Atlas male pelvis DICOM -> NIfTI (T2 MR, MR-registered CT, labels) "
                                            "+ datalist JSON.")
    p.add_argument("--src", required=True, type=Path, help="folder with one DICOM folder per patient")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--mr-pattern", default=r"t2", help="regex on the MR SeriesDescription (T2)")
    p.add_argument("--ct-pattern", default=r"deform|regist|to mr",
                   help="regex on the CT SeriesDescription (the CT registered to the MR)")
    p.add_argument("--roi", type=_roi_arg, action="append", default=[], metavar="NAME=LABEL",
                   help="use this RTSTRUCT ROI for a label (repeatable)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty output folder (files of the same name are replaced)")
    args = p.parse_args(argv)
    for pat in (args.mr_pattern, args.ct_pattern):
        try:
            re.compile(pat)
        except re.error as err:
            p.error(f"bad regular expression {pat!r}: {err}")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    refuse_existing_output(p, args.out, args.overwrite, logger, "patient")
    try:
        datalist, failed = convert(args.src, args.out, seed=args.seed, val_fraction=args.val_fraction,
                                   test_fraction=args.test_fraction, progress=not args.quiet,
                                   mr_pattern=args.mr_pattern, ct_pattern=args.ct_pattern,
                                   roi_map=dict(args.roi) or None)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return finish(datalist, failed, args.out, "converted", "patient")


if __name__ == "__main__":
    sys.exit(main())
