"""Output folders written whole or not at all: a case's files go into a private temporary folder beside the case
folder, which replaces the case folder in one rename (:func:`publish_folder`); what a killed run left is
recognised by its host and process id and removed by the next run (:func:`clean_stale_outputs`,
:func:`check_output_dir`)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path

from mtl_med.errors import InputError

__all__ = ["private_temp", "publish_folder", "clean_stale_outputs", "check_output_dir"]

logger = logging.getLogger("mtl_med.inference")

_TMP_TAG = ".mtl_med-"  # private folders: .<case>.mtl_med-<host>-<pid>.tmp (being written) / .old (replaced)


def private_temp(case_dir: Path, kind: str = "tmp") -> Path:
    """A folder beside ``case_dir`` that only this process writes, named so a later run can tell that its
    writer has died (same host, pid no longer running) and remove it."""
    return case_dir.parent / f".{case_dir.name}{_TMP_TAG}{socket.gethostname()}-{os.getpid()}.{kind}"


def publish_folder(tmp: Path, case_dir: Path, names: Sequence[str]) -> None:
    """Make the complete folder ``tmp`` the case folder in one rename. An existing case folder is moved aside
    first (rename) and removed after; other files the user kept in it are carried over first. ``tmp``, the
    case folder and the moved-aside copy are siblings in the output folder; nothing else is renamed or removed."""
    if tmp.parent != case_dir.parent or case_dir.name in ("", ".", "..") or not case_dir.parent.is_dir():
        raise InputError(case_dir, f"cannot publish {tmp.name}: not a case folder beside it in the output folder")
    old = None
    if case_dir.exists():
        for p in case_dir.iterdir():
            if p.name not in names and not (tmp / p.name).exists():
                os.link(p, tmp / p.name) if p.is_file() else shutil.copytree(p, tmp / p.name, symlinks=True)
        old = private_temp(case_dir, "old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(case_dir, old)
    try:
        os.rename(tmp, case_dir)
    except OSError:
        if old is not None:
            os.rename(old, case_dir)  # keep the earlier complete set
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_outputs(root: Path) -> list[Path]:
    """Remove the private folders that dead runs on this host left in ``root``; a case folder that was moved
    aside (``.old``) and never replaced is put back. Returns what was cleaned."""
    cleaned = []
    if not root.is_dir():
        return cleaned
    host = socket.gethostname()
    for p in root.glob(f".*{_TMP_TAG}*"):
        stem, _, kind = p.name.rpartition(".")
        case, _, owner = stem[1:].partition(_TMP_TAG)
        h, _, pid = owner.rpartition("-")
        if (kind not in ("tmp", "old") or h != host or not pid.isdigit() or _alive(int(pid))
                or case in ("", ".", "..")):
            continue
        final = root / case
        if kind == "old" and not final.exists() and p.is_dir():
            os.rename(p, final)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        cleaned.append(p)
        logger.info("removed %s, left by an interrupted run", p)
    return cleaned


def check_output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder and check it is writable, before any work; remove what dead runs left there.

    Raises:
        InputError: naming the output folder.
    """
    from mtl_med.io import refuse_shipped

    root = Path(path).expanduser().resolve()
    refuse_shipped(root, what="the outputs")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = private_temp(root / "write-check")
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        raise InputError(root, f"output folder cannot be created or written ({err.strerror or err})") from err
    clean_stale_outputs(root)
    return root

