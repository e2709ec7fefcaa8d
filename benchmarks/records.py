"""Raw result records: one small JSON file per benchmark run, under ``results/<benchmark>/``.

A record holds what a reader needs to check a number of the docs: the benchmark, the run's name,
its configuration and seed, the code revision (``git rev-parse HEAD``, and whether the tree had
local changes), the machine (CPU model and its bf16 / AMX flags, torch threads), the metrics and the
timings. ``benchmarks/report.py`` renders the docs' tables from these files only.

    from records import write_record
    write_record("adashare_null", "distinct_seed0", config={...}, seed=0, metrics={...}, timings={...})

Files are written to a temporary name and renamed, so an interrupted run never leaves half a record.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: where records go: the repository's results/, or $MTL_MED_RESULTS (a scratch folder for trial runs)
RESULTS = Path(os.environ.get("MTL_MED_RESULTS") or ROOT / "results")
SCHEMA = 1


def code_revision() -> dict:
    """``git rev-parse HEAD`` of the checkout, and whether tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return {"commit": head, "local_changes": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "local_changes": None}


def machine() -> dict:
    """The CPU model (``lscpu``'s model name, else /proc/cpuinfo), its bf16 / AMX flags, core count and
    torch's thread count."""
    model, flags = None, ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name" and model is None:
                model = value.strip()
            elif key.strip() == "Flags":
                flags = value
    except (OSError, subprocess.CalledProcessError):
        pass
    if not flags and Path("/proc/cpuinfo").is_file():
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^flags\s*:(.*)$", text, re.M)
        flags = m.group(1) if m else ""
        m = re.search(r"^model name\s*:(.*)$", text, re.M)
        model = model or (m.group(1).strip() if m else None)
    wanted = sorted(f for f in flags.split() if f in ("avx512_bf16", "avx512bf16") or f.startswith("amx"))
    out = {"cpu_model": model or platform.processor() or None, "cpu_flags": wanted, "cpus": os.cpu_count(),
           "platform": platform.platform()}
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return out


def record_path(benchmark: str, name: str, root: str | os.PathLike | None = None) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", benchmark) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"benchmark and run names must be plain file names, got {benchmark!r}, {name!r}")
    return Path(root or RESULTS) / benchmark / f"{name}.json"


def write_record(benchmark: str, name: str, *, config: dict, seed: int | None, metrics: dict, timings: dict | None = None,
                 root: str | os.PathLike | None = None, **extra) -> Path:
    """Write one run's record to ``<root>/<benchmark>/<name>.json`` (``root``: the repository's
    ``results/``) atomically; returns the path."""
    path = record_path(benchmark, name, root)
    rec = {"schema": SCHEMA, "benchmark": benchmark, "name": name, "seed": seed, "config": config, "metrics": metrics,
           "timings": timings or {}, "code": code_revision(), "machine": machine(),
           "written": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(rec, f, indent=1, sort_keys=True, default=_plain)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_records(benchmark: str, root: str | os.PathLike | None = None) -> list[dict]:
    """Every record of ``benchmark``, sorted by name."""
    folder = Path(root or RESULTS) / benchmark
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if not p.name.startswith(".")]


def _plain(x):
    """numpy scalars and arrays, paths and sets as JSON."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, (set, frozenset, tuple)):
        return sorted(x) if isinstance(x, (set, frozenset)) else list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def slug(name: str) -> str:
    """A run's label as a plain file name: ``searched tree @0.25`` -> ``searched_tree_0.25``."""
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_.-]+", "_", name)).strip("_")


def run_config(args, drop: tuple[str, ...] = ("seeds", "json", "merge", "workdir", "record", "record_tag", "figure"), **extra) -> dict:
    """A script's arguments as a record's config (without the per-process ones), plus ``extra``."""
    return {**{k: v for k, v in vars(args).items() if k not in drop}, **extra}


def add_record_arguments(parser) -> None:
    """``--record`` (one record per run under results/<benchmark>/) and ``--record_tag`` (a prefix of the names)."""
    parser.add_argument("--record", action="store_true", help="write one record per run to results/<benchmark>/ (benchmarks/records.py)")
    parser.add_argument("--record_tag", default="", help="prefix of the records' names (the schedule or set-up)")


def tagged(args, name: str) -> str:
    return slug(f"{args.record_tag}_{name}" if getattr(args, "record_tag", "") else name)
