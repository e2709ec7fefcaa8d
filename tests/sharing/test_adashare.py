"""AdaShare: the gated network on HighResNet and ResNet, policy losses, curriculum, alternating
optimisation (the search's), re-training, policy export."""

import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from mtl_med.losses import MultiTaskLoss
from mtl_med.sharing.adashare.losses import ADASHARE_HPARAMS, AdaShareRegularizer, adashare_sharing_loss, adashare_sparsity_loss
from mtl_med.networks import HEADS, describe_backbone
from mtl_med.build import build_network
from mtl_med.networks.blocks import BasicBlock, HighResBlock
from mtl_med.sharing import AdaShare
from mtl_med.sharing.adashare import (
    GatedBlock,
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

TINY = {
    "resnet18": dict(widths=(4, 4, 8, 8), conv1_t_size=3, conv1_t_stride=1, no_max_pool=True),
    "resnet34": dict(widths=(2, 2, 2, 2), conv1_t_size=3, conv1_t_stride=1, no_max_pool=True),
    "highresnet": dict(features=(4, 6, 8)),
}
BACKBONES = ["highresnet", "resnet18"]


def _net(backbone="resnet18", tasks=("a", "b"), out=1, dims=2, sharing="adashare", **kw):
    torch.manual_seed(0)
    return build_network(backbone, sharing, list(tasks), out, spatial_dims=dims, in_channels=1, **{**TINY[backbone], **kw})


def _gated(net):
    return [u for u in net.trunk.units if isinstance(u, GatedBlock)]


def _residual_parameters(block):
    """The parameters of a block's residual path (not its shortcut's)."""
    return [p for n, p in block.named_parameters() if not n.startswith("downsample.")]


def _plain(net, x, run_blocks=True):
    """The trunk by hand: every unit in order, each residual block run, or only its shortcut."""
    for u in net.trunk.units:
        if isinstance(u, GatedBlock):
            x = u.block(x) if run_blocks else u.block.shortcut(x)
        else:
            x = u(x)
    return x


def _hard_and_adashare(backbone):
    """A hard-sharing network and an AdaShare network with its weights, both in evaluation mode."""
    hard, ada = _net(backbone, sharing="hard_sharing").eval(), _net(backbone).eval()
    prefixes = [f"trunk.units.{i}." for i, u in enumerate(ada.trunk.units) if isinstance(u, GatedBlock)]

    def gated_name(k):
        return next((p + "block." + k[len(p) :] for p in prefixes if k.startswith(p)), k)

    missing, unexpected = ada.load_state_dict({gated_name(k): v for k, v in hard.state_dict().items()}, strict=False)
    assert unexpected == [] and missing and all(k.startswith("policy.") for k in missing)
    return hard, ada


def _task_specific_policy(num_tasks, num_blocks):
    return torch.tensor([[(l + k) % 3 != 0 for l in range(num_blocks)] for k in range(num_tasks)])


@pytest.mark.parametrize(
    "backbone,blocks,kind", [("highresnet", 6, HighResBlock), ("resnet18", 8, BasicBlock), ("resnet34", 16, BasicBlock)]
)
def test_every_residual_block_is_gated(backbone, blocks, kind):
    net = _net(backbone)
    assert isinstance(net, AdaShare)
    gated = _gated(net)
    assert net.num_blocks == net.policy.num_blocks == len(gated) == blocks
    assert [g.index for g in gated] == list(range(blocks)) and all(isinstance(g.block, kind) for g in gated)
    if backbone != "resnet34":  # two blocks per stage
        assert net.block_names == [f"stage{s}.{i}" for s in range(1, blocks // 2 + 1) for i in range(2)]
    assert net.policy.mode == "warmup" and net.policy_parameters() == [net.policy.logits]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("dims", [2, 3])
def test_output_dict_and_task_selection(backbone, dims):
    net = _net(backbone, ["sct", "seg"], (1, 3), dims)
    x = torch.randn(2, 1, *([8] * dims))
    out = net(x)
    spatial = (8,) * dims if backbone == "highresnet" else ()  # dense heads at full resolution, pooled heads
    assert out["sct"].shape == (2, 1, *spatial) and out["seg"].shape == (2, 3, *spatial)
    assert list(net(x, "seg")) == ["seg"]
    reg = net.regularizer()
    assert reg.ndim == 0 and float(reg) == 0.0  # warm-up: no policy loss


@pytest.mark.parametrize("backbone", BACKBONES)
def test_policy_selecting_every_block_is_hard_sharing(backbone):
    hard, ada = _hard_and_adashare(backbone)
    x = torch.randn(3, 1, 8, 8)
    ids = torch.tensor([1, 0, 1])
    with torch.no_grad():
        ref, trunk = hard(x), hard.trunk(x)
        assert torch.equal(_plain(ada, x), trunk)
        warm = ada(x)  # warm-up: every block executed, the trunk shared
        ada.policy.set_policy(torch.ones(2, ada.num_blocks, dtype=torch.bool))
        fixed = ada(x)
        feats = ada.task_features(x, ids)
        per = ada(x, ids)
        # the per-example path runs the head on its own rows: compare with the head on the same rows
        b_rows = hard.heads(trunk[[0, 2]], 1)
    for name in ref:
        assert torch.equal(warm[name], ref[name]) and torch.equal(fixed[name], ref[name])
    assert torch.equal(feats, trunk)  # tensor gates 1 * block + 0 * shortcut: the same bits
    assert torch.equal(per["b"], b_rows)
    torch.testing.assert_close(per["a"], ref["a"][[1]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_skipping_every_block_leaves_the_shortcuts(backbone):
    _, ada = _hard_and_adashare(backbone)
    ada.policy.set_policy(torch.zeros(2, ada.num_blocks, dtype=torch.bool))
    x = torch.randn(3, 1, 8, 8)
    out = ada(x, 1)["b"]
    with torch.no_grad():
        expected = ada.heads(_plain(ada, x, run_blocks=False), 1)
        # soft gates of exactly zero (per-example path) agree
        torch.testing.assert_close(ada(x, torch.tensor([1, 1, 1]))["b"], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.detach(), expected)
    out.sum().backward()
    blocks = [g.block for g in _gated(ada)]
    assert all(p.grad is None for b in blocks for p in _residual_parameters(b))  # skipped blocks are not computed
    shortcuts = [p for b in blocks if getattr(b, "downsample", None) is not None for p in b.downsample.parameters()]
    assert bool(shortcuts) == backbone.startswith("resnet") and all(p.grad is not None for p in shortcuts)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_skipped_block_gets_exactly_zero_gradient_from_that_task(backbone):
    net = _net(backbone)
    policy = torch.ones(2, net.num_blocks, dtype=torch.bool)
    policy[0, 1] = False  # task a skips block 1
    net.policy.set_policy(policy)
    block = _gated(net)[1].block
    residual = _residual_parameters(block)
    calls = []
    block.conv1.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(4, 1, 8, 8)
    # one task per batch: the skipped block is not computed
    net(x, "a")["a"].sum().backward()
    assert calls == [] and all(p.grad is None for p in residual)
    # per-example ids: the block is computed and gated by exactly 0 for task a's examples
    net.zero_grad()
    net(x, torch.zeros(4, dtype=torch.long))["a"].sum().backward()
    assert calls == [1] and all(p.grad is not None and torch.all(p.grad == 0) for p in residual)
    net.eval()  # examples independent (population statistics): a mixed batch, each task's loss alone
    for task, zero in (("a", True), ("b", False)):
        net.zero_grad()
        net(x, torch.tensor([0, 1, 0, 1]))[task].sum().backward()
        assert all(torch.all(p.grad == 0) for p in residual) == zero
    net.zero_grad()
    net(x, "b")["b"].sum().backward()
    assert all(p.grad is not None for p in residual)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_warmup_computes_the_trunk_once(backbone):
    net = _net(backbone, tasks=("a", "b", "c"))
    calls = []
    net.trunk.units[0].register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 1, 8, 8)
    net(x)
    assert len(calls) == 1 and net.policy.gates() is None
    feats = net.task_features(x, None)
    assert feats[0] is feats[1] is feats[2]
    net.policy.set_policy(torch.ones(3, net.num_blocks, dtype=torch.bool))
    calls.clear()
    net(x)  # a policy is per task: one pass per task
    assert len(calls) == 3
    set_policy_mode(net, "learn")
    calls.clear()
    net(x, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 3


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("mode", ["fixed", "learn"])
def test_per_example_task_ids_equal_per_task_passes(backbone, mode):
    net = _net(backbone, tasks=("a", "b", "c"), out=(1, 2, 3))
    if mode == "fixed":
        net.policy.set_policy(_task_specific_policy(3, net.num_blocks))
    else:  # evaluation: the most likely decisions of the learned policy
        with torch.no_grad():
            net.policy.logits.normal_(generator=torch.Generator().manual_seed(0))
        set_policy_mode(net, "learn")
    net.eval()
    x = torch.randn(5, 1, 8, 8)
    ids = torch.tensor([2, 0, 2, 1, 0])
    per = net(x, ids)
    assert list(per) == ["a", "b", "c"]
    for k, name in enumerate(net.task_names):
        rows = (ids == k).nonzero(as_tuple=True)[0]
        torch.testing.assert_close(per[name], net(x, k)[name][rows], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_task_specific_policy_and_soft_gates(backbone):
    hard, net = _hard_and_adashare(backbone)
    net.policy.set_policy(_task_specific_policy(2, net.num_blocks))
    x = torch.randn(2, 1, 8, 8)
    assert not torch.allclose(net(x)["a"], hard(x)["a"])
    # learning mode: soft Gumbel gates give the policy logits a gradient, the regulariser is active
    net.train()
    set_policy_mode(net, "learn")
    y = net(x, generator=torch.Generator().manual_seed(0))
    (y["a"].sum() + net.regularizer()).backward()
    assert net.policy.logits.grad is not None and net.policy.logits.grad.abs().sum() > 0


@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_tasks_loss_moves_only_its_own_policy_during_the_search(backbone):
    """Section 3.2: each task samples its own soft gates from its own logits. With the loss of task "a" alone (no
    regulariser), task "b"'s logits get exactly zero gradient and "a"'s do not; gates pooled over the tasks in
    the search would give "b" the gradient of "a"'s loss (and make task-specific policies unlearnable)."""
    net = _net(backbone).train()
    set_policy_mode(net, "learn")
    y = net(torch.randn(2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    y["a"].square().sum().backward()
    grad = net.policy.logits.grad
    assert grad[1].abs().sum() == 0
    assert grad[0].abs().sum() > 0


@pytest.mark.parametrize("backbone", BACKBONES)
def test_learn_mode_is_soft_and_seeded(backbone):
    net = _net(backbone).train()
    set_policy_mode(net, "learn")
    g = net.policy.gates(torch.Generator().manual_seed(0))
    assert g.shape == (2, net.num_blocks) and ((g > 0) & (g < 1)).all()
    assert torch.equal(g, net.policy.gates(torch.Generator().manual_seed(0)))
    x = torch.randn(2, 1, 8, 8)
    net.eval()  # batch-norm statistics fixed; gates still sampled while the policy is in training mode
    net.policy.train()
    a = net(x, generator=torch.Generator().manual_seed(1))
    b = net(x, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert float(net.regularizer().detach()) != 0.0


def test_multitask_loss_adds_the_policy_regulariser():
    net = _net()
    set_policy_mode(net, "learn")
    loss = MultiTaskLoss({"a": torch.nn.MSELoss(), "b": torch.nn.MSELoss()}, weights={"a": 1.0, "b": 20.0})
    out = net(torch.randn(2, 1, 8, 8))
    total, terms = loss(out, {"a": torch.zeros(2, 1), "b": torch.zeros(2, 1)}, model=net)
    assert torch.allclose(total, terms["a"] + 20 * terms["b"] + terms["regularizer"])
    total.backward()
    assert net.policy.logits.grad.abs().sum() > 0


def test_policy_mode_and_tau_travel_in_state_dict():
    net = _net()
    set_policy_mode(net, "learn")
    net.policy.set_tau(1.25)
    net.policy.set_num_learnable(1)
    other = _net()
    other.load_state_dict(net.state_dict())
    assert other.policy.mode == "learn" and other.policy.num_learnable == 1 and float(other.policy.tau) == 1.25


@pytest.mark.parametrize("backbone", BACKBONES)
def test_retrain_network_is_built_again_from_build_args(backbone):
    net = _net(backbone, tau=2.0)
    policy = torch.ones(2, net.num_blocks, dtype=torch.bool)
    policy[0, 2:] = False
    fresh = build_retrain_network(net, policy, seed=1)
    assert type(fresh) is AdaShare and fresh.backbone_name == backbone and float(fresh.policy.tau) == 2.0
    assert fresh.policy.mode == "fixed" and torch.equal(fresh.policy.policy, policy)
    assert {k: v for k, v in fresh.build_args.items() if k != "policy"} == net.build_args
    shapes = lambda n: {k: v.shape for k, v in n.state_dict().items() if isinstance(v, torch.Tensor)}  # noqa: E731
    assert shapes(fresh) == shapes(net)
    net.load_state_dict(fresh.state_dict())  # policy and mode travel in the state dict
    assert net.policy.mode == "fixed" and torch.equal(net.policy.policy, policy)
    spec = describe_backbone(backbone, **TINY[backbone])
    by_hand = AdaShare(spec, ["a", "b"], HEADS["pooled"](2, spec.out_channels, [1, 1]))
    with pytest.raises(ValueError, match="build_args"):
        build_retrain_network(by_hand, policy)
    with pytest.raises(ValueError, match="has no AdaShare policy"):
        build_retrain_network(_net(backbone, sharing="hard_sharing"), policy)


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
    reg = AdaShareRegularizer(lambda_sparsity=0.1, lambda_sharing=0.0, normalize=False)
    assert math.isclose(float(reg(alpha)), 0.1 * expected, rel_tol=1e-6)
    reg = AdaShareRegularizer(lambda_sparsity=0.1, lambda_sharing=0.0)  # each task's mean over its 2 blocks
    assert math.isclose(float(reg(alpha)), 0.1 * expected / 2, rel_tol=1e-6)


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
    K, L = alpha.shape  # normalised: sparsity / L, sharing / (2 (K - 1))
    expected = 0.2 / L * adashare_sparsity_loss(alpha) + 0.3 / (2 * (K - 1)) * adashare_sharing_loss(alpha)
    assert torch.allclose(net.regularizer(), expected)
    raw = _net(lambda_sparsity=0.2, lambda_sharing=0.3, normalize_policy_losses=False)
    raw.load_state_dict(net.state_dict())
    assert torch.allclose(raw.regularizer(), 0.2 * adashare_sparsity_loss(alpha) + 0.3 * adashare_sharing_loss(alpha))
    set_policy_mode(net, "warmup")
    assert float(net.regularizer()) == 0.0


def test_curriculum_freezes_the_logits_of_the_first_blocks():
    net = _net()
    L = net.num_blocks
    assert L == 8 and [curriculum_num_blocks(e, L) for e in (0, 1, 2, 5, 9)] == [0, 1, 2, 5, 8]
    assert [curriculum_num_blocks(e, L, speed=3) for e in (1, 3, 4, 22, 24, 99)] == [1, 1, 2, 8, 8, 8]
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


def _items(n=10):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    ya, yb = torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g)
    return [{"image": x[k], "targets": {"a": ya[k], "b": yb[k]}} for k in range(n)]


@pytest.mark.parametrize("weight_lr, policy_lr", [(0.0, 0.1), (0.1, 0.0)])
def test_the_alternation_steps_the_weights_and_the_logits_each_with_its_own_optimiser(monkeypatch, weight_lr, policy_lr):
    from mtl_med.engines import MultiTaskPrepareBatch, MultiTaskTrainer
    from mtl_med.sharing.adashare import AdaShareSearch, network as ada_network

    net = _net()
    monkeypatch.setattr(ada_network, "build_retrain_network", lambda model, policy, seed=None: model)  # keep the searched weights
    w0 = [p.detach().clone() for p in net.weight_parameters()]
    l0 = net.policy.logits.detach().clone()
    loss = MultiTaskLoss({"a": torch.nn.L1Loss(), "b": torch.nn.L1Loss()})
    AdaShareSearch(net, _items(), loss, MultiTaskPrepareBatch("image", "targets"), MultiTaskTrainer, batch_size=4,
                   warmup_epochs=0, policy_epochs=1, weight_lr=weight_lr, policy_lr=policy_lr, seed=0).run()
    weights_moved = not all(torch.equal(a, b) for a, b in zip(w0, net.weight_parameters()))
    logits_moved = not torch.equal(l0, net.policy.logits)
    assert (weights_moved, logits_moved) == (weight_lr > 0, policy_lr > 0)
    assert all(p.requires_grad for p in net.parameters())


def test_policy_sampling_retraining_and_json_export(tmp_path):
    net = _net()
    with torch.no_grad():
        net.policy.logits[..., 1] = torch.tensor([[5.0, -5.0, 5.0, -5.0] * 2, [5.0, 5.0, -5.0, -5.0] * 2])
    p1 = sample_policy(net, torch.Generator().manual_seed(0))
    assert torch.equal(p1, sample_policy(net, torch.Generator().manual_seed(0)))
    det = sample_policy(net, deterministic=True)
    assert det.tolist() == [[True, False, True, False] * 2, [True, True, False, False] * 2]
    fresh = build_retrain_network(net, det, seed=1)
    assert fresh.policy.mode == "fixed" and torch.equal(fresh.policy.policy, det)
    stem = lambda n: n.trunk.units[0][0].weight  # noqa: E731
    assert not torch.equal(stem(fresh), stem(net))  # re-initialised
    assert torch.equal(stem(fresh), stem(build_retrain_network(net, det, seed=1)))
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
