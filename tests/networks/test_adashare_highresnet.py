"""AdaShare-gated HighResNet: the gates select or skip MONAI HighResBlocks per task."""

import pytest
import torch

from mtl_med.networks import AdaShareHighResNet
from mtl_med.sharing.adashare import build_retrain_network

TINY = dict(features=(4, 6, 8), task_names=("sct", "seg"), out_channels=(1, 3))


def _net(spatial_dims=2, **kw):
    torch.manual_seed(0)
    return AdaShareHighResNet(spatial_dims, 1, **{**TINY, **kw}).eval()


def _plain_trunk(net, x, run_blocks=True):
    """The trunk by hand: convolutions and (optionally) every residual block in order."""
    y = net.convs[0](x)
    for l, block in enumerate(net.blocks):
        y = block(y) if run_blocks else y
        if (l + 1) % net.blocks_per_stage == 0:
            y = net.convs[(l + 1) // net.blocks_per_stage](y)
    return net.convs[-1](y)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shapes_in_2d_and_3d(spatial_dims):
    net = _net(spatial_dims)
    x = torch.randn(2, 1, *([8] * spatial_dims))
    out = net(x)
    assert out["sct"].shape == (2, 1, *([8] * spatial_dims)) and out["seg"].shape == (2, 3, *([8] * spatial_dims))
    assert net.num_blocks == 6 and list(net(x, "seg")) == ["seg"]


def test_policy_selecting_every_block_is_the_plain_trunk():
    net = _net()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        ref = _plain_trunk(net, x)
        warm = net(x)  # warm-up: every block executed, trunk shared
        net.policy.set_policy(torch.ones(2, net.num_blocks, dtype=torch.bool))
        fixed = net(x)
        per_example = net(x, torch.tensor([1, 0, 1]))
        expected = [head(ref) for head in net.heads]
        # the per-example path runs the head on its own rows (a batch of 2): compare with the head run
        # on the same 2 rows, not with rows of a batch-of-3 result (oneDNN may pick other kernels)
        seg_rows = net.heads[1](ref[[0, 2]])
    for k, name in enumerate(net.task_names):
        assert torch.equal(warm[name], expected[k]) and torch.equal(fixed[name], expected[k])
    assert torch.equal(per_example["seg"], seg_rows)  # tensor gates 1 * block + 0 * x: the same trunk bits


def test_skipping_every_block_leaves_the_identity_paths():
    net = _net()
    net.policy.set_policy(torch.zeros(2, net.num_blocks, dtype=torch.bool))
    x = torch.randn(2, 1, 8, 8)
    out = net(x)
    with torch.no_grad():
        ref = _plain_trunk(net, x, run_blocks=False)
    assert torch.equal(out["sct"].detach(), net.heads[0](ref).detach())
    sum(o.sum() for o in out.values()).backward()
    assert all(p.grad is None for p in net.blocks.parameters())  # skipped blocks are not computed


def test_task_specific_policy_and_soft_gates():
    net = _net()
    policy = torch.tensor([[1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 1]], dtype=torch.bool)
    net.policy.set_policy(policy)
    x = torch.randn(2, 1, 8, 8)
    out = net(x)
    assert not torch.allclose(out["sct"], net.heads[0](_plain_trunk(net, x)))
    # learning mode: soft Gumbel gates give the policy logits a gradient, the regulariser is active
    net.train()
    net.policy.set_mode("learn")
    y = net(x, generator=torch.Generator().manual_seed(0))
    (y["sct"].sum() + net.regularizer()).backward()
    assert net.policy.logits.grad is not None and net.policy.logits.grad.abs().sum() > 0


def test_retrain_network_keeps_the_architecture_and_the_policy():
    net = _net()
    policy = torch.ones(2, net.num_blocks, dtype=torch.bool)
    policy[0, 2:] = False
    fresh = build_retrain_network(net, policy, seed=1)
    assert isinstance(fresh, AdaShareHighResNet) and fresh.policy.mode == "fixed"
    assert torch.equal(fresh.policy.policy, policy)
    net.load_state_dict(fresh.state_dict())  # policy and mode travel in the state dict
    assert net.policy.mode == "fixed" and torch.equal(net.policy.policy, policy)
