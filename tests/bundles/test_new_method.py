"""Adding a sharing method is one class and its registration: a toy method, defined here, trains through the
bundles' own train.json (the vision bundle's default and the pelvis bundle, whose base config is SFG's)
with no change to any config but ``sharing``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.bundle import run as bundle_run
from torch import nn

from mtl_med.pelvis.phantoms import generate_dataset
from mtl_med.networks.blocks import Trunk
from mtl_med.sharing import METHODS, MultiTaskNetwork, register

REPO = Path(__file__).resolve().parents[2]


class GainSharing(MultiTaskNetwork):
    """One shared trunk whose features each task scales by its own learned gain."""

    name = "toy_gain_sharing"

    def __init__(self, backbone, task_names, heads, bn_inference: str = "population"):
        super().__init__(backbone, task_names, heads, bn_inference)
        self.trunk = Trunk(backbone)
        self.gain = nn.Parameter(torch.ones(self.num_tasks))

    def task_features(self, x, task, generator=None):
        y = self.trunk(x)
        if task is None:
            return [y * g for g in self.gain]
        if isinstance(task, int):
            return y * self.gain[task]
        return y * self.gain[task].reshape(-1, *[1] * (y.ndim - 1))


@pytest.fixture
def registered():
    register(GainSharing)
    try:
        yield GainSharing
    finally:
        METHODS.pop(GainSharing.name, None)


def test_register_refuses_what_is_not_a_method_and_names_taken():
    with pytest.raises(TypeError):
        register(nn.Linear)
    with pytest.raises(ValueError, match="already registered"):
        register(type("Other", (GainSharing,), {"name": "hard_sharing"}))


def test_a_registered_method_trains_through_the_vision_bundle(registered, tmp_path):
    bundle = REPO / "bundles" / "vision_multitask"
    wf = ConfigWorkflow(
        config_file=str(bundle / "configs" / "train.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        bundle_root=str(tmp_path),
        sharing=registered.name,
        image_size=16, batch_size=16, val_batch_size=64, max_epochs=1, epoch_length=2, val_epoch_length=1,
    )
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wf.initialize()
        wf.run()
        wf.finalize()
    finally:
        torch.set_num_threads(n)
    net = wf.parser.get_parsed_content("network_def")
    assert isinstance(net, GainSharing) and net.backbone_name == "vgg11_bn"
    assert wf.parser.get_parsed_content("train#trainer").state.iteration == 2
    state = torch.load(tmp_path / "models" / "model_final.pt", map_location="cpu", weights_only=True)
    assert "gain" in state["model"] and not torch.equal(state["model"]["gain"], torch.ones(net.num_tasks))


def test_a_registered_method_trains_through_the_pelvis_bundles_sfg_base_config(registered, tmp_path):
    # train.json's SFG settings (sharing_args, sharing_handler_args) are keyed by method: the toy gets none
    configs = REPO / "bundles" / "sfg_highresnet_pelvis" / "configs"
    data = tmp_path / "phantoms"
    generate_dataset(data, 3, seed=3, shape=(24, 24, 4), val_fraction=0.34, test_fraction=0.0)
    root = tmp_path / "run"
    bundle_run(
        config_file=[str(configs / "train.json")], logging_file=str(configs / "logging.conf"),
        bundle_root=str(root), datalist=str(data / "datalist.json"), n4_cache_dir=str(tmp_path / "n4"), sharing=registered.name,
        features=[4, 8, 8], patch_size=[16, 16], padded_size=[24, 24], batch_size=2, samples_per_volume=1, max_epochs=1,
        val_interval=1, log_interval=1, n4_shrink_factor=2,
    )
    state = torch.load(root / "models" / "checkpoint_final.pt", map_location="cpu")
    assert "gain" in state["model"] and not any("groups" in k for k in state["model"])
