"""Hard parameter sharing: one trunk for every task, one head per task; the common forward's task selection."""

import pytest
import torch

from mtl_med.build import build_network
from mtl_med.sharing import HardSharing

RESNET = dict(widths=(4, 4, 8, 8), conv1_t_size=3, conv1_t_stride=1, no_max_pool=True)


def _net(tasks=("a", "b"), out=1, dims=2, backbone="resnet18", **kw):
    torch.manual_seed(0)
    small = RESNET if backbone == "resnet18" else dict(features=(4, 6, 8))
    return build_network(backbone, "hard_sharing", list(tasks), out, spatial_dims=dims, in_channels=1, **{**small, **kw})


@pytest.mark.parametrize("dims", [2, 3])
def test_output_dict_and_task_selection(dims):
    net = _net(["age", "gender"], {"age": 1, "gender": 2}, dims)
    assert isinstance(net, HardSharing) and net.task_names == ["age", "gender"]
    x = torch.randn(2, 1, *([8] * dims))
    out = net(x)
    assert list(out) == ["age", "gender"] and out["age"].shape == (2, 1) and out["gender"].shape == (2, 2)
    assert list(net(x, "gender")) == ["gender"] and list(net(x, 1)) == ["gender"]
    assert list(net(x, torch.tensor(0))) == ["age"]  # a 0-d tensor is one task
    reg = net.regularizer()
    assert reg.ndim == 0 and float(reg) == 0.0


def test_dense_outputs_on_highresnet():
    net = _net(["sct", "seg"], (1, 3), backbone="highresnet")
    out = net(torch.randn(2, 1, 8, 8))
    assert out["sct"].shape == (2, 1, 8, 8) and out["seg"].shape == (2, 3, 8, 8)


def test_the_trunk_runs_once_for_every_task():
    net = _net(["a", "b", "c"]).eval()
    calls = []
    net.trunk.units[0].register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 1, 8, 8)
    out = net(x)
    assert calls == [1]
    feats = net.task_features(x, None)
    assert len(feats) == 3 and feats[0] is feats[1] is feats[2]
    for k, name in enumerate(net.task_names):
        assert torch.equal(out[name], net.heads(net.trunk(x), k))


def test_every_task_trains_the_whole_trunk_and_only_its_own_head():
    net = _net(["a", "b"], 2)
    net(torch.randn(2, 1, 8, 8), "b")["b"].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in net.trunk.named_parameters() if n.endswith("0.0.weight"))
    assert all(torch.all(w.grad[0] == 0) and w.grad[1].abs().sum() > 0 for w in net.heads.weights)


def test_bad_task_selections_raise():
    net = _net(["a", "b"])
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(KeyError):
        net(x, "c")
    with pytest.raises(IndexError):
        net(x, 2)
    with pytest.raises(IndexError):
        net(x, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="shape"):
        net(x, torch.tensor([0, 1, 1]))
    with pytest.raises(TypeError):
        net(x, torch.tensor([0.0, 1.0]))


def test_task_names_must_be_unique_and_present():
    for names in ([], ["a", "a"]):
        with pytest.raises(ValueError, match="task"):
            _net(names)
