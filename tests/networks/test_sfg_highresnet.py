import json

import pytest
import torch

from mtl_med.networks import SFGHighResNet

SMALL = dict(features=(4, 8, 8))  # the published widths are (16, 32, 64); tests keep them small


def _fix_random_assignment(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _, layer in model.sfg_layers():
        k, groups = layer.out_channels, layer.num_tasks + 1
        idx = torch.arange(k) % groups  # every group non-empty
        layer.groups.fix(idx[torch.randperm(k, generator=g)])


def _task_params(model, t):
    """Parameters that belong to filter group t (task t, or the shared group for t = T)."""
    yield from (p for layer in model.sfg for p in layer.post[t].parameters())
    yield from (p for stage in model.towers for p in stage[t].parameters())
    if t < model.num_tasks:
        yield from (p for layer in model.sfg if layer.merges is not None for p in layer.merges[t].parameters())
        yield from model.heads[t].parameters()


@pytest.mark.parametrize("task", [0, 1])
def test_gradient_isolation(task):
    """Fig. 4: the loss of one task gives exactly zero gradient to the other task's group
    (its kernels, batch-norms, residual tower, merge and head) and non-zero gradient to G_s."""
    torch.manual_seed(0)
    model = SFGHighResNet(**SMALL).train()
    _fix_random_assignment(model)
    out = model(torch.randn(2, 1, 16, 16))
    loss = out[model.task_names[task]].pow(2).mean()
    loss.backward()
    other, shared = 1 - task, model.num_tasks
    for _, layer in model.sfg_layers():
        assignment = layer.groups.assignment.argmax(-1)
        grad = layer.conv.weight.grad
        assert grad[assignment == other].abs().max() == 0
        assert grad[assignment == shared].abs().sum() > 0
        assert grad[assignment == task].abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in _task_params(model, other))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.towers[0][shared].parameters())


def test_hard_sharing_is_a_plain_shared_trunk_with_task_heads():
    torch.manual_seed(0)
    model = SFGHighResNet(sharing="hard_sharing", **SMALL)
    for m in model.modules():  # non-trivial batch-norm statistics for eval mode
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.normal_()
            m.bias.data.normal_()
    model.eval()
    x = torch.randn(2, 1, 16, 16)
    s = model.num_tasks

    def trunk(layer, y):
        return layer.post[s](layer.conv(y))

    y = trunk(model.sfg[0], x)
    for stage, layer in zip(model.towers, model.sfg[1:]):
        y = trunk(layer, stage[s](y))
    y = trunk(model.sfg[-1], y)
    out = model(x)
    for t, name in enumerate(model.task_names):
        assert torch.allclose(out[name], model.heads[t](y), atol=1e-6)


def test_single_task_baseline_is_two_independent_networks():
    torch.manual_seed(0)
    model = SFGHighResNet(sharing="single_task", **SMALL).eval()
    x = torch.randn(2, 1, 16, 16)
    before = model(x)
    with torch.no_grad():
        for layer in model.sfg:  # task-2 kernels: the second half of every SFG layer
            layer.conv.weight[layer.out_channels // 2 :] += 1.0
        for t in (1, 2):  # task 2 and the (empty) shared group
            for p in _task_params(model, t):
                p.add_(torch.randn_like(p))
    after = model(x)
    assert torch.equal(before["sct"], after["sct"])
    assert not torch.allclose(before["seg"], after["seg"])


def test_baselines_have_fixed_probabilities_and_sfg_learns_them():
    for sharing in ("single_task", "hard_sharing", "constant_mask", "constant_p", "cross_stitch"):
        model = SFGHighResNet(sharing=sharing, **SMALL)
        assert not any("theta" in n for n, _ in model.named_parameters()), sharing
    model = SFGHighResNet(**SMALL).train()
    model.set_temperature(0.5)
    out = model(torch.randn(2, 1, 16, 16), torch.Generator().manual_seed(0))
    (out["sct"].mean() + out["seg"].mean()).backward()
    assert all(layer.groups.theta.grad.abs().sum() > 0 for _, layer in model.sfg_layers())


def test_constant_mask_splits_kernels_in_thirds():
    model = SFGHighResNet(sharing="constant_mask", features=(6, 9, 12))
    for name, props in model.group_proportions().items():
        assert props == pytest.approx([1 / 3] * 3), name


def test_cross_stitch_with_identity_units_equals_single_task():
    torch.manual_seed(0)
    cs = SFGHighResNet(sharing="cross_stitch", **SMALL).eval()
    single = SFGHighResNet(sharing="single_task", **SMALL).eval()
    single.load_state_dict(cs.state_dict(), strict=False)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        for layer in cs.sfg:
            layer.cross_stitch.alpha.copy_(torch.eye(2))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(cs(x).values(), single(x).values()))
    with torch.no_grad():
        cs.sfg[2].cross_stitch.alpha.copy_(torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    assert not torch.allclose(cs(x)["sct"], single(x)["sct"])


@pytest.mark.parametrize("dims,tasks", [(2, ("sct", "seg")), (3, ("a", "b", "c"))])
def test_output_shapes(dims, tasks):
    channels = (1, 6, 3)[: len(tasks)]
    model = SFGHighResNet(spatial_dims=dims, task_names=tasks, out_channels=channels, **SMALL)
    shape = (2, 1) + (12,) * dims
    out = model(torch.randn(shape))
    assert list(out) == list(tasks)
    assert [o.shape[1] for o in out.values()] == list(channels)
    assert all(o.shape[2:] == shape[2:] for o in out.values())


def test_regression_head_can_be_negative():
    model = SFGHighResNet(**SMALL).eval()
    with torch.no_grad():
        model.heads[0].bias.fill_(-5.0)
    assert (model(torch.randn(1, 1, 16, 16))["sct"] < 0).any()


def test_same_seed_same_output_different_seed_different_output():
    torch.manual_seed(0)
    model = SFGHighResNet(**SMALL).eval()  # inference draws posterior samples
    x = torch.randn(1, 1, 16, 16)
    a = model(x, torch.Generator().manual_seed(1))["sct"]
    b = model(x, torch.Generator().manual_seed(1))["sct"]
    c = model(x, torch.Generator().manual_seed(2))["sct"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    model.set_inference("argmax")
    assert torch.equal(model(x, torch.Generator().manual_seed(1))["sct"], model(x, torch.Generator().manual_seed(2))["sct"])


def test_batch_statistics_at_test_time_leave_running_stats_untouched():
    torch.manual_seed(0)
    model = SFGHighResNet(bn_inference="batch", **SMALL)
    model.set_inference("argmax")
    model.eval()
    running = [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x = torch.randn(3, 1, 16, 16) * 4 + 2
    batch_out = model(x)["sct"]
    model.bn_inference = "population"
    assert not torch.allclose(batch_out, model(x)["sct"])
    after = [m.running_mean for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(running, after))
    assert not model.training


def test_regularizer_matches_hand_computation():
    model = SFGHighResNet(**SMALL)
    with torch.no_grad():
        for _, layer in model.sfg_layers():
            layer.conv.weight.fill_(0.5)
    kernels = sum(layer.conv.weight.numel() for _, layer in model.sfg_layers())
    n_kernels = sum(layer.out_channels for _, layer in model.sfg_layers())
    entropy = -(2 * 0.2 * torch.log(torch.tensor(0.2)) + 0.6 * torch.log(torch.tensor(0.6)))  # H([0.2, 0.6, 0.2])
    expected = 1e-6 * 0.25 * kernels - 1e-5 * n_kernels * entropy
    assert model.regularizer().item() == pytest.approx(expected.item(), rel=1e-4)


def test_architecture_export(tmp_path):
    model = SFGHighResNet(**SMALL)
    model.export_architecture(tmp_path / "arch.json")
    arch = json.loads((tmp_path / "arch.json").read_text())
    assert arch["groups"] == ["sct", "seg", "shared"]
    assert [layer["kernels"] for layer in arch["layers"]] == [4, 8, 8, 8, 8]
    # initial p = [0.2, 0.2, 0.6]: every kernel's most probable group is the shared one
    assert all(set(layer["assignment"]) == {2} for layer in arch["layers"])
    assert all(layer["proportions"]["shared"] == 1.0 for layer in arch["layers"])


def test_temperature_is_a_checkpointed_buffer():
    model = SFGHighResNet(**SMALL)
    model.set_temperature(0.37)
    other = SFGHighResNet(**SMALL)
    other.load_state_dict(model.state_dict())
    assert other.temperature == pytest.approx(0.37)
    with pytest.raises(ValueError):
        model.set_temperature(0.0)
