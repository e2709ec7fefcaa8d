"""benchmarks/pelvis_training.py at tiny size: the fp32 and bf16 runs start from the same weights and the same
first batch, the records hold what docs/performance.md renders, and the loading profile adds up."""

import json
import math

import pytest

TASKS = {"sct", "seg", "regularizer", "total"}


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("pelvis_training", register=True)


@pytest.fixture(scope="module")
def tiny(bench, tmp_path_factory):
    """The work folder (phantoms generated once) and the records' root of one tiny run of each mode."""
    tmp = tmp_path_factory.mktemp("pelvis_training")
    common = ["--tiny", "--cases", "4", "--shape", "32", "32", "8", "--work", str(tmp / "work"), "--results", str(tmp / "records"), "--record"]
    bench.main(["accuracy", "--max_epochs", "1", *common])
    bench.main(["loading", *common])
    return tmp / "records" / "performance"


def test_both_precisions_start_from_the_same_weights_and_batch(tiny):
    rec = json.loads((tiny / "amp_accuracy_seed0.json").read_text())
    assert rec["benchmark"] == "performance" and rec["seed"] == 0 and isinstance(rec["native_bfloat16"], bool)
    fp32, bf16 = rec["metrics"]["fp32"], rec["metrics"]["bf16"]
    assert (fp32["use_amp"], bf16["use_amp"]) == (False, True)
    assert fp32["initial_weights_sha256"] == bf16["initial_weights_sha256"]
    assert fp32["first_batch_sha256"] == bf16["first_batch_sha256"]
    assert fp32["iterations"] == bf16["iterations"] == 2 == len(rec["losses"]["fp32"]) == len(rec["losses"]["bf16"])
    # the same weights and batch: the first losses agree to bf16's precision
    for task in ("sct", "seg"):
        assert bf16["first_loss"][task] == pytest.approx(fp32["first_loss"][task], rel=0.03)
    for m in (fp32, bf16):
        assert set(m["first_loss"]) == set(m["final_loss_last_epoch"]) == TASKS
        for evaluator in ("bundle", "fp32"):
            v = m["validation"][evaluator]
            assert {"val_dice", "val_psnr_hu", "val_mae_hu"} <= set(v) and all(math.isfinite(v[k]) for k in ("val_dice", "val_psnr_hu", "val_mae_hu"))
        assert m["validation"]["bundle"]["amp"] == m["use_amp"] and m["validation"]["fp32"]["amp"] is False
        assert m["train_cpu_s"] > 0 and m["median_iteration_cpu_s"] > 0
    assert rec["config"]["overrides"]["seed"] == 0 and rec["machine"]["cpu_flags"] is not None


def test_loading_profile_splits_the_epoch(tiny):
    rec = json.loads((tiny / "data_loading.json").read_text())
    m, t = rec["metrics"], rec["timings"]
    assert m["iterations"] == len(t["data_wait_wall_s"]) == len(t["iteration_wall_s"]) == 2
    assert m["data_wait_wall_s"] + m["iteration_wall_s"] <= m["epoch_wall_s"]
    assert 0 <= m["data_wait_fraction_wall"] <= 1 and 0 <= m["data_wait_fraction_cpu"] <= 1
    assert rec["config"]["loader"] == {"num_workers": 0, "cache": "memory", "batch_size": 2, "samples_per_volume": 2}


def test_tables_render_from_the_records(bench, tiny):
    acc = bench.render_accuracy(tiny.parent)
    rows = [line for line in acc.splitlines() if line.startswith("| 0 | ")]
    assert "the same initial weights and first batch" in acc
    assert [r.split(" | ")[1] for r in rows] == ["fp32", "bf16", "bf16 - fp32"]  # seed 0: both runs and the difference
    assert "| data_loading | 0 | memory | 2 | 2 |" in bench.render_loading(tiny.parent)
