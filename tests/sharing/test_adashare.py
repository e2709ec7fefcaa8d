"""AdaShare: policy losses, curriculum, alternating optimisation, policy export."""

import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mtl_med.layers.gumbel import StepTemperature
from mtl_med.losses import MultiTaskLoss
from mtl_med.losses.adashare import ADASHARE_HPARAMS, AdaShareRegularizer, adashare_sharing_loss, adashare_sparsity_loss
from mtl_med.networks.resnet import ResNet
from mtl_med.sharing.adashare import (
    alternate_epoch,
    apply_curriculum,
    build_retrain_network,
    curriculum_num_blocks,
    export_policy_json,
    load_policy_json,
    make_optimizers,
    policy_image,
    sample_policy,
    set_policy_mode,
    split_parameters,
    split_weight_policy_data,
)

TINY = dict(widths=(4, 8), layers=(2, 2), conv1_t_size=3, conv1_t_stride=1, no_max_pool=True)


def _net(**kw):
    torch.manual_seed(0)
    return ResNet(2, 1, ["a", "b"], sharing="adashare", **{**TINY, **kw})


def test_sharing_loss_is_zero_for_identical_logits():
    alpha = torch.rand(3, 5).expand(3, 5).clone()
    alpha[:] = alpha[0]
    assert float(adashare_sharing_loss(alpha)) == 0.0


def test_sharing_loss_follows_eq6_on_a_hand_case():
    # K = 2, L = 3: weights (L - l)/L = 2/3, 1/3, 0 for l = 1, 2, 3
    alpha = torch.tensor([[0.9, 0.5, 0.2], [0.1, 0.7, 0.6]])
    one_pair = 2 / 3 * 0.8 + 1 / 3 * 0.2 + 0 * 0.4
    assert math.isclose(float(adashare_sharing_loss(alpha)), 2 * one_pair, rel_tol=1e-6)  # ordered pairs
    # the bottom block weighs most: the same gap costs more at l = 1 than at l = 2
    low = torch.tensor([[1.0, 0.5, 0.5], [0.0, 0.5, 0.5]])
    high = torch.tensor([[0.5, 1.0, 0.5], [0.5, 0.0, 0.5]])
    assert adashare_sharing_loss(low) > adashare_sharing_loss(high)


def test_sparsity_loss_on_a_hand_case():
    alpha = torch.tensor([[0.5, 0.25], [1.0, 0.125]])
    expected = math.log(0.5) + math.log(0.25) + 0.0 + math.log(0.125)
    assert math.isclose(float(adashare_sparsity_loss(alpha)), expected, rel_tol=1e-6)
    reg = AdaShareRegularizer(lambda_sparsity=0.1, lambda_sharing=0.0)
    assert math.isclose(float(reg(alpha)), 0.1 * expected, rel_tol=1e-6)


def test_defaults_are_table7():
    reg = AdaShareRegularizer()
    assert (reg.lambda_sparsity, reg.lambda_sharing) == (0.05, 0.05)
    assert ADASHARE_HPARAMS["tiny_taskonomy"]["lambda_sh"] == 0.005
    w, p = make_optimizers(_net())
    assert w.param_groups[0]["lr"] == 0.001 and p.param_groups[0]["lr"] == 0.01
    assert isinstance(w, torch.optim.SGD) and isinstance(p, torch.optim.Adam)


def test_network_regulariser_is_eq7_policy_terms():
    net = _net(lambda_sparsity=0.2, lambda_sharing=0.3)
    with torch.no_grad():
        net.policy.logits.normal_()
    set_policy_mode(net, "learn")
    alpha = net.policy.select_probability()
    expected = 0.2 * adashare_sparsity_loss(alpha) + 0.3 * adashare_sharing_loss(alpha)
    assert torch.allclose(net.regularizer(), expected)
    set_policy_mode(net, "warmup")
    assert float(net.regularizer()) == 0.0


def test_curriculum_freezes_the_logits_of_the_first_blocks():
    net = _net()
    L = net.num_blocks
    assert L == 4 and [curriculum_num_blocks(e, L) for e in (0, 1, 2, 5)] == [0, 1, 2, 4]
    set_policy_mode(net, "learn")
    assert apply_curriculum(net, 2) == 2
    _, opt = make_optimizers(net)
    before = net.policy.logits.detach().clone()
    gates = net.policy.gates(torch.Generator().manual_seed(0))
    assert torch.all(gates[:, : L - 2] == 1) and torch.all(gates[:, L - 2 :] < 1)
    out = net(torch.randn(4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    loss = sum(o.square().mean() for o in out.values()) + net.regularizer()
    opt.zero_grad()
    loss.backward()
    grad = net.policy.logits.grad
    assert torch.all(grad[:, : L - 2] == 0)
    assert torch.all(grad[:, L - 2 :].abs().sum(-1) > 0)
    opt.step()
    after = net.policy.logits.detach()
    assert torch.equal(after[:, : L - 2], before[:, : L - 2])
    assert not torch.equal(after[:, L - 2 :], before[:, L - 2 :])


def test_weight_policy_split_is_disjoint_and_seeded():
    ds = TensorDataset(torch.arange(50))
    w, p = split_weight_policy_data(ds, 0.8, seed=3)
    assert len(w) == 40 and len(p) == 10
    assert set(w.indices).isdisjoint(p.indices) and set(w.indices) | set(p.indices) == set(range(50))
    w2, _ = split_weight_policy_data(ds, 0.8, seed=3)
    w3, _ = split_weight_policy_data(ds, 0.8, seed=4)
    assert list(w.indices) == list(w2.indices) and list(w.indices) != list(w3.indices)


def test_parameter_split_separates_policy_logits():
    net = _net()
    weights, policy = split_parameters(net)
    assert policy == [net.policy.logits]
    assert len(weights) + 1 == len(list(net.parameters()))


def _loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 1, 8, 8, generator=g)
    ya, yb = torch.randn(10, 1, generator=g), torch.randn(10, 1, generator=g)
    ds = TensorDataset(x, ya, yb)
    w, p = split_weight_policy_data(ds, 0.8, seed=0)
    return DataLoader(w, batch_size=4), DataLoader(p, batch_size=4)


def _prepare(batch):
    x, ya, yb = batch
    return x, {"a": ya, "b": yb}


def test_alternating_epoch_updates_each_group_on_its_own_data():
    net = _net()
    set_policy_mode(net, "learn")
    apply_curriculum(net, 99)
    wl, pl = _loaders()
    loss = MultiTaskLoss({"a": torch.nn.L1Loss(), "b": torch.nn.L1Loss()})
    w_opt, p_opt = make_optimizers(net, weight_lr=0.1)
    tau = StepTemperature()
    w0 = [p.detach().clone() for p in net.weight_parameters()]
    l0 = net.policy.logits.detach().clone()
    # policy data only: weights unchanged, logits changed
    res = alternate_epoch(net, [], pl, loss, w_opt, p_opt, tau, _prepare, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(w0, net.weight_parameters()))
    assert not torch.equal(l0, net.policy.logits)
    assert math.isclose(res["tau"], 5.0 * 0.965) and math.isclose(float(net.policy.tau), 5.0 * 0.965, rel_tol=1e-6)
    # weight data only: logits unchanged, weights changed
    l1 = net.policy.logits.detach().clone()
    alternate_epoch(net, wl, [], loss, w_opt, p_opt, prepare_batch=_prepare)
    assert torch.equal(l1, net.policy.logits)
    assert not all(torch.equal(a, b) for a, b in zip(w0, net.weight_parameters()))
    assert all(p.requires_grad for p in net.parameters())


def test_policy_sampling_retraining_and_json_export(tmp_path):
    net = _net()
    with torch.no_grad():
        net.policy.logits[..., 1] = torch.tensor([[5.0, -5.0, 5.0, -5.0], [5.0, 5.0, -5.0, -5.0]])
    p1 = sample_policy(net, torch.Generator().manual_seed(0))
    assert torch.equal(p1, sample_policy(net, torch.Generator().manual_seed(0)))
    det = sample_policy(net, deterministic=True)
    assert det.tolist() == [[True, False, True, False], [True, True, False, False]]
    fresh = build_retrain_network(net, det, seed=1)
    assert fresh.policy.mode == "fixed" and torch.equal(fresh.policy.policy, det)
    assert not torch.equal(fresh.conv1.weight, net.conv1.weight)  # re-initialised
    assert torch.equal(fresh.conv1.weight, build_retrain_network(net, det, seed=1).conv1.weight)
    record = export_policy_json(tmp_path / "policy.json", net, det)
    assert json.loads((tmp_path / "policy.json").read_text())["block_names"] == net.block_names
    loaded = load_policy_json(tmp_path / "policy.json")
    assert torch.equal(loaded["policy"], det) and loaded["task_names"] == ["a", "b"]
    assert np.allclose(record["select_probability"], net.policy.select_probability().tolist())
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        load_policy_json(tmp_path / "bad.json")


def test_policy_image_is_an_rgb_array():
    alpha = torch.tensor([[0.9, 0.1, 0.6], [0.2, 0.8, 0.5]])
    img = policy_image(alpha, alpha > 0.5, ["seg", "sn"])
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.min() < 128 < img.max()  # drawn, not blank


def test_warmup_runs_every_block_for_every_task():
    net = _net().eval()
    assert net.policy.mode == "warmup" and net.policy.gates() is None
    x = torch.randn(2, 1, 8, 8)
    out = net(x)
    net.policy.set_policy(torch.ones(2, net.num_blocks, dtype=torch.bool))
    assert all(torch.equal(out[n], net(x)[n]) for n in out)
