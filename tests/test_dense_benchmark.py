"""benchmarks/dense_scenes.py's --gpu mode (AdaShare's NYU v2 3-task set-up) on a miniature copy of AdaShare's
json layout: it builds ResNet-34 with the 7x7 stride-2 stem and max-pool, crops 321 x 321, trains, and
evaluates on the test split, end to end (two images, one iteration: the path, not the numbers)."""

import json
from pathlib import Path

import numpy as np
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
    assert r["epochs"] == 1 and set(r["tasks"]) == {"seg", "depth", "normal"}
    m = json.loads((tmp_path / "out" / "hard_sharing" / "seed0" / "eval" / "metrics.json").read_text())
    assert m["split"] == "test" and m["backbone"] == "resnet34" and m["dataset"] == "adashare_nyuv2"
    from mtl_med.build import build_network

    # the 16 basic blocks of ResNet-34 at full width (AdaShare's NYU v2 backbone), 7x7 stride-2 stem, max-pool
    net = build_network("resnet34", "hard_sharing", ["seg", "depth", "normal"], [40, 1, 3], head="aspp", head_hidden=256,
                        conv1_t_size=7, conv1_t_stride=2, no_max_pool=False)
    assert r["parameters"] == sum(p.numel() for p in net.parameters())
    assert (tmp_path / "out" / "table.md").read_text().count("| hard_sharing |") == 1


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
    import pytest

    with pytest.raises(SystemExit, match="model_final.pt is missing"):
        bench.extend(tmp_path / "sfg" / "seed0", record, {"max_epochs": 100})
