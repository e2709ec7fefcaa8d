"""Convert a local copy of SynthRAD2023 task 1 (pelvis) into the project's layout and datalist.

Input: ``SRC`` is ``.../Task1/pelvis`` or a folder containing ``Task1/pelvis``, with one folder per case holding
``mr.nii.gz``, ``ct.nii.gz`` and ``mask.nii.gz``. SynthRAD has no organ labels, so items are synthesis-only:
``{"mr", "ct", "body"}`` (the body mask is kept for masked metrics). Nothing is downloaded.

    python -m data_prep.synthrad --src /data/SynthRAD2023 --out DIR [--seed 0] [--link]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mtl_med.data.nifti import check_overlap, check_volume
from mtl_med.errors import InputError
from mtl_med.io import atomic_write, atomic_write_json
from mtl_med.pelvis.phantoms import split_cases
from data_prep.report import finish, refuse_existing_output

__all__ = ["find_cases", "convert_case", "convert", "main"]

logger = logging.getLogger("data_prep.synthrad")
FILES = {"mr": "mr.nii.gz", "ct": "ct.nii.gz", "body": "mask.nii.gz"}


def find_cases(src: str | os.PathLike) -> list[Path]:
    """Case folders under ``src`` (``Task1/pelvis`` is found if ``src`` is above it)."""
    src = Path(src)
    if not src.is_dir():
        raise InputError(src, "SynthRAD source folder does not exist")
    for cand in (src, src / "pelvis", src / "Task1" / "pelvis"):
        cases = sorted(p for p in cand.iterdir() if p.is_dir() and (p / "mr.nii.gz").exists()) if cand.is_dir() else []
        if cases:
            return cases
    raise InputError(src, "no SynthRAD pelvis cases found (expected Task1/pelvis/<case>/mr.nii.gz)")


def convert_case(case_dir: Path, out_dir: Path, *, link: bool = False, min_overlap: float = 0.5) -> dict[str, str]:
    """Check one case and copy (or symlink) its files to ``out_dir/<case>/``; returns the datalist item
    (paths relative to ``out_dir``). Raises ``InputError`` before writing anything when a file is bad."""
    missing = [f for f in FILES.values() if not (case_dir / f).is_file()]
    if missing:
        raise InputError(case_dir, f"missing file(s) {missing}")
    geoms = {}
    for role, fname in FILES.items():
        img = check_volume(case_dir / fname, role=role)
        geoms[role] = (case_dir / fname, img.shape, img.affine)
    check_overlap(geoms, min_overlap=min_overlap)
    item = {}
    for role, fname in FILES.items():
        dst = out_dir / case_dir.name / f"{role}.nii.gz"
        with atomic_write(dst) as tmp:
            if link:
                tmp.unlink()
                os.symlink(os.path.abspath(case_dir / fname), tmp)
            else:
                shutil.copyfile(case_dir / fname, tmp)
        item[role] = f"{case_dir.name}/{role}.nii.gz"
    return item


def convert(src, out, *, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2, link: bool = False,
            progress: bool = True) -> tuple[dict, list[str]]:
    """Convert every case; a bad case is logged and skipped. Returns (datalist, failed case names)."""
    cases = find_cases(src)
    out = Path(out)
    splits = split_cases(len(cases), seed, val_fraction, test_fraction)
    section_of = {i: s for s, idx in splits.items() for i in idx}
    datalist = {"name": "SynthRAD2023 task 1 pelvis (synthesis only)", "training": [], "validation": [], "test": []}
    failed = []
    with logging_redirect_tqdm():
        for i, case in enumerate(tqdm(cases, desc="synthrad", unit="case", disable=not progress)):
            try:
                logger.info("converting %s", case.name)
                datalist[section_of[i]].append(convert_case(case, out, link=link))
            except (InputError, OSError) as err:
                logger.error("%s", err)
                failed.append(case.name)
    atomic_write_json(datalist, out / "datalist.json")
    return datalist, failed


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.synthrad",
                                description="SynthRAD2023 task 1 pelvis -> NIfTI + datalist JSON (synthesis only).")
    p.add_argument("--src", required=True, type=Path, help="local SynthRAD2023 copy (Task1/pelvis or above)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--link", action="store_true", help="symlink the files instead of copying them")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty output folder (files of the same name are replaced)")
    args = p.parse_args(argv)
    if not (0 <= args.val_fraction < 1 and 0 <= args.test_fraction < 1 and args.val_fraction + args.test_fraction < 1):
        p.error("fractions must be in [0, 1) and sum to less than 1")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    refuse_existing_output(p, args.out, args.overwrite, logger, "case")
    try:
        datalist, failed = convert(args.src, args.out, seed=args.seed, val_fraction=args.val_fraction,
                                   test_fraction=args.test_fraction, link=args.link, progress=not args.quiet)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return finish(datalist, failed, args.out, "converted", "case")


if __name__ == "__main__":
    sys.exit(main())
