"""Multi-task ResNet: one class for hard sharing, task routing and AdaShare; TaskRoutingVGG."""

import pytest
import torch

from mtl_med.layers.task_routing import TaskRouting
from mtl_med.losses import MultiTaskLoss
from mtl_med.networks.resnet import ResNet, resnet18, resnet34
from mtl_med.networks.vgg import TaskRoutingVGG

TINY = dict(widths=(4, 8), layers=(1, 2), conv1_t_size=3, conv1_t_stride=1, no_max_pool=True)


@pytest.mark.parametrize("sharing", ["hard", "routing", "adashare"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_output_dict_for_every_sharing_mode(sharing, spatial_dims):
    net = ResNet(spatial_dims, 2, ["age", "gender"], out_channels={"age": 1, "gender": 2}, sharing=sharing, **TINY)
    x = torch.randn(2, 2, *([8] * spatial_dims))
    out = net(x)
    assert net.task_names == ["age", "gender"]
    assert out["age"].shape == (2, 1) and out["gender"].shape == (2, 2)
    assert list(net(x, "gender")) == ["gender"]
    reg = net.regularizer()
    assert reg.ndim == 0 and float(reg) == 0.0  # AdaShare starts in warm-up: no policy loss


def test_block_counts_of_resnet18_and_34():
    assert resnet18(task_names=["a", "b"], widths=(2, 2, 2, 2)).num_blocks == 8
    assert resnet34(task_names=["a", "b"], widths=(2, 2, 2, 2), sharing="adashare").policy.num_blocks == 16


def _plain_and_adashare():
    torch.manual_seed(0)
    plain = ResNet(2, 1, ["a", "b"], sharing="hard", **TINY).eval()
    ada = ResNet(2, 1, ["a", "b"], sharing="adashare", **TINY).eval()
    missing, unexpected = ada.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("policy.") for k in missing)
    return plain, ada


def test_policy_selecting_every_block_reproduces_the_plain_resnet():
    plain, ada = _plain_and_adashare()
    ada.policy.set_policy(torch.ones(2, ada.num_blocks, dtype=torch.bool))
    x = torch.randn(3, 1, 8, 8)
    ref = plain(x)
    assert all(torch.equal(ada(x)[n], ref[n]) for n in ref)  # the same kernels on the same batch
    # per-example ids: tensor gates 1 * block + 0 * shortcut on the same batch give the same features
    # bit for bit, but the heads then run as a per-example einsum (batched matmul) instead of F.linear
    # (addmm): other kernels, whose bits are not promised to match
    ids = torch.tensor([0, 1, 0])
    assert torch.equal(ada.features(x, ids, ada.policy.gates()), plain.features(x))
    out = ada(x, ids)
    torch.testing.assert_close(out["a"], ref["a"][[0, 2]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["b"], ref["b"][[1]], rtol=1e-5, atol=1e-6)


def test_policy_selecting_no_block_leaves_only_identity_and_downsample_paths():
    _, ada = _plain_and_adashare()
    ada.policy.set_policy(torch.zeros(2, ada.num_blocks, dtype=torch.bool))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        y = ada.maxpool(ada.act(ada.bn1(ada.conv1(x))))
        for block in ada.blocks:
            y = block.downsample(y) if block.downsample is not None else y
        feats = torch.flatten(ada.pool(y), 1)
        expected = ada.heads(feats, 1)
        assert torch.equal(ada(x, 1)["b"], expected)
        # soft gates of exactly zero (per-example path) agree
        assert torch.allclose(ada(x, torch.tensor([1, 1, 1]))["b"], expected)


def test_fixed_policy_skips_block_computation_for_one_task():
    _, ada = _plain_and_adashare()
    policy = torch.ones(2, ada.num_blocks, dtype=torch.bool)
    policy[0, 1] = False
    ada.policy.set_policy(policy)
    calls = []
    ada.blocks[1].conv1.register_forward_hook(lambda *a: calls.append(1))
    ada(torch.randn(1, 1, 8, 8), 0)
    assert calls == []
    ada(torch.randn(1, 1, 8, 8), 1)
    assert calls == [1]


def test_adashare_learn_mode_is_soft_and_seeded():
    torch.manual_seed(0)
    net = ResNet(2, 1, ["a", "b"], sharing="adashare", **TINY).train()
    net.policy.set_mode("learn")
    g = net.policy.gates(torch.Generator().manual_seed(0))
    assert g.shape == (2, net.num_blocks) and ((g > 0) & (g < 1)).all()
    assert torch.equal(g, net.policy.gates(torch.Generator().manual_seed(0)))
    x = torch.randn(2, 1, 8, 8)
    net.eval()  # batch-norm statistics fixed; gates still sampled when train() is on the policy
    net.policy.train()
    a = net(x, generator=torch.Generator().manual_seed(1))
    b = net(x, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert float(net.regularizer().detach()) != 0.0


def test_multitask_loss_adds_the_policy_regulariser():
    torch.manual_seed(0)
    net = ResNet(2, 1, ["a", "b"], sharing="adashare", **TINY)
    net.policy.set_mode("learn")
    loss = MultiTaskLoss({"a": torch.nn.MSELoss(), "b": torch.nn.MSELoss()}, weights={"a": 1.0, "b": 20.0})
    out = net(torch.randn(2, 1, 8, 8))
    total, terms = loss(out, {"a": torch.zeros(2, 1), "b": torch.zeros(2, 1)}, model=net)
    assert torch.allclose(total, terms["a"] + 20 * terms["b"] + terms["regularizer"])
    total.backward()
    assert net.policy.logits.grad.abs().sum() > 0


def test_policy_mode_and_tau_travel_in_state_dict():
    net = ResNet(2, 1, ["a", "b"], sharing="adashare", **TINY)
    net.policy.set_mode("learn")
    net.policy.set_tau(1.25)
    net.policy.set_num_learnable(1)
    other = ResNet(2, 1, ["a", "b"], sharing="adashare", **TINY)
    other.load_state_dict(net.state_dict())
    assert other.policy.mode == "learn" and other.policy.num_learnable == 1 and float(other.policy.tau) == 1.25


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="sharing"):
        ResNet(sharing="soft")
    with pytest.raises(ValueError, match="spatial_dims"):
        ResNet(spatial_dims=1)
    net = ResNet(2, 1, ["a", "b"], **TINY)
    with pytest.raises(KeyError):
        net(torch.randn(1, 1, 8, 8), "c")
    with pytest.raises(IndexError):
        net(torch.randn(1, 1, 8, 8), 2)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_task_routing_vgg(spatial_dims):
    torch.manual_seed(0)
    net = TaskRoutingVGG(spatial_dims, 1, ["a", "b", "c"], depth=11, width=1 / 16, sigma=0.0, act="prelu")
    routers = [m for m in net.modules() if isinstance(m, TaskRouting)]
    assert len(routers) == 8  # every convolution of VGG-11
    x = torch.randn(2, 1, *([8] * spatial_dims))
    out = net(x)
    assert set(out) == {"a", "b", "c"} and out["a"].shape == (2, 1)
    net(x, 1)["b"].sum().backward()
    first = net.layers[0]
    masked = ~first["route"].masks[1]
    assert masked.any() and torch.all(first["conv"].weight.grad[masked] == 0)
    assert float(net.regularizer()) == 0.0
