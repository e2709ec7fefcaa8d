"""Every bundle as MONAI's own tools see it: ``ConfigWorkflow.check_properties`` for the inference and the train
workflow (MONAI's InferProperties / TrainProperties), ``verify_metadata`` against the 20240725 schema,
``verify_net_in_out`` on ``network_export_def`` with the metadata's channel counts, and ``ckpt_export`` of a
checkpoint, whose TorchScript gives what the eager export network gives. In-process (the command-line forms of
the same calls run in tests/bundles/test_readme_commands.py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.transforms import Compose

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "bundles"
SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
PELVIS_TINY = {"features": [4, 8, 8]}
# per bundle: the inference files over which network_export_def is defined, and the overrides that keep it tiny
SETS = {
    "sfg_highresnet_pelvis": (["inference.json"], PELVIS_TINY),
    "vision_multitask": (["train.json", "inference.json"], {"image_size": 16}),
    "dense_multitask": (["train.json", "inference.json"], {"width": 0.125, "head_hidden": 8}),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notes
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The data the train workflows read: a pelvis phantom datalist and a few synthetic scenes."""
    from mtl_med.pelvis.phantoms import generate_phantom, write_phantom

    root = tmp_path_factory.mktemp("tools")
    c = write_phantom(generate_phantom(3, shape=(16, 16, 4)), root / "case_0")
    item = {"mr": c["mr"], "ct": c["ct"], "label": c["label"]}
    (root / "datalist.json").write_text(json.dumps({"training": [item], "validation": [item], "test": [item]}))
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "data_prep.synthetic_scenes", "--out", str(root / "scenes"), "--n", "4",
                    "--val", "2", "--size", "16", "16"], check=True, cwd=REPO, capture_output=True)
    return root


def _data_overrides(bundle, kind, data, tmp_path):
    if bundle == "sfg_highresnet_pelvis":
        if kind == "inference":  # the demonstration landmarks (the preprocessing reads them)
            return {"datalist": str(data / "datalist.json"), "ckpt_dir": str(BUNDLES / bundle / "models" / "demo")}
        return {"datalist": str(data / "datalist.json"), "n4": False, "cache": None,
                "output_dir": str(tmp_path / "runs"), "ckpt_dir": str(tmp_path / "models")}
    if bundle == "dense_multitask":
        return {"data_root": str(data / "scenes"), "bundle_root": str(tmp_path)}
    return {"bundle_root": str(tmp_path)}


@pytest.mark.parametrize("bundle", sorted(SETS))
@pytest.mark.parametrize("kind", ["inference", "train"])
def test_check_properties(bundle, kind, data, tmp_path):
    configs = BUNDLES / bundle / "configs"
    files = ["train.json"] if kind == "train" else SETS[bundle][0]
    over = {"bundle_root": str(BUNDLES / bundle), **SETS[bundle][1], **_data_overrides(bundle, kind, data, tmp_path)}
    wf = ConfigWorkflow(config_file=[str(configs / f) for f in files], meta_file=str(configs / "metadata.json"),
                        workflow_type=kind, logging_file=False, **over)
    wf.initialize()
    torch.set_num_threads(1)
    assert wf.check_properties() == []
    assert wf.device is not None and wf.bundle_root
    if kind == "inference":
        assert isinstance(wf.network_def, torch.nn.Module)
        assert wf.inferer is not None and wf.evaluator is not None
        assert isinstance(wf.preprocessing, Compose) and isinstance(wf.postprocessing, Compose)
    else:
        assert wf.max_epochs >= 1 and len(wf.train_dataset) >= 1


@pytest.mark.parametrize("bundle", sorted(SETS))
def test_verify_metadata(bundle):
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(BUNDLES / bundle / "configs" / "metadata.json"), filepath=str(SCHEMA))


def _parser(bundle, tmp_path, **extra):
    configs = BUNDLES / bundle / "configs"
    files, tiny = SETS[bundle]
    parser = ConfigParser()
    parser.read_config([str(configs / f) for f in files])
    parser.read_meta(str(configs / "metadata.json"))
    parser.update({"bundle_root": str(tmp_path), "device": "$torch.device('cpu')", **tiny, **extra})
    return parser


@pytest.mark.parametrize("bundle", sorted(SETS))
def test_verify_net_in_out_and_ckpt_export(bundle, data, tmp_path):
    """The metadata's input and output channels are the export network's; ckpt_export writes a TorchScript
    of the checkpoint's weights."""
    from monai.bundle import ckpt_export, verify_net_in_out

    configs = BUNDLES / bundle / "configs"
    files, tiny = SETS[bundle]
    extra = {"data_root": str(data / "scenes")} if bundle == "dense_multitask" else {}
    over = {"bundle_root": str(tmp_path), **tiny, **extra}
    config_files = [str(configs / f) for f in files]
    verify_net_in_out(net_id="network_export_def", meta_file=str(configs / "metadata.json"),
                      config_file=config_files, device="cpu", **over)

    parser = _parser(bundle, tmp_path, **extra)
    net = parser.get_parsed_content("network_def")
    torch.manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # weights that a fresh network does not have
    torch.save(net.state_dict(), tmp_path / "model.pt")
    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_export_def", filepath=str(ts), ckpt_file=str(tmp_path / "model.pt"),
                meta_file=str(configs / "metadata.json"), config_file=config_files, **over)
    exported = torch.jit.load(str(ts))

    fmt = parser["_meta_"]["network_data_format"]
    c_in, c_out = fmt["inputs"]["image"]["num_channels"], fmt["outputs"]["pred"]["num_channels"]
    # the dense export keeps the size it was traced at (its heads upsample to a traced size): the metadata's
    size = {"sfg_highresnet_pelvis": [24, 20], "vision_multitask": [16, 16]}.get(
        bundle, fmt["inputs"]["image"]["spatial_shape"])
    from mtl_med.inference import ConcatTaskOutputs

    eager = ConcatTaskOutputs(net, parser.get_parsed_content("task_names")).eval()
    x = torch.rand(2, c_in, *size)
    with torch.no_grad():
        want = eager(x)
        got = exported(x)
    assert got.shape[1] == c_out
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)


# what monai.bundle.load(..., net_override={...}) does: create_workflow over train.json with network_def#<key> overrides
NET_OVERRIDES = {
    "sfg_highresnet_pelvis": {"features": [4, 8, 8]},
    "vision_multitask": {"width": 0.5},
    "dense_multitask": {"head_hidden": 4},
}


@pytest.mark.parametrize("bundle", sorted(SETS))
def test_net_override_reaches_the_network(bundle, data, tmp_path):
    from monai.bundle import create_workflow

    override = NET_OVERRIDES[bundle]
    configs = BUNDLES / bundle / "configs"
    extra = {"dense_multitask": {"data_root": str(data / "scenes")}, "vision_multitask": {},
             "sfg_highresnet_pelvis": {"datalist": str(data / "datalist.json"), "n4": False}}[bundle]
    sizes = []
    for net_override in ({}, override):
        wf = create_workflow(config_file=str(configs / "train.json"), workflow_type="train", logging_file=False,
                             bundle_root=str(tmp_path), **extra,
                             **{f"network_def#{k}": v for k, v in net_override.items()})
        torch.set_num_threads(1)
        net = wf.network_def
        assert isinstance(net, torch.nn.Module)
        sizes.append(sum(p.numel() for p in net.parameters()))
        for k, v in net_override.items():
            assert wf.parser[f"network_def::{k}"] == v
    assert sizes[0] != sizes[1]
