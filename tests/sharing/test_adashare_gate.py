"""AdaShare's select-or-skip policy (Sun et al., NeurIPS 2020, section 3)."""

from __future__ import annotations

import pytest
import torch

from mtl_med.sharing.adashare.gate import BlockPolicy


def test_modes_give_no_gates_the_policy_or_soft_samples():
    p = BlockPolicy(2, 4)
    assert p.mode == "warmup" and p.gates() is None  # every block runs (warm-up, 3.3)
    p.set_mode("learn")
    g = p.gates(torch.Generator().manual_seed(0))
    assert g.shape == (2, 4) and bool(((g > 0) & (g < 1)).all())  # soft Gumbel-Softmax (eq. 3)
    policy = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]])
    p.set_policy(policy)
    assert p.mode == "fixed" and torch.equal(p.gates(), policy.float())


def test_evaluation_in_learn_mode_takes_the_most_likely_decision():
    p = BlockPolicy(1, 3)
    with torch.no_grad():
        p.logits[0, :, 1] = torch.tensor([2.0, -2.0, 0.5])
    p.set_mode("learn")
    p.eval()
    assert torch.equal(p.gates(), torch.tensor([[1.0, 0.0, 1.0]]))
    assert torch.equal(p.sample(deterministic=True), torch.tensor([[True, False, True]]))


def test_curriculum_frozen_blocks_run_and_get_exactly_zero_gradient():
    p = BlockPolicy(2, 5)
    p.set_mode("learn")
    p.set_num_learnable(2)  # section 3.3: only the last 2 blocks are learned
    g = p.gates(torch.Generator().manual_seed(1))
    assert torch.equal(g[:, :3], torch.ones(2, 3))
    (p.select_probability(effective=True).sum() + g.sum()).backward()
    assert torch.equal(p.logits.grad[:, :3], torch.zeros(2, 3, 2))
    assert bool((p.logits.grad[:, 3:] != 0).any())


def test_sampled_policies_follow_alpha():
    p = BlockPolicy(1, 2)
    with torch.no_grad():
        p.logits[0, :, 1] = torch.tensor([torch.logit(torch.tensor(0.8)), torch.logit(torch.tensor(0.2))])
    gen = torch.Generator().manual_seed(0)
    freq = torch.stack([p.sample(gen) for _ in range(4000)]).float().mean(0)[0]
    assert torch.allclose(freq, torch.tensor([0.8, 0.2]), atol=0.03)


def test_mode_and_curriculum_travel_in_the_state_dict():
    p = BlockPolicy(2, 3)
    p.set_mode("learn")
    p.set_num_learnable(1)
    q = BlockPolicy(2, 3)
    q.load_state_dict(p.state_dict())
    assert q.mode == "learn" and q.num_learnable == 1


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        BlockPolicy(0, 3)
    p = BlockPolicy(2, 3)
    with pytest.raises(ValueError, match="mode must be one of"):
        p.set_mode("off")
    with pytest.raises(ValueError, match="policy must have shape"):
        p.set_policy(torch.ones(3, 2))
    with pytest.raises(ValueError, match="num_learnable"):
        p.set_num_learnable(4)
    with pytest.raises(ValueError, match="tau"):
        p.set_tau(0)
