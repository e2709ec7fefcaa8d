"""benchmarks/gpu_check.py, the check run blind on a lent GPU machine: its --dry-run (the same code on the CPU at a
tiny size) must complete every part, write each part's numbers to the record and print the table; without CUDA
and without --dry-run it must say so and exit with its own code rather than measure nothing quietly."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
PARTS = {"pytest", "paper_job", "training", "ddp"}


def _numbers(row):
    return [v for v in row.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]


@pytest.mark.slow
def test_dry_run_completes_every_part_with_numbers_and_prints_the_table(tmp_path):
    record = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--json", str(record)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(record.read_text())
    assert set(data["metrics"]) == PARTS and set(data["timings"]) == PARTS | {"total"}
    for part, result in data["metrics"].items():
        assert result["status"] == "OK" and result["rows"], (part, result)
        for row in result["rows"]:
            assert row["status"] == "OK" and _numbers(row), (part, row)
    job = {r["what"].split(" (")[0]: r for r in data["metrics"]["paper_job"]["rows"]}
    assert set(job) == {"naive loop float32", "dense float32", "dense bfloat16", "compact float32", "compact bfloat16"}
    assert all(math.isfinite(r["seconds"]) and math.isfinite(r["peak_mb"]) for r in job.values())
    assert all("scaled" in r["note"] for r in job.values())  # the dry run takes the subset-and-scale path
    steps = data["metrics"]["training"]["rows"]
    assert {(r["net"], r["precision"]) for r in steps} == {(n, p) for n in ("SFG-HighResNet", "MONAI HighResNet") for p in ("float32", "AMP bfloat16")}
    assert data["config"]["dry_run"] and data["config"]["backend"] == "gloo" and data["machine"]["torch"] == torch.__version__
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    assert table[0].startswith("| part | measurement |") and len(table) == 2 + sum(len(v["rows"]) for v in data["metrics"].values())
    assert "FAILED" not in proc.stdout and "all parts OK" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path")
def test_without_cuda_it_says_so_and_exits_with_its_own_code():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert proc.stdout.strip().count("\n") == 0 and "no CUDA" in proc.stdout
