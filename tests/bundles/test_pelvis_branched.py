"""Branched MTN (Vandenhende et al., Algorithm 1) in the pelvis bundle, end to end on tiny phantoms:
configs/affinity.json trains the single-task HighResNets, measures their affinity on axial slices of
the validation volume and searches the tree; the branched variant trains that tree; inference.json
with the same variant runs it on a test case."""

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import run as bundle_run

from mtl_med.pelvis.phantoms import generate_dataset

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "sfg_highresnet_pelvis"
CONFIGS = BUNDLE / "configs"
VARIANT = CONFIGS / "variants" / "branched.json"
TINY = {  # every value is a config id of train.json; one epoch of one iteration per run
    "features": [4, 8, 8],
    "patch_size": [24, 24],
    "padded_size": [32, 32],
    "batch_size": 2,
    "samples_per_volume": 1,
    "max_epochs": 1,
    "val_interval": 1,
    "log_interval": 1,
    "n4_shrink_factor": 2,
}
K = 8  # held-out slices: every axial slice of the validation phantom


def _messages(exc: BaseException) -> str:
    out = []
    while exc is not None:
        out.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(out)


def _run(root, datalist, *configs, **overrides):
    files = [str(CONFIGS / "train.json"), *[str(c) for c in configs]]
    args = {**TINY, "bundle_root": str(root), "datalist": str(datalist), "n4_cache_dir": str(root / "n4_cache"), **overrides}
    bundle_run(config_file=files, logging_file=str(CONFIGS / "logging.conf"), **args)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    generate_dataset(root, 4, seed=3, shape=(32, 32, 8), val_fraction=0.25, test_fraction=0.25)
    return root / "datalist.json"


@pytest.fixture(scope="module")
def branched(tmp_path_factory, phantoms):
    """Both stages on one bundle root: affinity.json, then train.json + variants/branched.json."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread avoids contention on a busy machine
    try:
        root = tmp_path_factory.mktemp("branched")
        # two iterations per single-task network: enough for their features to drift apart a little
        _run(root, phantoms, CONFIGS / "affinity.json", encoder_config=[str(CONFIGS / "train.json"), str(CONFIGS / "affinity_encoder.json")], affinity_images=K,
             samples_per_volume=2)
        _run(root, phantoms, VARIANT)
        yield root
    finally:
        torch.set_num_threads(n)


def test_held_out_slices_are_seeded_slices_of_one_size():
    from mtl_med.sharing.branched import held_out_slices

    volumes = [{"mr": torch.arange(2 * 5 * 3 * 4.0).reshape(2, 5, 3, 4)}, {"mr": torch.ones(2, 7, 9, 6)}]
    x = held_out_slices(volumes, num_images=7, seed=1, size=(4, 4))
    assert x.shape == (7, 2, 4, 4) and x.dtype == torch.float32  # 7 of the 4 + 6 axial slices
    assert torch.equal(x, held_out_slices(volumes, num_images=7, seed=1, size=(4, 4)))
    assert not torch.equal(x, held_out_slices(volumes, num_images=7, seed=2, size=(4, 4)))
    first = held_out_slices(volumes[:1], num_images=4, size=(4, 4))  # all 4 slices of the first volume, in order
    for d in range(4):  # 5 x 3 brought to 4 x 4 (MONAI's centring): the last row cropped, a column of zeros padded
        assert torch.equal(first[d, :, :, :3], volumes[0]["mr"][:, :4, :, d]) and not first[d, :, :, 3].any()


def test_affinity_writes_single_task_networks_affinity_tree_and_figures(branched):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mtl_med.sharing.branched import load_affinity, load_tree_json

    affinity = branched / "affinity"
    for task in ("sct", "seg"):  # one plain HighResNet per task, only that task's loss
        state = torch.load(affinity / "single_task" / task / "checkpoint_final.pt", map_location="cpu")["model"]
        assert not any("groups" in k for k in state)  # hard sharing, no SFG layers
    a = load_affinity(affinity / "affinity.npz")
    assert a.affinity.shape == (4, 2, 2) and a.num_images == K  # the 4 HighResNet blocks after the stem
    assert a.location_names == ["block1", "block2", "block3", "block4"]
    assert (a.affinity[:, [0, 1], [0, 1]] == 1).all() and abs(a.affinity).max() <= 1
    tree = load_tree_json(affinity / "tree.json")
    assert tree["task_names"] == ["sct", "seg"] and tree["search"] == "exhaustive"
    assert len(tree["config"]) == 4 and tree["params"] <= tree["budget"]
    assert {"affinity.png", "tree.png", "pareto.png"} <= {p.name for p in affinity.iterdir()}
    images = EventAccumulator(str(branched / "runs")).Reload().Tags()["images"]
    assert {"branched/affinity", "branched/tree", "branched/pareto"} <= set(images)


def test_branched_variant_trains_the_tree_of_tree_json(branched):
    from mtl_med.build import build_network
    from mtl_med.sharing.branched import load_tree_json

    tree = load_tree_json(branched / "affinity" / "tree.json")
    state = torch.load(branched / "models" / "checkpoint_final.pt", map_location="cpu")["model"]
    assert state["tree"].tolist() == tree["config"]
    net = build_network("highresnet", "branched", ["sct", "seg"], [1, 6], spatial_dims=2, in_channels=1,
                        features=TINY["features"], tree=tree["config"])
    net.load_state_dict(state)
    assert sum(p.numel() for p in net.parameters()) == tree["params"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_inference_runs_the_branched_checkpoint_on_the_input_grid(branched, phantoms, tmp_path):
    import nibabel as nib
    import numpy as np

    out = tmp_path / "out"
    bundle_run(
        config_file=[str(CONFIGS / "inference.json"), str(VARIANT)], logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=str(branched), datalist=str(phantoms), output_dir=str(out), features=TINY["features"],
        n4_shrink_factor=2, save_png=False, progress=False,
    )
    case = json.loads(phantoms.read_text())["test"][0]
    mr = nib.load(phantoms.parent / case["mr"])
    for name in ("sct", "seg"):
        (path,) = out.rglob(f"*_{name}.nii.gz")
        assert nib.load(path).shape == mr.shape and np.allclose(nib.load(path).affine, mr.affine, atol=1e-5)
    assert np.all(nib.load(next(out.rglob("*_sct_std.nii.gz"))).get_fdata() == 0)  # one deterministic pass


def test_branched_variant_without_a_tree_says_what_to_run(tmp_path, phantoms):
    with pytest.raises(Exception) as info:
        _run(tmp_path / "run", phantoms, VARIANT)
    message = _messages(info.value)
    assert str(tmp_path / "run" / "affinity" / "tree.json") in message and "affinity.json" in message
