"""Training side of the flagship bundle: a tiny run, resume, every variant, and 2-process DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import run as bundle_run

from mtl_med.pelvis.phantoms import generate_dataset

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "sfg_highresnet_pelvis"
CONFIGS = BUNDLE / "configs"
TINY = {  # small enough for a 2-core CPU; every value is a config id of train.json
    "features": [4, 8, 8],
    "patch_size": [24, 24],
    "padded_size": [32, 32],
    "batch_size": 2,
    "samples_per_volume": 1,
    "max_epochs": 2,
    "val_interval": 1,
    "log_interval": 1,
    "grouping_interval": 1,
    "n4_shrink_factor": 2,
}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    generate_dataset(root, 4, seed=3, shape=(32, 32, 8), val_fraction=0.25, test_fraction=0.25)
    return root / "datalist.json"


def _train(root, datalist, *extra_configs, **overrides):
    files = [str(CONFIGS / "train.json"), *[str(c) for c in extra_configs]]
    args = {**TINY, "bundle_root": str(root), "datalist": str(datalist), "n4_cache_dir": str(root.parent / "n4_cache"), **overrides}
    bundle_run(config_file=files, logging_file=str(CONFIGS / "logging.conf"), **args)


def test_train_writes_checkpoints_events_landmarks_and_resumes(tmp_path, phantoms):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = tmp_path / "run"
    _train(root, phantoms, cache="disk")
    cached = sorted((root / "runs" / "cache").iterdir())
    assert len(cached) == 3  # the 2 training and 1 validation volumes, preprocessed
    models = root / "models"
    assert {"model.pt", "checkpoint_final.pt", "landmarks.json"} <= {p.name for p in models.iterdir()}
    events = EventAccumulator(str(root / "runs")).Reload()
    tags = events.Tags()
    assert {"loss/sct", "loss/seg", "loss/regularizer", "sfg/temperature", "val_dice", "val_psnr_hu"} <= set(tags["scalars"])
    assert "sfg/sfg.0/shared" in tags["scalars"]
    assert {"val/example_slices", "sfg_simplex/sfg.4"} <= set(tags["images"])
    assert set(torch.load(models / "model.pt", map_location="cpu")) == set(
        torch.load(models / "checkpoint_final.pt", map_location="cpu")["model"]
    )
    landmarks = (models / "landmarks.json").read_text()

    final = torch.load(models / "checkpoint_final.pt", map_location="cpu")
    assert final["trainer"]["iteration"] == 2 and final["trainer"]["epoch_length"] == 1
    # resume: optimizer, iteration and temperature continue; the landmarks file is reused
    _train(root, phantoms, resume_ckpt=str(models / "checkpoint_final.pt"), max_epochs=3, tau_rate=0.1, cache="disk")
    assert sorted((root / "runs" / "cache").iterdir()) == cached  # reused, not recomputed
    resumed = torch.load(models / "checkpoint_final.pt", map_location="cpu")
    assert resumed["trainer"]["iteration"] == 3 and resumed["trainer"]["max_epochs"] == 3
    assert resumed["optimizer"]["state"][0]["step"].item() == 3
    tau = resumed["model"]["layers.0.groups.tau"].item()
    assert tau == pytest.approx(max(0.1, float(torch.exp(torch.tensor(-0.1 * 2)))))  # set before iteration 3
    assert (models / "landmarks.json").read_text() == landmarks


# branched.json trains the tree that configs/affinity.json searched: tests/bundles/test_pelvis_branched.py
# selective_sharing.json: test_selective_sharing_variant_merges_only_when_a_single_cluster_is_allowed
@pytest.mark.parametrize("variant", sorted(p.name for p in (CONFIGS / "variants").glob("*.json") if p.name not in ("branched.json", "selective_sharing.json")))
def test_each_variant_trains(tmp_path, phantoms, variant):
    root = tmp_path / "run"
    extra = {"samples_per_volume": 3} if variant == "adashare.json" else {}  # AdaShare splits the patches 80/20
    _train(root, phantoms, CONFIGS / "variants" / variant, max_epochs=1, **extra)
    state = torch.load(root / "models" / "checkpoint_final.pt", map_location="cpu")
    config = json.loads((CONFIGS / "variants" / variant).read_text())
    learned = any(k.endswith("groups.theta") for k in state["model"])
    assert learned == (config.get("sharing", "sfg") == "sfg" and config.get("grouping") == "sfg")
    # the SFG paper's single-task, hard-sharing and cross-stitch baselines are the registered methods (A.4):
    # hard sharing is the full-width trunk; single-task and cross-stitch columns have half of every layer's
    # kernels (TINY["features"] halved), cross-stitch units after each of the five SFG layers' convolutions
    first = {"hard_sharing": "trunk.units.0.0.weight", "single_task": "columns.0.units.0.0.weight", "cross_stitch": "columns.0.units.0.0.weight"}
    sharing = config.get("sharing", "sfg")
    if sharing in first:
        widths = TINY["features"] if sharing == "hard_sharing" else [f // 2 for f in TINY["features"]]
        assert state["model"][first[sharing]].shape[0] == widths[0]
        assert sum(k.startswith("stitches.") for k in state["model"]) == (5 if sharing == "cross_stitch" else 0)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if torch.is_tensor(v) and v.is_floating_point())


def test_selective_sharing_variant_merges_only_when_a_single_cluster_is_allowed(tmp_path, phantoms):
    # two tasks: HDBSCAN never returns both branches as one cluster unless allowed to, so "merge or
    # not" is this switch, not the data (docs/README.md, "The paper's baselines")
    root = tmp_path / "run"
    _train(root, phantoms, CONFIGS / "variants" / "selective_sharing.json", max_epochs=1, selective_allow_single_cluster=True)
    record = json.loads((root / "models" / "selective_sharing.json").read_text())
    assert [r["groups"] for r in record["epochs"]] == [[record["task_names"]]]
    state = torch.load(root / "models" / "checkpoint_final.pt", map_location="cpu")
    assert state["model"]["branch_of_task"].tolist() == [0, 0]
    assert all(torch.isfinite(v).all() for v in state["model"].values() if torch.is_tensor(v) and v.is_floating_point())


def test_adashare_variant_searches_a_policy_then_retrains_and_infers_with_it(tmp_path, phantoms):
    """AdaShare on the medical pair (issue: a variant of the flagship bundle): the policy search
    writes its policy, the re-trained checkpoint carries it, and inference.json + the same variant
    runs the gated network deterministically on a test case."""
    import nibabel as nib
    import numpy as np

    root = tmp_path / "run"
    variant = CONFIGS / "variants" / "adashare.json"
    _train(root, phantoms, variant, max_epochs=2, samples_per_volume=3)
    policy = json.loads((root / "models" / "policy.json").read_text())
    table = torch.tensor(policy["policy"])
    assert table.shape == (2, 6) and set(table.unique().tolist()) <= {0, 1}  # sct/seg x 3 stages of 2 blocks
    state = torch.load(root / "models" / "model.pt", map_location="cpu")
    assert torch.equal(state["policy.policy"].bool(), table.bool())
    assert state["policy._extra_state"]["mode"] == "fixed"

    case = json.loads(phantoms.read_text())["test"][0]
    out = tmp_path / "out"
    bundle_run(
        config_file=[str(CONFIGS / "inference.json"), str(variant)], logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=str(root), datalist=str(phantoms), output_dir=str(out), features=TINY["features"],
        n4_shrink_factor=2, save_png=False, progress=False, num_samples=50,
    )
    mr = nib.load(phantoms.parent / case["mr"])
    (sct,) = out.rglob("*_sct.nii.gz")
    sct_std = nib.load(next(out.rglob("*_sct_std.nii.gz"))).get_fdata()
    assert nib.load(sct).shape == mr.shape and np.allclose(nib.load(sct).affine, mr.affine, atol=1e-5)
    assert np.all(sct_std == 0)  # a fixed policy is deterministic: no spread between passes


def test_a_registered_baseline_variant_infers_its_weights_with_zero_posterior_spread(tmp_path, phantoms):
    """The SFG paper's cross-stitch baseline is the registered, deterministic method: inference.json + the same
    variant builds it again (half-width columns), and its posterior samples (inference_mode "sample", the
    default; 4 here, 50 by default) are one network run that many times."""
    import nibabel as nib
    import numpy as np

    root = tmp_path / "run"
    variant = CONFIGS / "variants" / "cross_stitch.json"
    _train(root, phantoms, variant, max_epochs=1)
    out = tmp_path / "out"
    bundle_run(
        config_file=[str(CONFIGS / "inference.json"), str(variant)], logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=str(root), datalist=str(phantoms), output_dir=str(out), features=TINY["features"],
        n4_shrink_factor=2, save_png=False, progress=False, num_samples=4,
    )
    (sct,) = out.rglob("*_sct.nii.gz")
    assert np.isfinite(nib.load(sct).get_fdata()).all()
    assert np.all(nib.load(next(out.rglob("*_sct_std.nii.gz"))).get_fdata() == 0)


def test_bad_config_value_is_reported(tmp_path, phantoms):
    with pytest.raises(Exception) as info:
        _train(tmp_path / "run", phantoms, sharing="sgf")
    chain, err = [], info.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__
    assert any("unknown sharing 'sgf'" in msg for msg in chain)
    assert not (tmp_path / "run" / "models" / "model.pt").exists()


@pytest.mark.parametrize("variant", [None, "adashare.json"])
def test_two_process_ddp_ends_with_identical_weights(tmp_path, phantoms, variant):
    root = tmp_path / "run"
    dump = tmp_path / "dump.json"
    # appended to multi_gpu_train.json's own finalize (which must work on every rank)
    dump.write_text(json.dumps({"+finalize": ["$torch.save(@network_def.state_dict(), @output_dir + f\"/rank{os.environ['RANK']}.pt\")"]}))
    # AdaShare: its search shards both data splits, and skipped blocks need find_unused_parameters
    variants = [str(CONFIGS / "variants" / variant)] if variant else []
    files = [str(CONFIGS / "train.json"), *variants, str(CONFIGS / "multi_gpu_train.json"), str(dump)]
    overrides = {**TINY, "bundle_root": str(root), "datalist": str(phantoms), "samples_per_volume": 3 if variant else 2}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           "-m", "monai.bundle", "run", "--config_file", str(files)]
    for k, v in overrides.items():
        cmd += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(root / "runs" / "rank0.pt")
    b = torch.load(root / "runs" / "rank1.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    assert (root / "models" / "checkpoint_final.pt").exists()
    assert len(list((root / "runs").glob("events.out.tfevents*"))) == 1  # rank 0 logs alone
