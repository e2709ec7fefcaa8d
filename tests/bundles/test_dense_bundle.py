"""The dense multi-task bundle (bundles/dense_multitask) on synthetic scenes: every variant trains a few iterations
and writes a checkpoint; evaluation writes per-task metrics with delta-m; inference writes per-task predictions;
TensorBoard holds the per-task losses, metrics and images. Workflows run in this process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.synthetic_scenes import generate

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "dense_multitask"
VARIANTS = sorted(p.stem for p in (BUNDLE / "configs" / "variants").glob("*.json"))
SIZE = 16
# tiny and fast: 16x16 scenes, narrow networks, 2 iterations, 1 validation batch
FAST = dict(batch_size=4, val_batch_size=4, max_epochs=1, epoch_length=2, val_epoch_length=1, warmup_epochs=1, policy_epochs=1,
            width=0.0625, head_hidden=4)


def run(configs, bundle_root, **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[str(BUNDLE / "configs" / c) for c in configs], meta_file=str(BUNDLE / "configs" / "metadata.json"),
                        logging_file=False, workflow_type=None, bundle_root=str(bundle_root), **overrides)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    generate(root, 8, 4, seed=0, height=SIZE, width=SIZE)
    return root


def _train(root, variant, scenes):
    if variant == "branched":  # Branched MTN's two stages: single-task encoders, affinity and tree; then the tree
        run(["train.json", "affinity.json"], root, data_root=str(scenes), encoder_config=[str(BUNDLE / "configs" / "train.json")],
            affinity_images=3, **FAST)
    return run(["train.json", f"variants/{variant}.json"], root, data_root=str(scenes), **FAST)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, scenes):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread avoids contention on a busy machine
    root = tmp_path_factory.mktemp("dense_bundle")
    out = {v: (root / v, _train(root / v, v, scenes)) for v in VARIANTS}
    yield out
    torch.set_num_threads(n)


def test_variants_cover_the_sharing_methods():
    assert set(VARIANTS) >= {"hard_sharing", "single_task", "cross_stitch", "sfg", "task_routing", "adashare", "branched",
                             "selective_sharing"}


def test_branched_trains_the_tree_its_affinity_stage_found(trained):
    """affinity.json trains one single-task encoder per task with the bundle's recipe, measures the affinity on the
    validation scenes and searches the tree; the branched variant then builds that tree."""
    root, wf = trained["branched"]
    aff = root / "affinity"
    for task in ("seg", "depth", "normal"):
        assert (aff / "single_task" / task / "model_final.pt").is_file(), task
    tree = json.loads((aff / "tree.json").read_text())
    A = np.load(aff / "affinity.npz")["affinity"]
    assert A.shape == (4, 3, 3) and np.allclose(A, A.transpose(0, 2, 1)) and np.allclose(A[:, range(3), range(3)], 1)
    assert tree["task_names"] == ["seg", "depth", "normal"] and tree["params"] <= tree["budget"]
    assert wf.parser.get_parsed_content("network_def").config == tree["config"]
    assert all((aff / f).is_file() for f in ("affinity.png", "tree.png"))


def test_branched_without_a_tree_says_to_run_the_affinity_stage(tmp_path, scenes):
    from mtl_med.errors import InputError, user_error

    with pytest.raises(Exception) as err:
        run(["train.json", "variants/branched.json"], tmp_path, data_root=str(scenes), **FAST)
    e = user_error(err.value)
    assert isinstance(e, InputError) and "affinity.json" in str(e) and str(tmp_path / "affinity" / "tree.json") in str(e)


def test_selective_sharing_records_its_groups_and_keeps_the_dense_heads(trained):
    root, wf = trained["selective_sharing"]
    net = wf.parser.get_parsed_content("network")
    from mtl_med.networks.dense_heads import ASPPHeads

    assert isinstance(net.heads, ASPPHeads) and net.pool is None
    record = json.loads((root / "eval" / "selective_sharing.json").read_text())
    assert record["epochs"] and {"seg", "depth", "normal"} == {t for g in record["epochs"][-1]["groups"] for t in g}


def test_each_variant_trains_a_few_iterations_and_writes_a_checkpoint(trained):
    for variant, (root, wf) in trained.items():
        trainer = wf.parser.get_parsed_content("train#trainer")
        assert trainer.state.iteration == FAST["epoch_length"], variant
        assert math.isfinite(float(trainer.state.output["loss"])), variant
        # Task Routing trains one task per mini-batch (its algorithm 1), the others every task at once
        assert len(set(trainer.state.output["terms"]) & {"seg", "depth", "normal"}) == (1 if variant == "task_routing" else 3), variant
        assert (root / "models" / "model.pt").is_file() and (root / "models" / "model_final.pt").is_file(), variant
        net = wf.parser.get_parsed_content("network")
        assert all(torch.isfinite(v).all() for v in net.state_dict().values() if torch.is_tensor(v) and v.is_floating_point()), variant
    # a checkpoint restores the network it was written from (weights-only loading is slow: one is enough)
    root, wf = trained["cross_stitch"]
    state = torch.load(root / "models" / "model_final.pt", map_location="cpu", weights_only=True)["model"]
    from mtl_med.build import build_network

    build_network(**wf.parser.get_parsed_content("network_def").build_args).load_state_dict(state)
    assert trained["sfg"][1].parser.get_parsed_content("network_def").name == "sfg"


def test_tensorboard_has_losses_metrics_and_images_per_task(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained["hard_sharing"][0] / "eval" / "tensorboard")).Reload()
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    assert {"loss/seg", "loss/depth", "loss/normal", "seg/miou", "depth/abs_err", "normal/median_error", "val_score"} <= scalars
    assert {"val/input"} | {f"val/{t}/{k}" for t in ("seg", "depth", "normal") for k in ("pred", "target")} <= images


def test_evaluate_with_delta_m_and_inference_writes_per_task_predictions(trained, scenes):
    base, root = trained["single_task"][0], trained["hard_sharing"][0]
    run(["train.json", "variants/single_task.json", "evaluate.json"], base, data_root=str(scenes), **FAST)
    run(["train.json", "variants/hard_sharing.json", "evaluate.json"], root, data_root=str(scenes),
        baseline_file=str(base / "eval" / "metrics.json"), **FAST)
    summary = json.loads((root / "eval" / "metrics.json").read_text())
    assert set(summary["tasks"]) == {"seg", "depth", "normal"} and "miou" in summary["tasks"]["seg"]
    assert summary["delta_m"] is None or math.isfinite(summary["delta_m"])
    assert summary["parameters"] < json.loads((base / "eval" / "metrics.json").read_text())["parameters"]
    run(["train.json", "variants/hard_sharing.json", "inference.json"], root, data_root=str(scenes), **FAST)
    pred = root / "eval" / "predictions"
    assert np.load(pred / "seg" / "3.npy").shape == (SIZE, SIZE)
    normal = np.load(pred / "normal" / "0.npy")
    assert normal.shape == (SIZE, SIZE, 3) and np.allclose(np.linalg.norm(normal, axis=-1), 1, atol=1e-4)
    assert np.load(pred / "depth" / "0.npy").shape == (SIZE, SIZE) and (pred / "depth" / "0.png").is_file()


def test_inference_on_a_folder_of_the_users_images(trained, scenes, tmp_path):
    """dataset_dir: PNG files of any size read with LoadImaged; predictions named after the files, at their size."""
    from PIL import Image

    root = trained["hard_sharing"][0]
    images = tmp_path / "mine"
    images.mkdir()
    for i, size in enumerate([(SIZE, SIZE), (24, 16)]):
        rgb = (np.load(scenes / "val" / "image" / f"{i}.npy") * 255).astype(np.uint8)
        Image.fromarray(rgb).resize(size).save(images / f"room.{i}.png")
    out = tmp_path / "out"
    run(["train.json", "variants/hard_sharing.json", "inference.json"], root, data_root=str(scenes),
        dataset_dir=str(images), output_dir=str(out), **{**FAST, "val_epoch_length": None})
    pred = out / "predictions"
    assert np.load(pred / "seg" / "room.0.npy").shape == (SIZE, SIZE)
    assert np.load(pred / "depth" / "room.1.npy").shape == (16, 24)  # rows, columns of the 24 x 16 image
    normal = np.load(pred / "normal" / "room.1.npy")
    assert normal.shape == (16, 24, 3) and np.allclose(np.linalg.norm(normal, axis=-1), 1, atol=1e-4)


def test_missing_synthetic_data_says_how_to_make_it(tmp_path):
    from mtl_med.data.dense import DenseFileNotFoundError

    with pytest.raises(Exception) as err:
        run(["train.json"], tmp_path, data_root=str(tmp_path / "none"), **FAST)
    e = err.value
    while e is not None and not isinstance(e, DenseFileNotFoundError):
        e = e.__cause__ or e.__context__
    assert e is not None and "python -m data_prep.synthetic_scenes" in str(e)
