"""Single-task columns: one backbone per task, nothing shared."""

import pytest
import torch

from mtl_med.build import build_network
from mtl_med.sharing import SingleTask

TASKS = ["a", "b", "c"]
RESNET = dict(widths=(4, 4, 8, 8), conv1_t_size=3, conv1_t_stride=1, no_max_pool=True)


def _net(sharing="single_task", tasks=TASKS, out=(1, 2, 2), dims=2):
    torch.manual_seed(0)
    return build_network("resnet18", sharing, list(tasks), out, spatial_dims=dims, in_channels=1, **RESNET)


@pytest.mark.parametrize("dims", [2, 3])
def test_one_column_per_task_and_one_output_per_task(dims):
    net = _net(dims=dims)
    assert isinstance(net, SingleTask) and len(net.columns) == len(TASKS)
    ids = [{id(p) for p in c.parameters()} for c in net.columns]
    assert all(ids[i].isdisjoint(ids[j]) for i in range(3) for j in range(i + 1, 3))
    out = net(torch.randn(2, 1, *([8] * dims)))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"a": (2, 1), "b": (2, 2), "c": (2, 2)}
    assert float(net.regularizer()) == 0.0


def test_a_task_trains_only_its_column_and_its_head():
    net = _net()
    net(torch.randn(2, 1, 8, 8))["b"].sum().backward()
    for k, column in enumerate(net.columns):
        grads = [p.grad for p in column.parameters()]
        if k == 1:
            assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
        else:
            assert all(g is None for g in grads)
    assert all(torch.all(w.grad[[0, 2]] == 0) and w.grad[1].abs().sum() > 0 for w in net.heads.weights)


def test_only_the_asked_column_runs():
    net = _net().eval()
    calls = []
    for k, column in enumerate(net.columns):
        column.units[0].register_forward_hook(lambda *a, k=k: calls.append(k))
    x = torch.randn(2, 1, 8, 8)
    net(x, "c")
    assert calls == [2]
    net(x, torch.tensor([1, 0]))
    assert sorted(calls[1:]) == [0, 1]


def test_each_column_is_a_single_task_network():
    net = _net().eval()
    x = torch.randn(3, 1, 8, 8)
    out = net(x)
    for k, name in enumerate(TASKS):
        alone = _net("hard_sharing", [name], net.heads.out_channels[k]).eval()
        alone.trunk.load_state_dict(net.columns[k].state_dict())
        with torch.no_grad():
            for mine, theirs in zip(alone.heads.parameters(), net.heads.parameters()):
                mine.copy_(theirs[k : k + 1, : mine.shape[1]])
        assert torch.equal(alone(x)[name], out[name])


def test_per_example_task_ids_equal_per_task_passes():
    net = _net().eval()
    x = torch.randn(5, 1, 8, 8)
    ids = torch.tensor([2, 0, 2, 1, 0])
    per = net(x, ids)
    assert list(per) == TASKS
    for k, name in enumerate(TASKS):
        rows = (ids == k).nonzero(as_tuple=True)[0]
        torch.testing.assert_close(per[name], net(x, k)[name][rows], rtol=1e-5, atol=1e-6)
