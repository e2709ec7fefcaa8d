"""benchmarks/report.py: the committed tables are their records' rendering, a changed number is caught
(and named), and records are written whole."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _copy_repo(tmp_path, load_benchmark):
    """The docs and the records of the checkout, in a scratch root."""
    report = load_benchmark("report")
    for doc in report.doc_files(ROOT):
        dst = tmp_path / doc.relative_to(ROOT)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(doc, dst)
    shutil.copytree(ROOT / "results", tmp_path / "results")
    return report


def test_committed_tables_match_their_records():
    out = subprocess.run([sys.executable, str(BENCH / "report.py"), "--check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout


def test_every_report_marker_names_a_known_table(load_benchmark):
    report = load_benchmark("report")
    text = (ROOT / "docs" / "reproduction.md").read_text()
    names = [m.group("name") for m in report.MARKER.finditer(text)]
    assert names and set(names) <= set(report.TABLES)
    assert "adashare_null_short" in names and "uncertainty" in names


def test_a_planted_number_fails_the_check_and_names_the_table(tmp_path, capsys, load_benchmark):
    report = _copy_repo(tmp_path, load_benchmark)
    assert report.main(["--check", "--root", str(tmp_path)]) == 0
    doc = tmp_path / "docs" / "reproduction.md"
    text = doc.read_text()
    start = text.index("<!-- report:uncertainty -->")
    planted = text[:start] + text[start:].replace("| seed 2001 | RAS | 0.43 |", "| seed 2001 | RAS | 0.53 |", 1)
    assert planted != text
    doc.write_text(planted)
    capsys.readouterr()
    assert report.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "uncertainty" in err and "adashare_null_short" not in err
    # rendering restores the committed table, after which the check passes again
    assert report.main(["--root", str(tmp_path)]) == 0
    assert doc.read_text() == text
    assert report.main(["--check", "--root", str(tmp_path)]) == 0


def test_a_changed_record_fails_the_check(tmp_path, capsys, load_benchmark):
    report = _copy_repo(tmp_path, load_benchmark)
    rec_path = sorted((tmp_path / "results" / "adashare_null").glob("short_distinct_seed*.json"))[0]
    rec = json.loads(rec_path.read_text())
    rec["metrics"]["mean_alpha_task_spread"] += 0.1
    rec_path.write_text(json.dumps(rec))
    assert report.main(["--check", "--root", str(tmp_path)]) == 1
    assert "adashare_null_short" in capsys.readouterr().err


def test_unknown_table_and_missing_records_are_errors(tmp_path, capsys, load_benchmark):
    report = load_benchmark("report")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "reproduction.md").write_text("<!-- report:nope -->\n<!-- /report:nope -->\n"
                                                        "<!-- report:uncertainty -->\n<!-- /report:uncertainty -->\n")
    assert report.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "unknown table 'nope'" in err and "'uncertainty' cannot be rendered" in err


def test_write_record_is_whole_and_names_the_machine_and_revision(tmp_path, load_benchmark):
    records = load_benchmark("records")
    path = records.write_record("demo", "run_seed3", config={"lr": 0.1}, seed=3, metrics={"acc": 0.5}, timings={"cpu_s": 1.0},
                                root=tmp_path)
    assert path == tmp_path / "demo" / "run_seed3.json"
    rec = json.loads(path.read_text())
    assert rec["seed"] == 3 and rec["metrics"] == {"acc": 0.5} and rec["config"] == {"lr": 0.1}
    assert len(rec["code"]["commit"]) == 40 and rec["machine"]["cpu_model"]
    assert isinstance(rec["machine"]["cpu_flags"], list)
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["run_seed3.json"]  # no temporary file left
    assert records.read_records("demo", tmp_path)[0]["name"] == "run_seed3"
    with pytest.raises(ValueError, match="plain file names"):
        records.write_record("demo", "../escape", config={}, seed=None, metrics={}, root=tmp_path)


def test_the_null_controls_identical_tasks_are_copies_of_one_task(monkeypatch, load_benchmark):
    monkeypatch.syspath_prepend(str(BENCH))
    adashare = load_benchmark("adashare_digits")
    from mtl_med.data import vision

    adashare.register_identical_digits(3)
    try:
        ds = vision.load_vision_tasks(adashare.IDENTICAL, "train")
        ref = vision.load_vision_tasks("digits", "train")
    finally:
        vision.VISION_DATASETS.pop(adashare.IDENTICAL, None)
    assert ds.task_names == ["digit_3"] + [f"digit_3_{k}" for k in range(2, 11)]
    assert all((ds.targets[t] == ref.targets["digit_3"]).all() for t in ds.task_names)
    assert len(ds) == len(ref) and set(ds.task_types.values()) == {"binary"}


def test_null_verdict_needs_the_distinct_tasks_to_beat_every_null(tmp_path, load_benchmark):
    report, records = load_benchmark("report"), load_benchmark("records")
    cfg = {"width": 0.125, "image_size": 8, "warmup_epochs": 1, "policy_epochs": 10, "policy_lr": 0.1, "tau_final": 0.01}
    spreads = {"distinct": [0.40, 0.42, 0.38, 0.41], "identical_digit0": [0.20, 0.21, 0.19, 0.22], "identical_digit8": [0.45, 0.30, 0.44, 0.33]}
    for cond, values in spreads.items():
        for seed, v in enumerate(values):
            records.write_record("adashare_null", f"short_{cond}_seed{seed}", config={**cfg, "condition": cond}, seed=seed,
                                 metrics={"mean_alpha_task_spread": v}, timings={"search_cpu_s": 35.0}, root=tmp_path)
    table = report.adashare_null(tmp_path, "short")
    assert "ten copies of `digit_8`" in table and "| 0 | 0.400 | 0.200 | 0.450 |" in table
    assert "not shown: distinct tasks beat the copies of `digit_0` at p < 0.05 (paired t-test) but not every identical-task null run" in table
    for seed in range(4):  # without the second null, the first alone is beaten
        (tmp_path / "adashare_null" / f"short_identical_digit8_seed{seed}.json").unlink()
    assert "shown at p < 0.05 (paired t-test) against every identical-task null run" in report.adashare_null_summary(tmp_path, "short")
