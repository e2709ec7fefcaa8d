"""Errors a user can fix (bad files, bad config values, failed cases) and how the bundle commands report them:
one line with the file or config id and the problem, exit code 1, the traceback only in a debug log.

Imports nothing from the package, so every module (NIfTI checks, transforms, inference, data tools) can raise
these without an import cycle."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Mapping
from typing import Any

__all__ = [
    "InputError",
    "ConfigError",
    "CaseFailures",
    "as_bool",
    "check_flags",
    "require_file",
    "user_error",
    "install_excepthook",
]

DEBUG_LOG_ENV = "MTL_MED_DEBUG_LOG"


class InputError(ValueError):
    """Bad input data. ``str(err)`` is ``"<file>: <problem>"``; ``err.path`` and ``err.problem`` hold the parts."""

    def __init__(self, path: Any, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # picklable across DataLoader workers
        return (type(self), (self.path, self.problem))


class ConfigError(InputError):
    """A config value of the wrong type or out of range; ``str(err)`` is ``"<config id>: <problem>"``."""


class CaseFailures(RuntimeError):
    """Raised at the end of a run in which some cases failed; ``failures`` maps case -> message."""

    def __init__(self, failures: Mapping[str, str], total: int):
        self.failures = dict(failures)
        lines = "\n".join(f"  {case}: {msg}" for case, msg in self.failures.items())
        super().__init__(f"{len(self.failures)} of {total} cases failed:\n{lines}")


def as_bool(value: Any, name: str) -> bool:
    """``value`` as a bool, or a :class:`ConfigError` naming the config id: a string such as ``"false"`` (what
    ``--flag false`` gives on the command line) is truthy in Python, so it is refused rather than guessed."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    hint = f"; on the command line write --{name} True or --{name} False" if isinstance(value, str) else ""
    raise ConfigError(name, f"must be true or false (a boolean), got {type(value).__name__} {value!r}{hint}")


def check_flags(**flags: Any) -> None:
    """Check the boolean config ids of a bundle (``"initialize"``), before anything runs."""
    for name, value in flags.items():
        as_bool(value, name)


def require_file(path: str | os.PathLike, what: str, hint: str = "") -> str:
    """``path`` if it is a file, else an :class:`InputError` naming it (for configs whose loaders would raise a
    bare ``FileNotFoundError``, e.g. MONAI's ``CheckpointLoader``)."""
    if not os.path.isfile(path):
        raise InputError(path, f"{what} does not exist" + (f"; {hint}" if hint else ""))
    return str(path)


def user_error(err: BaseException | None) -> InputError | None:
    """The :class:`InputError` (or :class:`CaseFailures`) behind an exception and MONAI's wrappers around it."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (InputError, CaseFailures)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def install_excepthook(debug_log: str | os.PathLike | None = None) -> None:
    """Report user errors in one line at the command line (exit code 1) and write their traceback to
    ``debug_log`` (default: ``$MTL_MED_DEBUG_LOG`` or ``<tmp>/mtl_med_debug.log``); other exceptions keep
    Python's report. Called from the bundles' ``initialize``."""
    path = str(debug_log or os.environ.get(DEBUG_LOG_ENV) or os.path.join(tempfile.gettempdir(), "mtl_med_debug.log"))
    previous = sys.excepthook
    if getattr(previous, "mtl_med_debug_log", None) is not None:  # installed already (in-process runs)
        previous = previous.__wrapped__

    def hook(etype, value, tb):
        err = user_error(value)
        if err is None:
            return previous(etype, value, tb)
        try:
            with open(path, "a") as fh:
                fh.write("".join(traceback.format_exception(etype, value, tb)) + "\n")
            where = f" (traceback in {path})"
        except OSError:
            where = ""
        logging.shutdown()
        sys.stderr.write(f"error: {err}{where}\n")

    hook.mtl_med_debug_log, hook.__wrapped__ = path, previous
    sys.excepthook = hook
