"""Exports of the bundles' one-tensor networks (``network_export_def``): TorchScript through MONAI's
``ckpt_export`` (scripted and traced) and ONNX through ``onnx_export``, at any batch size and slice size, equal to
the eager network; the vision bundle's export network as well."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl_med.inference import ConcatTaskOutputs
from mtl_med.inference import ExportNetwork
from mtl_med.build import sfg_highresnet

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "sfg_highresnet_pelvis" / "configs"
VISION = REPO / "bundles" / "vision_multitask" / "configs"
TINY = [4, 8, 8]
SHAPES = [(1, 1, 24, 24), (3, 1, 24, 24), (4, 1, 20, 28)]  # batch 1, 3, 4 and two slice sizes


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's and the ONNX exporter's deprecation notes
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint whose group logits differ from a fresh network's, so that an export that kept the weights
    it was built with (rather than the checkpoint's) would give other group assignments."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(1)
    net = sfg_highresnet(features=TINY)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("groups.theta"):
                p.copy_(torch.randn_like(p) * 3)
    torch.save(net.state_dict(), root / "model.pt")
    return root, ConcatTaskOutputs(net, mode="argmax").eval()


def _check(fn, ref):
    for shape in SHAPES:
        x = torch.randn(*shape)
        with torch.no_grad():
            want = ref(x)
        got = fn(x)
        assert tuple(got.shape) == (shape[0], 7, *shape[2:])
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-4, atol=1e-5, err_msg=str(shape))


@pytest.mark.parametrize("use_trace", [False, True])
def test_ckpt_export_any_batch_and_slice_size(trained, tmp_path, use_trace):
    from monai.bundle import ckpt_export

    root, ref = trained
    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_export_def", filepath=str(ts), ckpt_file=str(root / "model.pt"),
                meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "inference.json"),
                features=TINY, use_trace=use_trace, input_shape=[1, 1, 24, 24])
    exported = torch.jit.load(str(ts))
    _check(lambda x: exported(x).detach().numpy(), ref)


def test_onnx_export_any_batch_and_slice_size(trained, tmp_path):
    """``python -m monai.bundle run onnx_export --config_file configs/inference.json`` (run in-process here)."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from monai.bundle import ConfigParser

    root, ref = trained
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update({"bundle_root": str(tmp_path), "features": TINY, "ckpt_path": str(root / "model.pt"),
                   "onnx_file": str(tmp_path / "model.onnx"), "device": "cpu"})
    parser.get_parsed_content("onnx_export")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # onnxruntime's notes about renaming the loop's implicit inputs
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    _check(lambda x: sess.run(None, {"image": x.numpy()})[0], ref)


def test_export_network_follows_the_weights_it_loads(trained):
    _, ref = trained
    fresh = ExportNetwork(sfg_highresnet(features=TINY), example_shape=[1, 1, 24, 24])
    x = torch.randn(2, 1, 24, 24)
    with torch.no_grad():
        assert not torch.allclose(fresh(x), ref(x))
        fresh.load_state_dict(ref.network.state_dict())
        np.testing.assert_allclose(fresh(x).numpy(), ref(x).numpy(), rtol=1e-4, atol=1e-5)
        own = {k: v.clone() for k, v in fresh.state_dict().items()}  # keys under each.single.network.: loads back
        fresh.load_state_dict({k: torch.zeros_like(v) if k.endswith("heads.0.bias") else v for k, v in own.items()})
        assert not torch.allclose(fresh(x), ref(x))
        fresh.load_state_dict(own)
        np.testing.assert_allclose(fresh(x).numpy(), ref(x).numpy(), rtol=1e-4, atol=1e-5)


def test_vision_bundle_export_network(tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(VISION / "train.json"), str(VISION / "inference.json")])
    parser["bundle_root"] = str(tmp_path)
    parser["output_dir"] = str(tmp_path / "out")
    net = parser.get_parsed_content("network_export_def")
    scripted = torch.jit.script(net)
    eager = ConcatTaskOutputs(parser.get_parsed_content("network_def"), parser["task_names"] if isinstance(
        parser["task_names"], list) else parser.get_parsed_content("task_names")).eval()
    c, s = parser.get_parsed_content("in_channels"), parser.get_parsed_content("image_size")
    for b in (1, 3, 4):
        x = torch.rand(b, c, s, s)
        with torch.no_grad():
            np.testing.assert_allclose(scripted(x).numpy(), eager(x).numpy(), rtol=1e-4, atol=1e-5)
