"""AdaShare's Tables 5/6 on digits (``adashare_digits.py --record``, rendered by ``report.py``): the hard-sharing row
runs every block for every task, the best random draw is chosen on validation and not on test, differences are
paired by seed, records of another protocol are refused, and a rerun with ``--record`` skips what is recorded."""

import json
import sys

import numpy as np
import pytest
import torch

from mtl_med.metrics.stats import paired_comparison, seeds_needed

TASKS = [f"digit_{d}" for d in range(10)]
PROTOCOL = {"condition": "distinct", "image_size": 8, "width": 0.125, "batch_size": 64, "warmup_epochs": 10, "policy_epochs": 40,
            "curriculum_speed": None, "lambda_sparsity": None, "lambda_sharing": None, "tau_final": 0.01, "policy_lr": 0.1,
            "search_batch_size": None, "max_epochs": 100, "patience": 15}


@pytest.fixture(scope="module")
def adashare(load_benchmark):
    return load_benchmark("adashare_digits")


# --- hard sharing -------------------------------------------------------------------------------


def test_hard_policy_runs_every_block_for_every_task(adashare):
    """The paper's "Multi-Task" row: ResNet-18's 8 blocks, every one run by every task; the AdaShare network under
    that policy is the network with every block shared (its warm-up mode, hard parameter sharing)."""
    from mtl_med.build import build_network
    from mtl_med.sharing.adashare import set_policy_mode

    rng = np.random.default_rng(0)
    learned = rng.random((len(TASKS), 8)) < 0.4
    policies = adashare.seed_policies(learned, 2, np.random.default_rng(1))
    hard = policies["hard"]
    assert hard.dtype == bool and hard.shape == (10, 8) and hard.all()
    assert adashare.block_counts(hard) == {"blocks": 8, "executed_per_task": [8] * 10, "skipped_per_task": [0] * 10,
                                           "skipped_total": 0, "shared_by_all": 8}
    assert (policies["learned"] == learned).all()

    torch.manual_seed(0)
    net = build_network("resnet18", "adashare", TASKS, 2, in_channels=1, width=0.125, policy=hard.astype(int).tolist()).eval()
    assert net.num_blocks == 8 and net.policy.mode == "fixed" and bool(net.policy.policy.all())
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        fixed = net(x)
        set_policy_mode(net, "warmup")
        shared = net(x)
    for t in TASKS:
        torch.testing.assert_close(fixed[t], shared[t])


def test_random_draws_do_not_depend_on_how_many_are_drawn(adashare):
    """A rerun with more draws adds draws: draw i is the same for --random 2 and --random 8."""
    learned = np.random.default_rng(3).random((10, 8)) < 0.4
    few = adashare.seed_policies(learned, 2, np.random.default_rng(1003))
    many = adashare.seed_policies(learned, 8, np.random.default_rng(1003))
    assert len(many) == 2 + 16
    for name, pol in few.items():
        assert (many[name] == pol).all(), name


# --- the renderer -------------------------------------------------------------------------------


def _write(root, seed, kind, draw, test, val, **config):
    folder = root / "adashare_tables"
    folder.mkdir(parents=True, exist_ok=True)
    run = kind if draw is None else f"{kind}_{draw}"
    pol = np.ones((10, 8), dtype=int) if kind == "hard" else np.tile([1, 1, 1, 0, 0, 0, 0, 0], (10, 1))
    metrics = {"kind": kind, "draw": draw, "policy": pol.tolist(), "epochs": 40, "best_epoch": 25,
               "block_counts": {"blocks": 8, "executed_per_task": pol.sum(1).tolist(), "skipped_per_task": (8 - pol.sum(1)).tolist(),
                                "skipped_total": int((1 - pol).sum()), "shared_by_all": int(pol.all(0).sum())},
               "accuracy_batch": test[0], "accuracy_population": test[1], "val_accuracy_batch": val[0], "val_accuracy_population": val[1]}
    rec = {"benchmark": "adashare_tables", "name": f"{run}_seed{seed}", "seed": seed,
           "config": {**PROTOCOL, "selection": "validation", "kind": kind, "draw": draw, **config}, "metrics": metrics,
           "timings": {"cpu_s": 100.0 + seed}, "machine": {"cpu_model": "test CPU", "cpus": 2, "torch_threads": 1}}
    (folder / f"{run}_seed{seed}.json").write_text(json.dumps(rec))


#: seed -> test accuracy (both protocols alike) of learned and hard; hard lacks seed 1, so pairing by position
#: would pair learned's seed 1 with hard's seed 2
LEARNED = {0: 0.990, 1: 0.950, 2: 0.985, 3: 0.992}
HARD = {0: 0.980, 2: 0.984, 3: 0.970}
#: seed -> draws of (test accuracy, validation accuracy): the best test draw is never the best validation draw
RANDOM1 = {s: [(0.999, 0.950), (0.960, 0.990 - 0.001 * s), (0.970, 0.960)] for s in range(4)}
RANDOM2 = {s: [(0.975, 0.980), (0.998, 0.970), (0.965, 0.980)] for s in range(4)}  # tie in validation: the first draw


def _records(root):
    for s, a in LEARNED.items():
        _write(root, s, "learned", None, (a, a - 0.01), (0.9, 0.9))
    for s, a in HARD.items():
        _write(root, s, "hard", None, (a, a - 0.01), (0.9, 0.9))
    for kind, draws in (("random1", RANDOM1), ("random2", RANDOM2)):
        for s, ds in draws.items():
            for i, (test, val) in enumerate(ds):
                _write(root, s, kind, i, (test, test - 0.01), (val, val))


def _row(text, start):
    return next(line for line in text.splitlines() if line.startswith(start))


def test_learned_minus_hard_is_paired_by_seed(tmp_path, adashare):
    _records(tmp_path)
    text = adashare.render(tmp_path)
    seeds = sorted(HARD)
    d = np.array([100 * (LEARNED[s] - HARD[s]) for s in seeds])
    row = _row(text, "| learned - hard sharing | test-batch BN |")
    assert f"| {', '.join(map(str, seeds))} | {d.mean():+.2f} (" in row, row
    t = paired_comparison(d, np.zeros_like(d))
    assert f"{t.ci_low:+.2f} to {t.ci_high:+.2f}" in row and f"| {t.wins} / {t.ties} / {t.losses} |" in row, row
    assert row.endswith(f"| {seeds_needed(abs(d.mean()), d.std(ddof=1))} |"), row
    learned = _row(text, "| learned policy |")
    acc = 100 * np.array(list(LEARNED.values()))
    assert f"| 4 | {acc.mean():.2f} ± {acc.std(ddof=1):.2f} % |" in learned, learned  # sample std over seeds
    assert "| hard sharing (every task runs every block) | 3 |" in text


def test_best_draw_is_chosen_by_validation_not_test(tmp_path, adashare):
    _records(tmp_path)
    text = adashare.render(tmp_path)
    best1 = 100 * np.array([RANDOM1[s][1][0] for s in range(4)])  # draw 1: the best validation accuracy
    best2 = 100 * np.array([RANDOM2[s][0][0] for s in range(4)])  # draws 0 and 2 tie in validation: draw 0
    assert f"{best1.mean():.2f} ± {best1.std(ddof=1):.2f} %" in _row(text, "| Random #1, best draw by validation |")
    assert f"{best2.mean():.2f} ± 0.00 %" in _row(text, "| Random #2, best draw by validation |")  # equal over seeds
    mean1 = 100 * np.array([np.mean([t for t, _ in RANDOM1[s]]) for s in range(4)])
    assert f"{mean1.mean():.2f} ± {mean1.std(ddof=1):.2f} %" in _row(text, "| Random #1 (same total number of skipped blocks), mean of draws |")
    d = 100 * np.array([LEARNED[s] for s in range(4)]) - best1
    assert f"| 0, 1, 2, 3 | {d.mean():+.2f} (" in _row(text, "| learned - Random #1 best | test-batch BN |")
    d = best2 - best1
    assert f"{d.mean():+.2f} (" in _row(text, "| Random #2 best - Random #1 best | test-batch BN |")
    assert "3 draws of each random kind per seed (the paper: eight)" in text


def test_records_of_another_protocol_are_refused(tmp_path, adashare):
    _records(tmp_path)
    _write(tmp_path, 5, "learned", None, (0.99, 0.98), (0.9, 0.9), max_epochs=20)
    with pytest.raises(ValueError, match="differs .* in \\['max_epochs'\\]"):
        adashare.render(tmp_path)


def test_report_registers_the_table(load_benchmark):
    report = load_benchmark("report")
    assert "adashare_tables" in report.TABLES and report.TABLES["adashare_tables"][1] == "results/adashare_tables/*.json"


# --- records and their resumption ----------------------------------------------------------------


def test_a_rerun_with_record_skips_what_is_recorded(tmp_path, monkeypatch, adashare):
    """Every re-training writes a record holding its policy, block counts, accuracies and protocol; a rerun with more
    draws re-trains only the new draws and takes the learned policy from its record instead of searching again;
    a record of another protocol stops the run instead of being overwritten."""
    records = sys.modules["records"]
    monkeypatch.setattr(records, "RESULTS", tmp_path / "results")
    learned = np.zeros((10, 8), dtype=int)
    learned[:, :3] = 1
    searches, trained = [], []

    def fake_search(run_dir, seed, common, search):
        searches.append(seed)
        (run_dir / "models").mkdir(parents=True, exist_ok=True)
        alpha = np.clip(learned + 0.1 * seed, 0, 1)
        (run_dir / "models" / "policy.json").write_text(json.dumps({"select_probability": alpha.tolist(), "policy": learned.tolist()}))
        return {"best": 7, "history": []}

    def fake_retrain(run_dir, policy, seed, common, train):
        trained.append((run_dir.name, policy.astype(int).tolist()))
        acc = 0.9 + 0.01 * policy.sum() / policy.size
        return {"epochs": 30, "best_epoch": 20, "train_cpu_s": 5.0, "eval_cpu_s": 1.0,
                **{f"{p}accuracy_{bn}": acc for p in ("", "val_") for bn in adashare.BN}}

    monkeypatch.setattr(adashare, "run_search", fake_search)
    monkeypatch.setattr(adashare, "retrain", fake_retrain)
    argv = ["adashare_digits.py", "--seeds", "0", "1", "--image_size", "8", "--max_epochs", "100", "--patience", "15",
            "--workdir", str(tmp_path / "work"), "--record"]
    monkeypatch.setattr(sys, "argv", [*argv, "--random", "1"])
    adashare.main()
    assert searches == [0, 1] and len(trained) == 2 * 4
    folder = tmp_path / "results" / "adashare_tables"
    assert sorted(p.name for p in folder.glob("*.json")) == sorted(
        f"{r}_seed{s}.json" for s in (0, 1) for r in ("learned", "hard", "random1_0", "random2_0"))
    rec = json.loads((folder / "hard_seed1.json").read_text())
    assert rec["metrics"]["policy"] == np.ones((10, 8), dtype=int).tolist() and rec["metrics"]["block_counts"]["skipped_total"] == 0
    assert {f"{p}accuracy_{bn}" for p in ("", "val_") for bn in ("batch", "population")} <= set(rec["metrics"])
    assert rec["config"]["max_epochs"] == 100 and rec["config"]["kind"] == "hard" and rec["timings"]["cpu_s"] == 5.0
    assert json.loads((folder / "learned_seed0.json").read_text())["metrics"]["block_counts"]["executed_per_task"] == [3] * 10

    searches.clear(), trained.clear()
    monkeypatch.setattr(sys, "argv", [*argv, "--random", "2", "--workdir", str(tmp_path / "other")])
    adashare.main()
    assert searches == [] and sorted(name for name, _ in trained) == ["random1_1_seed0", "random1_1_seed1", "random2_1_seed0", "random2_1_seed1"]
    assert len(list(folder.glob("*.json"))) == 2 * 6
    assert "2 draws of each random kind per seed" in adashare.render(tmp_path / "results")

    monkeypatch.setattr(sys, "argv", [*argv, "--random", "2", "--max_epochs", "50"])
    with pytest.raises(SystemExit, match="another protocol .*'max_epochs'"):
        adashare.main()
