"""Command line: learn histogram-standardisation landmarks (A.3, ref. [40]) from the training section of a datalist.

Each training MR is loaded with the project's checks, N4-corrected as in training (same parameters, same
cache), and its 1st / decile / 99th percentiles inside the foreground enter the average. The result is a JSON
file that ``HistogramStandardized`` (training and inference) reads. The work is done by the library function
:func:`mtl_med.transforms.landmarks.learn_from_datalist` (re-exported here for existing scripts); this module
adds the argument checks and the refusal of an existing output file.

    python -m data_prep.landmarks --datalist DIR/datalist.json --out DIR/landmarks_mr.json [--overwrite]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from data_prep.report import refuse_existing_output
from mtl_med.errors import InputError
from mtl_med.transforms.landmarks import learn_from_datalist

__all__ = ["learn_from_datalist", "main"]

logger = logging.getLogger("data_prep.landmarks")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.landmarks",
                                description="Learn histogram standardisation landmarks from a datalist's training MR.")
    p.add_argument("--datalist", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="landmarks JSON to write")
    p.add_argument("--key", default="mr", help="datalist key of the images (the modality stored in the file)")
    p.add_argument("--section", default="training")
    p.add_argument("--no-n4", action="store_true", help="learn on uncorrected images")
    p.add_argument("--n4-shrink", type=int, default=4, help="N4 shrink factor")
    p.add_argument("--n4-cache", type=Path, help="N4 field cache folder (shared with training)")
    p.add_argument("--foreground", choices=("otsu", "nonzero", "mean", "all"), default="otsu")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    if args.n4_shrink < 1:
        p.error("--n4-shrink must be >= 1")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    refuse_existing_output(p, args.out, args.overwrite, logger)
    try:
        out, failed = learn_from_datalist(args.datalist, args.out, key=args.key, section=args.section,
                                          n4=not args.no_n4, n4_shrink_factor=args.n4_shrink, n4_cache_dir=args.n4_cache,
                                          foreground_method=args.foreground, progress=not args.quiet)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if out is None:
        print("error: no usable training image; nothing written", file=sys.stderr)
        return 1
    print(f"wrote landmarks to {out}")
    if failed:
        print(f"{len(failed)} image(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
