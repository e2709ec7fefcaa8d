"""Process settings that only work from the environment the process starts with.

* ``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads that spin-wait between calls stall each other on a shared
  machine (one forward 0.26-3.1 s with 2 threads); libgomp reads the policy once, when torch loads it.
* ``GLIBC_TUNABLES`` (glibc only): ``mmap_max=0`` serves large blocks from the heap instead of fresh
  ``mmap`` regions and a high ``trim_threshold`` keeps freed heap memory, so the 30-130 MB activations of a
  slice-pass reuse pages instead of the kernel zero-filling new ones page by page (about a million page
  faults and 1.9 s of system time per dense slice-pass at 354 x 354; docs/performance.md). glibc reads
  tunables once, at process start, so a command that wants them re-executes itself (:func:`reexec_tuned`).
  The cost: the process keeps its peak heap until it exits (the inference commands' peak is their working set).

A value the user set is kept as it is; ``GLIBC_TUNABLES=`` (empty) opts out of the allocator setting.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence

__all__ = ["ALLOCATOR_TUNABLES", "tuned_environ", "reexec_tuned", "activate_lines"]

#: glibc malloc: no mmap for large blocks, freed memory kept (trim only above 64 GiB of free heap)
ALLOCATOR_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
_MARK = "MTL_MED_TUNED"


def _glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def tuned_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default ``os.environ``) with the settings above added where the user set none."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if _glibc():
        env.setdefault("GLIBC_TUNABLES", ALLOCATOR_TUNABLES)
    return env


def reexec_tuned(argv: Sequence[str]) -> None:
    """Start this command again as ``python *argv`` with :func:`tuned_environ` when the environment lacks
    its settings; returns (doing nothing) when they are in place, after one re-execution, or where
    ``exec`` is unavailable. Call it first thing, before torch loads."""
    env = tuned_environ()
    if env == dict(os.environ) or os.environ.get(_MARK) or not hasattr(os, "execve"):
        os.environ.update(env)  # OMP_WAIT_POLICY still helps when set before torch loads
        return
    env[_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)


def activate_lines() -> str:
    """Shell lines for a virtual environment's ``activate`` script (``.ci/setup`` appends them), so
    ``python -m monai.bundle run`` in the activated environment starts with the same settings; a value
    already in the shell is kept (an empty ``GLIBC_TUNABLES`` too)."""
    lines = ["# mtl_med.runtime: OpenMP threads sleep when idle; glibc keeps freed memory (docs/performance.md)",
             'export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"']
    if _glibc():
        lines.append(f'export GLIBC_TUNABLES="${{GLIBC_TUNABLES-{ALLOCATOR_TUNABLES}}}"')
    return "\n".join(lines) + "\n"
