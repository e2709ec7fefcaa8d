"""Task heads: shapes, one task's loss reaches only that task's head, parameter-free activations."""

import math

import pytest
import torch
from monai.networks.layers.factories import Act

from mtl_med.networks.heads import DenseHeads, PooledHeads

OUTS = [1, 3, 2]


@pytest.mark.parametrize("dims", [2, 3])
def test_dense_heads_keep_the_resolution(dims):
    heads = DenseHeads(dims, 4, OUTS)
    x = torch.randn(2, 4, *([5] * dims))
    for k, c in enumerate(OUTS):
        assert heads(x, k).shape == (2, c, *([5] * dims))
        assert heads[k].kernel_size == (1,) * dims and heads[k].bias is not None


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("hidden", [0, 6])
def test_pooled_heads_pool_and_give_each_task_its_outputs(dims, hidden):
    heads = PooledHeads(dims, 4, OUTS, hidden=hidden)
    assert heads.out_channels == OUTS
    shapes = [(3, 6, 4), (3, 3, 6)] if hidden else [(3, 3, 4)]
    assert [tuple(w.shape) for w in heads.weights] == shapes and [tuple(b.shape) for b in heads.biases] == [s[:2] for s in shapes]
    x = torch.randn(2, 4, *([5] * dims))
    for k, c in enumerate(OUTS):
        y = heads(x, k)
        assert y.shape == (2, c)
        # global average pooling: the spatially averaged features (already flat) give the same output
        torch.testing.assert_close(heads(x.flatten(2).mean(-1), k), y)


def test_pooled_heads_initialise_as_linear_layers():
    heads = PooledHeads(2, 16, OUTS, hidden=9)
    for w, b in zip(heads.weights, heads.biases):
        bound = 1 / math.sqrt(w.shape[-1])  # nn.Linear's: kaiming_uniform(a=sqrt(5)) for the weights
        assert w.abs().max() <= bound and b.abs().max() <= bound
        assert not torch.equal(w[0], w[1])  # task by task


@pytest.mark.parametrize("kind", ["dense", "pooled", "pooled_hidden", "pooled_prelu"])
def test_a_task_loss_reaches_only_its_own_head(kind):
    torch.manual_seed(0)
    if kind == "dense":
        heads = DenseHeads(2, 4, OUTS)
    else:
        heads = PooledHeads(2, 4, OUTS, hidden=0 if kind == "pooled" else 5, act="prelu" if kind == "pooled_prelu" else "relu")
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    heads(x, 1).square().sum().backward()
    if kind == "dense":
        assert all(p.grad is None for k in (0, 2) for p in heads[k].parameters())
        assert all(p.grad.abs().sum() > 0 for p in heads[1].parameters())
        return
    for p in heads.parameters():  # every parameter is batched over the tasks
        assert p.shape[0] == len(OUTS) and torch.all(p.grad[[0, 2]] == 0) and p.grad[1].abs().sum() > 0
    # task 1 uses all three rows of the last layer, task 0 only the first
    assert heads.weights[-1].grad[1].abs().sum(-1).gt(0).tolist() == [True, True, True]
    heads.zero_grad()
    heads(x, 0).sum().backward()
    assert heads.weights[-1].grad[0].abs().sum(-1).gt(0).tolist() == [True, False, False]


def test_an_activation_with_parameters_shared_by_the_tasks_is_refused(monkeypatch):
    # a module with one slope for every task would tie them; "prelu" gets one slope per task instead
    monkeypatch.setitem(Act.components, "TIEDPRELU", Act.components["PRELU"])
    with pytest.raises(ValueError, match="parameter-free"):
        PooledHeads(2, 4, OUTS, hidden=5, act="tiedprelu")
    heads = PooledHeads(2, 4, OUTS, hidden=5, act=("leakyrelu", {"negative_slope": 0.1}))
    assert heads(torch.randn(2, 4, 3, 3), 2).shape == (2, 2) and len(list(heads.parameters())) == 4
    assert len(list(PooledHeads(2, 4, OUTS, act="tiedprelu").parameters())) == 2  # linear heads: no activation


def test_empty_or_zero_outputs_are_refused():
    for cls in (DenseHeads, PooledHeads):
        for outs in ([], [1, 0]):
            with pytest.raises(ValueError, match="at least one"):
                cls(2, 4, outs)


@pytest.mark.parametrize("act", ["relu", "prelu"])
def test_flattening_heads_with_several_hidden_layers_are_per_task_mlps(act):
    """pooled_size 4 on a 4 x 4 map flattens the 640 features (Selective Sharing's MNIST head for every
    method); each task's output is its own MLP 640 -> 64 -> 8 -> out on them, computed here by hand."""
    heads = PooledHeads(2, 40, OUTS, hidden=(64, 8), act=act, pooled_size=4)
    assert [tuple(w.shape) for w in heads.weights] == [(3, 64, 640), (3, 8, 64), (3, 3, 8)]
    x = torch.randn(2, 40, 4, 4)
    for k, c in enumerate(OUTS):
        h = x.flatten(1)  # no averaging at pooled_size = the map's size: position-specific weights
        for i, (w, b) in enumerate(zip(heads.weights, heads.biases)):
            if i:
                h = torch.nn.functional.prelu(h, heads.slopes[k, i - 1 : i]) if act == "prelu" else h.relu()
            h = h @ w[k].T + b[k]
        torch.testing.assert_close(heads(x, k), h[:, :c])
    if act == "prelu":
        assert heads.slopes.shape == (3, 2)  # one slope per task and hidden layer


def test_flattening_heads_refuse_impossible_sizes():
    with pytest.raises(ValueError, match="pooled_size"):
        PooledHeads(2, 4, OUTS, pooled_size=0)


def test_build_network_gives_every_method_the_flattening_head():
    from mtl_med.build import build_network

    names = [f"digit_{d}" for d in range(3)]
    for sharing in ("hard_sharing", "single_task", "cross_stitch"):
        net = build_network("mnist_cnn", sharing, names, 2, in_channels=1, head_hidden=[640, 100, 50], head_pooled_size=4)
        heads = [m for m in net.modules() if isinstance(m, PooledHeads)]
        assert heads and all([tuple(w.shape[1:]) for w in h.weights] == [(640, 640), (100, 640), (50, 100), (2, 50)] for h in heads)
        out = net(torch.randn(2, 1, 28, 28))
        assert all(out[t].shape == (2, 2) for t in names)
        assert net.rebuild().build_args["head_pooled_size"] == 4


def test_a_pooled_size_for_heads_that_do_not_pool_is_refused():
    from mtl_med.build import build_network

    with pytest.raises(ValueError, match="pooled heads only"):
        build_network("highresnet", "hard_sharing", ["a", "b"], 1, head_pooled_size=4, features=(4, 4, 4))
