"""What the data_prep commands share: the refusal of an earlier run's output and the closing report."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

__all__ = ["refuse_existing_output", "finish"]


def _earlier_run(out: Path, noun: str) -> str:
    """What a non-empty folder holds: the items of its datalist, else the number of entries."""
    try:
        dl = json.loads((out / "datalist.json").read_text())
        n = sum(len(dl[k]) for k in ("training", "validation", "test") if k in dl)
        return f"{n} {noun}{'' if n == 1 else 's'} from an earlier run"
    except (OSError, ValueError, TypeError, AttributeError):
        n = sum(1 for _ in out.iterdir())
        return f"{n} entr{'y' if n == 1 else 'ies'}, no readable datalist.json"


def refuse_existing_output(parser: argparse.ArgumentParser, out: Path, overwrite: bool, logger: logging.Logger,
                           noun: str | None = None) -> None:
    """Stop with one argparse-style error line (exit 2) before anything is written when ``out`` holds an
    earlier run (no usage text: the arguments are right, the destination is not).

    With ``noun`` (what the datalist lists), ``out`` is a folder, refused when not empty: writing into it would
    mix two runs (an earlier run's cases that this one does not write stay behind). Without, ``out`` is a file,
    refused when it exists. ``overwrite`` lets the run go on and says so in the log (as a warning, so that
    ``--quiet`` shows it too).
    """
    def refuse(msg: str) -> None:
        parser.exit(2, f"{parser.prog}: error: {out}: {msg}\n")

    out = Path(out)
    if noun is None:
        if out.is_dir():
            refuse("output is a folder, expected a file name")
        if not out.exists():
            return
        what, fix, done = "output file exists", "replace it", "the existing file is replaced"
    else:
        if out.exists() and not out.is_dir():
            refuse("output folder is a file")
        if not out.is_dir() or not any(out.iterdir()):
            return
        earlier = _earlier_run(out, noun)
        what, fix = f"output folder is not empty ({earlier})", "write into it anyway"
        done = f"existing files of the same name are replaced; the others stay ({earlier})"
    if not overwrite:
        refuse(f"{what}; pass --overwrite to {fix}")
    logger.warning("%s: --overwrite: %s", out, done)


def finish(datalist: dict, failed: list[str], out: Path, verb: str, noun: str) -> int:
    """Print what was written and which items failed; the command's exit code (1 if any failed)."""
    counts = {k: len(datalist[k]) for k in ("training", "validation", "test")}
    print(f"{verb} {sum(counts.values())} {noun}s to {out} ({counts}); datalist {Path(out) / 'datalist.json'}")
    if failed:
        print(f"{len(failed)} {noun}(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
