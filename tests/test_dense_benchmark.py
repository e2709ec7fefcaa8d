"""benchmarks/dense_scenes.py: the --gpu mode (AdaShare's NYU v2 3-task set-up) on a miniature copy of AdaShare's
json layout (ResNet-34 with the 7x7 stride-2 stem and max-pool, 321 x 321 crops, the test split; two images, one
iteration: the path, not the numbers), --extend, and the evaluation protocol: both batch-norm modes for every row,
delta-m per task, SFG's grouping rate."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image



def _nyu_copy(root: Path, n=2, h=40, w=48):
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        files = {"img": (rng.integers(0, 255, (h, w, 3))).astype(np.uint8), "seg": rng.integers(0, 40, (h, w)).astype(np.uint8),
                 "normal_mask": np.dstack([np.full((h, w), 127), np.full((h, w), 127), np.full((h, w), 255)]).astype(np.uint8)}
        for folder, arr in files.items():
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / folder / f"{i:04d}.png")
        (root / "depth").mkdir(exist_ok=True)
        np.save(root / "depth" / f"{i:04d}.npy", rng.uniform(1, 5, (h, w)).astype(np.float32))
        entries.append([f"img/{i:04d}.png", f"seg/{i:04d}.png", f"normal_mask/{i:04d}.png", f"depth/{i:04d}.npy"])
    (root / "nyu_v2_3task.json").write_text(json.dumps({"train": entries, "test": entries}))


def test_gpu_mode_runs_adashare_nyu_setup_end_to_end(tmp_path, load_benchmark):
    bench = load_benchmark("dense_scenes")
    _nyu_copy(tmp_path / "nyu")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert bench.main(["--gpu", "--data-root", str(tmp_path / "nyu"), "--out", str(tmp_path / "out"), "--variants", "hard_sharing",
                           "--seeds", "0", "--set", "epoch_length=1", "max_epochs=1", "batch_size=2", "val_batch_size=2",
                           "val_epoch_length=1"]) == 0
    finally:
        torch.set_num_threads(n)
    r = json.loads((tmp_path / "out" / "results.json").read_text())["hard_sharing/seed0"]
    assert r["epochs"] == 1 and all(set(r["modes"][mode]["tasks"]) == {"seg", "depth", "normal"} for mode in ("population", "batch"))
    m = json.loads((tmp_path / "out" / "hard_sharing" / "seed0" / "eval" / "population" / "metrics.json").read_text())
    assert m["split"] == "test" and m["backbone"] == "resnet34" and m["dataset"] == "adashare_nyuv2"
    from mtl_med.build import build_network

    # the 16 basic blocks of ResNet-34 at full width (AdaShare's NYU v2 backbone), 7x7 stride-2 stem, max-pool
    net = build_network("resnet34", "hard_sharing", ["seg", "depth", "normal"], [40, 1, 3], head="aspp", head_hidden=256,
                        conv1_t_size=7, conv1_t_stride=2, no_max_pool=False)
    assert r["parameters"] == sum(p.numel() for p in net.parameters())
    assert (tmp_path / "out" / "table.md").read_text().count("| hard_sharing |") == 2  # one row per batch-norm mode


def test_extend_continues_a_capped_run_with_its_optimizer_and_early_stopping_state(tmp_path, load_benchmark):
    """--extend picks a run up where its epoch cap stopped it: Adam's step count carries on (weights and optimizer
    restored, not re-initialised), the epoch count and the best-score bookkeeping continue, and a run whose early
    stopping had already fired is left alone."""
    from data_prep.synthetic_scenes import generate

    bench = load_benchmark("dense_scenes")
    generate(tmp_path / "scenes", 4, 2, seed=0, height=32, width=32)
    common = ["--data-root", str(tmp_path / "scenes"), "--out", str(tmp_path / "out"), "--variants", "hard_sharing", "--seeds", "0",
              "--width", "0.125", "--head-hidden", "8", "--set", "epoch_length=1", "batch_size=2", "val_batch_size=2"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert bench.main(common + ["--max-epochs", "2"]) == 0
        first = json.loads((tmp_path / "out" / "results.json").read_text())["hard_sharing/seed0"]
        assert first["epochs"] == first["max_epochs"] == 2 and 1 <= first["best_epoch"] <= 2
        assert bench.main(common + ["--max-epochs", "3", "--extend"]) == 0
    finally:
        torch.set_num_threads(n)
    r = json.loads((tmp_path / "out" / "results.json").read_text())["hard_sharing/seed0"]
    assert r["epochs"] == r["max_epochs"] == 3 and r["continued_from"] == 2 and r["train_s"] > first["train_s"]
    assert r["best_val"] >= first["best_val"] and r["best_epoch"] in (first["best_epoch"], 3)
    adam = torch.load(tmp_path / "out" / "hard_sharing" / "seed0" / "models" / "model_final.pt", weights_only=True)["optimizer"]
    assert {int(s["step"]) for s in adam["state"].values()} == {3}  # one step per epoch, counted from the first run

    class Args:
        patience, max_epochs = 5, 100

    assert bench.capped({"variant": "v", "seed": 0, "epochs": 40, "max_epochs": 40, "best_epoch": 38}, Args)
    assert not bench.capped({"variant": "v", "seed": 0, "epochs": 40, "max_epochs": 40, "best_epoch": 35}, Args)  # stopped
    assert not bench.capped({"variant": "v", "seed": 0, "epochs": 19, "max_epochs": 40, "best_epoch": 14}, Args)


def test_extend_names_a_missing_final_checkpoint(tmp_path, load_benchmark):
    bench = load_benchmark("dense_scenes")
    record = {"variant": "sfg", "seed": 0, "epochs": 40, "max_epochs": 40, "best_val": 0.5, "best_epoch": 39, "train_s": 1.0}
    with pytest.raises(SystemExit, match="model_final.pt is missing"):
        bench.extend(tmp_path / "sfg" / "seed0", record, {"max_epochs": 100})


def _hand_delta_m(tasks: dict, single: dict) -> float:
    """eq. 1 per task (mean signed relative difference of the task's metrics; errors and angles negated), then the
    mean over tasks; a metric the baseline scored 0 or NaN on is left out, as the evaluation does."""
    lower = ("abs_err", "rel_err", "rmse", "mean_error", "median_error")
    terms = []
    for t, ms in tasks.items():
        d = [(-1 if m in lower else 1) * (v - single[t][m]) / single[t][m] for m, v in ms.items()
             if np.isfinite(v) and np.isfinite(single[t][m]) and single[t][m] != 0]
        if d:
            terms.append(sum(d) / len(d))
    return sum(terms) / len(terms)


def test_every_row_is_evaluated_in_both_batch_norm_modes_and_sfg_trains_at_the_benchmark_grouping_rate(tmp_path, load_benchmark,
                                                                                                      monkeypatch):
    """One protocol for every row: each run's best checkpoint is tested with running and with test-batch batch-norm
    statistics, delta-m in each mode is the per-task mean against the single-task networks in that same mode, and
    both modes reach the table and the records. SFG trains with the grouping logits at 100x the weights' rate and
    records how far p moved."""
    from data_prep.synthetic_scenes import generate

    bench = load_benchmark("dense_scenes")
    import records

    monkeypatch.setattr(records, "RESULTS", tmp_path / "results")
    generate(tmp_path / "scenes", 4, 2, seed=0, height=32, width=32)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert bench.main(["--data-root", str(tmp_path / "scenes"), "--out", str(tmp_path / "out"), "--variants", "hard_sharing", "sfg",
                           "single_task", "--seeds", "0", "--width", "0.125", "--head-hidden", "8", "--max-epochs", "1", "--record",
                           "--set", "epoch_length=1", "batch_size=2", "val_batch_size=2"]) == 0
    finally:
        torch.set_num_threads(n)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    single = results["single_task/seed0"]["modes"]
    for v in ("single_task", "hard_sharing", "sfg"):
        r = results[f"{v}/seed0"]
        assert set(r["modes"]) == {"population", "batch"}, v
        for mode, m in r["modes"].items():
            assert set(m["tasks"]) == {"seg", "depth", "normal"}
            if v == "single_task":
                assert m["delta_m"] is None
                continue
            assert m["delta_m"] == pytest.approx(_hand_delta_m(m["tasks"], single[mode]["tasks"]), rel=1e-9), (v, mode)
            saved = json.loads((tmp_path / "out" / v / "seed0" / "eval" / mode / "metrics.json").read_text())
            assert Path(saved["baseline_file"]).parent.name == mode
        # the mode reaches the network: running and test-batch statistics give different predictions
        assert r["modes"]["population"]["tasks"] != r["modes"]["batch"]["tasks"], v
    assert results["hard_sharing/seed0"]["selection_bn"] == "population" and results["sfg/seed0"]["selection_bn"] == "batch"

    g = results["sfg/seed0"]["grouping"]
    assert g["grouping_lr_scale"] == 100.0 and g["tau_rate"] == 1e-3
    assert g["mean_abs_dp"] > 0 and len(g["shared_sum_start"]) == len(g["shared_sum_end"]) == len(g["layers"]) > 0
    assert g["shared_sum_start"] == pytest.approx([0.6] * len(g["layers"]))
    adam = torch.load(tmp_path / "out" / "sfg" / "seed0" / "models" / "model_final.pt", weights_only=True)["optimizer"]
    assert sorted({group["lr"] for group in adam["param_groups"]}) == pytest.approx([1e-3, 0.1])  # weights, grouping logits

    text = (tmp_path / "out" / "table.md").read_text()
    for mode in ("population", "batch"):
        section = text.split(f"(`{mode}`)")[1].split("(`")[0]
        assert all(section.count(f"| {v} | 1 |") == 1 for v in ("single_task", "hard_sharing", "sfg")), mode  # one metrics row each (1 seed)
    assert "mean |p - p_start|" in text and "grouping lr x100" in text

    recs = records.read_records("dense_scenes", tmp_path / "results")
    assert sorted(r["name"] for r in recs) == ["hard_sharing_seed0", "sfg_seed0", "single_task_seed0"]
    assert all(set(r["metrics"]["modes"]) == {"population", "batch"} for r in recs)
    rendered = bench.render(tmp_path / "results")
    assert rendered.startswith(bench.table(results)) and "results/dense_scenes/*.json" in rendered


def test_delta_m_of_an_evaluation_is_the_mean_over_tasks_of_each_tasks_mean(tmp_path):
    """A hand-computed example through the evaluation's report (what each run's metrics.json and the table hold):
    seg has two metrics, depth three, normals one, so the mean over the six metrics (-0.1 / 6) differs from the
    mean over tasks (-0.1 / 3)."""
    from types import SimpleNamespace

    from mtl_med.engines.dense import DenseReport

    single = {"seg": {"miou": 0.5, "pixel_acc": 0.8}, "depth": {"abs_err": 0.4, "rel_err": 0.1, "delta1": 0.5},
              "normal": {"mean_error": 20.0}}
    multi = {"seg/miou": 0.6, "seg/pixel_acc": 0.8,                        # +0.2, 0      -> task term +0.1
             "depth/abs_err": 0.4, "depth/rel_err": 0.1, "depth/delta1": 0.5,  # 0, 0, 0  -> 0
             "normal/mean_error": 22.0}                                      # -0.1        -> -0.1
    (tmp_path / "single.json").write_text(json.dumps({"tasks": single}))
    report = DenseReport(tmp_path, baseline_file=tmp_path / "single.json")
    report(SimpleNamespace(state=SimpleNamespace(metrics={**multi, "val_score": 0.0})))
    assert report.summary["delta_m"] == pytest.approx((0.1 + 0.0 - 0.1) / 3)  # 0, not (0.2 - 0.1) / 6
    multi["normal/mean_error"] = 24.0  # normal's term -0.2
    report(SimpleNamespace(state=SimpleNamespace(metrics={**multi, "val_score": 0.0})))
    assert report.summary["delta_m"] == pytest.approx((0.1 + 0.0 - 0.2) / 3)


def test_the_table_shows_every_row_in_both_modes_with_that_modes_delta_m(load_benchmark):
    bench = load_benchmark("dense_scenes")

    def run(v, dm_pop, dm_batch, seed=0):
        tasks = {"seg": {"miou": 0.5}, "depth": {"abs_err": 0.4}, "normal": {"mean_error": 20.0}}
        return {"variant": v, "seed": seed, "parameters": 10, "train_s": 1.0, "epochs": 3, "selection_bn": "population",
                "modes": {"population": {"tasks": tasks, "delta_m": dm_pop}, "batch": {"tasks": tasks, "delta_m": dm_batch}}}

    text = bench.table({"a": run("hard_sharing", -0.0123, 0.0456), "b": run("task_routing", -0.0789, 0.0321)})
    pop, batch = text.split("(`batch`)")
    assert "| hard_sharing |" in pop and "| task_routing |" in pop and "| hard_sharing |" in batch and "| task_routing |" in batch
    assert pop.count("-1.23 |") == 1 and pop.count("-7.89 |") == 1 and "4.56 |" not in pop
    assert batch.count("4.56 |") == 1 and batch.count("3.21 |") == 1 and "-1.23" not in batch


def test_the_paired_comparisons_pair_by_seed_against_each_rows_own_reference(load_benchmark):
    """Each variant against hard sharing on its own backbone (SFG against hard sharing on HighResNet), seed with
    seed; the single-task networks count as delta-m 0 (they are the baseline)."""
    bench = load_benchmark("dense_scenes")

    def run(v, seed, dm):
        return {"variant": v, "seed": seed, "parameters": 10, "train_s": 1.0, "epochs": 3, "selection_bn": "population",
                "modes": {m: {"tasks": {}, "delta_m": None if v == "single_task" else dm} for m in bench.BN_MODES}}

    hard = {0: -0.02, 1: -0.05, 2: 0.01}
    ref = {0: 0.20, 1: 0.10, 2: 0.30}
    sfg = {0: 0.10, 1: 0.15, 2: 0.20}
    rows = [run("hard_sharing", s, d) for s, d in hard.items()] + [run("hard_sharing_highresnet", s, d) for s, d in ref.items()]
    rows += [run("sfg", s, d) for s, d in sfg.items()] + [run("single_task", s, None) for s in hard]
    text = bench.table({str(i): r for i, r in enumerate(rows)})
    pop = text.split("(`batch`)")[0]
    sfg_row = next(line for line in pop.splitlines() if line.startswith("| sfg | hard_sharing_highresnet |"))
    d = 100 * (np.array([sfg[s] for s in (0, 1, 2)]) - np.array([ref[s] for s in (0, 1, 2)]))
    assert f"{d.mean():+.1f} (" in sfg_row and "| 1 / 0 / 2 |" in sfg_row, sfg_row
    stl = next(line for line in pop.splitlines() if line.startswith("| single_task | hard_sharing |"))
    assert f"{-100 * np.mean(list(hard.values())):+.1f} (" in stl, stl
