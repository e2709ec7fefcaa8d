"""Command line for the synthetic pelvis phantoms of :mod:`mtl_med.pelvis.phantoms`.

From the repository root::

    python -m data_prep.phantoms --out DIR --cases N --seed S [--preset small|medium|paper] [--varied] [--overwrite]

writes ``DIR/case_XXX/{mr,ct,label,bone,body,bias,tissue}.nii.gz`` and ``DIR/datalist.json``.
Same seed, same bytes. A non-empty ``DIR`` is refused unless ``--overwrite`` is given. ``--varied`` makes a
training cohort that covers what inference meets: each case also draws its body size (+-15 %), bias field, MR
and CT noise, orientation (oblique or not) and storage (RAS or LPS) (``mtl_med.pelvis.phantoms.VARIATION``);
an option given explicitly fixes that property for every case.

The generator itself (``generate_phantom``, ``write_phantom``, ``generate_dataset``, ``PRESETS``, ...) lives in
:mod:`mtl_med.pelvis.phantoms`; import it from there.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from data_prep.report import finish, refuse_existing_output
from mtl_med.pelvis.phantoms import DEFAULT_SPACING, PAPER_CT_SPACING, PAPER_MR_SPACING, PRESETS, generate_dataset

__all__ = ["build_parser", "main"]

logger = logging.getLogger("data_prep.phantoms")


def _triple(text: str) -> tuple[float, float, float]:
    parts = text.replace("x", ",").split(",")
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one or three numbers like 1.46 or 1.46,1.46,5; got {text!r}")
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or any(not math.isfinite(v) or v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected one or three positive numbers, got {text!r}")
    return vals


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.phantoms",
        description="Generate synthetic pelvis MR / CT / label phantoms and a datalist JSON.",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--cases", required=True, type=_positive_int, help="number of cases")
    p.add_argument("--seed", required=True, type=int, help="random seed (same seed, same files)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help="reference grid: small 48x48x16, medium 96x96x32, paper 288x288x62 (A.3)")
    p.add_argument("--shape", type=_positive_int, nargs=3, metavar=("X", "Y", "Z"), help="override the preset size")
    p.add_argument("--spacing", type=_triple, default=(DEFAULT_SPACING,) * 3, help="reference spacing in mm")
    p.add_argument("--mr-spacing", type=_triple, help="MR grid spacing, e.g. 1.46,1.46,5")
    p.add_argument("--ct-spacing", type=_triple, help="CT grid spacing, e.g. 0.98,0.98,1.5")
    p.add_argument("--acquired", action="store_true",
                   help="MR at 1.46x1.46x5 mm and CT at 0.98x0.98x1.5 mm as acquired in A.3")
    p.add_argument("--oblique", type=float, default=None, help="grid rotation in degrees (direction cosines); default 0")
    p.add_argument("--orientation", choices=("RAS", "LPS"), default=None, help="storage axes; default RAS")
    p.add_argument("--mr-noise", type=float, default=None, help="Rician sigma relative to the brightest tissue; default 0.02")
    p.add_argument("--ct-noise", type=float, default=None, help="CT noise sigma (HU); default 12")
    p.add_argument("--bias-strength", type=float, default=None, help="max |log bias| of the MR bias field; default 0.4")
    p.add_argument("--body-scale", type=float, default=None,
                   help="anatomy size relative to the preset's, in [0.5, 1.5]; default 1")
    p.add_argument("--varied", action="store_true",
                   help="vary body size (+-15%%), bias field, noise, orientation and storage per case (an option "
                        "given explicitly fixes that property); the datalist's \"variations\" records each case's")
    p.add_argument("--val-fraction", type=_fraction, default=0.2)
    p.add_argument("--test-fraction", type=_fraction, default=0.2)
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty output folder (files of the same name are replaced)")
    return p


_DEFAULTS = {"oblique_deg": 0.0, "orientation": "RAS", "mr_noise": 0.02, "ct_noise": 12.0, "bias_strength": 0.4,
             "body_scale": 1.0}


def _properties(args: argparse.Namespace) -> dict:
    """The phantom properties given on the command line; without --varied the others take their defaults."""
    given = {"oblique_deg": args.oblique, "orientation": args.orientation, "mr_noise": args.mr_noise,
             "ct_noise": args.ct_noise, "bias_strength": args.bias_strength, "body_scale": args.body_scale}
    given = {k: v for k, v in given.items() if v is not None}
    return given if args.varied else {**_DEFAULTS, **given}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.val_fraction + args.test_fraction >= 1:
        parser.error("--val-fraction + --test-fraction must be < 1")
    for name in ("mr_noise", "ct_noise", "bias_strength"):
        v = getattr(args, name)
        if v is not None and (v < 0 or not math.isfinite(v)):
            parser.error(f"--{name.replace('_', '-')} must be a finite number >= 0")
    if args.oblique is not None and not math.isfinite(args.oblique):
        parser.error("--oblique must be a finite number of degrees")
    if args.body_scale is not None and not (math.isfinite(args.body_scale) and 0.5 <= args.body_scale <= 1.5):
        parser.error("--body-scale must be in [0.5, 1.5]")
    if args.shape is not None and min(args.shape) < 4:
        parser.error("--shape sizes must be >= 4")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    refuse_existing_output(parser, args.out, args.overwrite, logger, "case")
    mr_sp, ct_sp = args.mr_spacing, args.ct_spacing
    if args.acquired:
        mr_sp, ct_sp = mr_sp or PAPER_MR_SPACING, ct_sp or PAPER_CT_SPACING
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        datalist, failed = generate_dataset(
            args.out, args.cases, args.seed, preset=args.preset, shape=args.shape,
            val_fraction=args.val_fraction, test_fraction=args.test_fraction, progress=not args.quiet,
            spacing=args.spacing, mr_spacing=mr_sp, ct_spacing=ct_sp, varied=args.varied, **_properties(args),
        )
    return finish(datalist, failed, args.out, "wrote", "case")


if __name__ == "__main__":
    sys.exit(main())
