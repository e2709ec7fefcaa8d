"""Task types of the vision bundles: the pairwise ranking loss of Selective Sharing (eq. 7) and the
score that mixes task types."""

import pytest
import torch

from mtl_med.engines.vision import PairwiseRankingLoss, primary_metric, task_losses, task_out_channels


def test_ranking_loss_on_hand_cases():
    loss = PairwiseRankingLoss()
    # ordered pairs (1,0) margin 0.5 -> 0.25; (2,0) margin 2 -> 0; (2,1) margin 1.5 -> 0
    assert loss(torch.tensor([[0.0], [0.5], [2.0]]), torch.tensor([0.0, 1.0, 2.0])).item() == pytest.approx(0.25 / 3)
    # the tie (0, 1) carries no order: pairs (2,0) margin 0.5 -> 0.25 and (2,1) margin -4.5 -> 30.25
    assert loss(torch.tensor([0.0, 5.0, 0.5]), torch.tensor([0.0, 0.0, 1.0])).item() == pytest.approx(15.25)
    f = torch.tensor([1.0, 2.0], requires_grad=True)
    out = loss(f, torch.tensor([3.0, 3.0]))  # no ordered pair: zero, still on the graph
    out.backward()
    assert out.item() == 0.0 and f.grad.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="ranking scores"):
        loss(torch.zeros(3), torch.zeros(4))


def test_ranking_loss_gradient_raises_the_higher_ranked_score():
    f = torch.tensor([0.0, 0.0], requires_grad=True)
    PairwiseRankingLoss()(f, torch.tensor([2.0, 1.0])).backward()
    assert f.grad[0] < 0 < f.grad[1]  # descent moves f(x_0) up and f(x_1) down


def test_task_type_plumbing_and_mixed_score():
    types = {"a": "binary", "r": "ranking", "m": "regression"}
    assert isinstance(task_losses(types)["r"], PairwiseRankingLoss) and task_out_channels(types) == {"a": 2, "r": 1, "m": 1}
    per_task = {"a": {"accuracy": 0.9}, "r": {"kendall_tau": 0.5}, "m": {"mae": 3.0}}
    assert primary_metric(per_task, types) == pytest.approx(0.7)  # accuracy and tau, higher is better
    assert primary_metric({"m": {"mae": 3.0}}, {"m": "regression"}) == -3.0
    with pytest.raises(ValueError, match="unknown task types"):
        task_losses({"x": "ordinal"})
