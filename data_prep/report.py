"""The closing report the data_prep commands share."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["finish"]


def finish(datalist: dict, failed: list[str], out: Path, verb: str, noun: str) -> int:
    """Print what was written and which items failed; the command's exit code (1 if any failed)."""
    counts = {k: len(datalist[k]) for k in ("training", "validation", "test")}
    print(f"{verb} {sum(counts.values())} {noun}s to {out} ({counts}); datalist {Path(out) / 'datalist.json'}")
    if failed:
        print(f"{len(failed)} {noun}(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
