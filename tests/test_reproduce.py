"""The reproduction driver: every finding's commands name a script of benchmarks/ and merge every
per-seed result; the SFG summary compares the starts of p of section 5.4."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("full", [False, True])
def test_every_finding_runs_a_benchmark_and_merges_all_its_runs(tmp_path, full, load_benchmark):
    rep = load_benchmark("reproduce")
    for name in rep.FINDINGS:
        runs, merge = rep.commands(name, full, tmp_path)
        for cmd in runs:
            assert cmd[0] == sys.executable and Path(cmd[1]).is_file(), cmd[:2]
            assert cmd[-2] == "--json" and cmd[-1].startswith(str(tmp_path))
        if merge is not None:  # the table is made of every run's JSON, none left out
            assert merge[merge.index("--merge") + 1 :][: len(runs)] == [r[-1] for r in runs]
    runs, _ = rep.commands("sfg", full, tmp_path)
    assert any("init" in r for r in runs) and all(r[r.index("--max_epochs") + 1] for r in runs)


def test_sfg_summary_compares_the_starts_of_p(capsys, load_benchmark):
    sfg = load_benchmark("sfg_specialisation")

    def run(exp, init, props, history=None):
        return {"experiment": exp, "init": init, "seed": 0, "iterations": 10, "proportions": props, "entropy": [0.1, 0.5],
                "mean_p": [[0.1, 0.8, 0.1], [0.3, 0.4, 0.3]], "val_score": 0.9, "history": history or {}}

    early = [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    results = [
        run("unrelated", "shared", [[0.0, 1.0, 0.0], [0.4, 0.2, 0.4]], {"5": early, "10": [[0.0, 1.0, 0.0], [0.4, 0.2, 0.4]]}),
        run("init", "dirichlet", [[0.0, 0.9, 0.1], [0.4, 0.2, 0.4]], {"5": [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]], "10": [[0.0, 0.9, 0.1], [0.4, 0.2, 0.4]]}),
        run("init", "constant_mask", [[1 / 3, 1 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3]]),
    ]
    args = type("A", (), {"width": 0.25, "max_epochs": 1, "grouping_lr_scale": 100.0, "tau_rate": 1e-3, "lambda2": 1e-5})()
    sfg.summary(results, args)
    out = capsys.readouterr().out
    assert "shared vs dirichlet: 0.10" in out  # A.1's start comes from the unrelated run of the same seed
    assert "shared vs constant_mask: 0.67" in out
    # over training, for the starts whose runs kept a history: the gap at iteration 5, then at 10
    assert "at iterations 5 10\n  shared vs dirichlet: 0.50 0.10\n" in out


def test_branched_merge_pairs_searched_and_random_trees_by_seed(tmp_path, monkeypatch, capsys, load_benchmark):
    import json

    monkeypatch.syspath_prepend(str(BENCH))  # the script imports its neighbour vision_digits
    branched = load_benchmark("branched_digits")

    def merge(files):
        monkeypatch.setattr(sys, "argv", ["branched_digits.py", "--merge", *files])
        branched.main()
        return capsys.readouterr().out

    args = {"dataset": "placed_digits", "tasks": ["left", "odd"], "width": 0.25, "image_size": 16, "patience": 6, "max_epochs": 30}

    def part(name, trees, accs):  # accs: seed -> (hard, searched, random)
        results = {"hard sharing": {}, "searched tree @0.5": {}, "random tree @0.5": {}}
        for s, (h, a, b) in accs.items():
            for k, v in zip(results, (h, a, b)):
                results[k][str(s)] = {"accuracy": v, "params": 10}
        path = tmp_path / name
        path.write_text(json.dumps({"args": args, "single": {"left": 0.9, "odd": 0.8}, "trees": trees, "results": results}))
        return str(path)

    tree = {"0.5": [[0, 0], [0, 1]]}
    files = [part("a.json", tree, {0: (0.90, 0.95, 0.92), 1: (0.90, 0.93, 0.94)}), part("b.json", tree, {2: (0.90, 0.97, 0.92)})]
    out = merge(files)
    # per seed +3, -1, +5 points against the random trees (mean +2.33, 2 of 3); +5, +3, +7 against hard sharing
    assert "| searched tree @0.5 | random tree @0.5 | +2.33 | 2 of 3 |" in out
    assert "| searched tree @0.5 | hard sharing | +5.00 | 3 of 3 |" in out
    assert "seeds [0, 1, 2]" in out
    # the figure: affinity against depth from a file that kept it, and the paired differences
    data = json.loads(Path(files[1]).read_text())
    data["affinity"] = {"affinity": [[[1, 0.9], [0.9, 1]], [[1, 0.1], [0.1, 1]]], "task_names": ["left", "odd"], "location_names": ["b1", "b2"]}
    Path(files[1]).write_text(json.dumps(data))
    out = merge(files + ["--figure", str(tmp_path / "branched.png")])
    assert "figure: " in out and (tmp_path / "branched.png").stat().st_size > 0
    other = part("c.json", {"0.5": [[0, 0], [0, 0]]}, {3: (0.9, 0.9, 0.9)})
    with pytest.raises(SystemExit) as stop:  # one line from argparse, nothing merged
        merge(files + [other])
    assert stop.value.code == 2 and "different trees" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a missing file: one line naming it
        merge(files + [str(tmp_path / "missing.json")])
    assert "cannot read " + str(tmp_path / "missing.json") in capsys.readouterr().err
