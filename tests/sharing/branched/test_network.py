"""The branched network: built from a tree on any stackable backbone; the all-shared tree is hard sharing,
the fully split tree is single-task columns, its parameter count is the tree's formula, and one task's
forward runs only its path."""

import pytest
import torch

from mtl_med.networks import describe_backbone
from mtl_med.build import build_network
from mtl_med.sharing.branched import save_tree_json, tree_params

TASKS = ["a", "b", "c"]
TINY = {
    "resnet18": dict(widths=(4, 4, 8, 8), conv1_t_size=3, conv1_t_stride=1, no_max_pool=True),
    "vgg11_bn": dict(width=1 / 16),
    "highresnet": dict(features=(4, 4, 4), blocks_per_stage=1),
    "mnist_cnn": dict(width=0.25),
}
SIZE = {"resnet18": 8, "vgg11_bn": 8, "highresnet": 8, "mnist_cnn": 16}


def _net(backbone, tree=None, sharing="branched", tasks=TASKS, seed=0):
    torch.manual_seed(seed)
    kw = {"tree": tree} if sharing == "branched" else {}
    return build_network(backbone, sharing, tasks, 2, in_channels=1, **TINY[backbone], **kw)


def _blocks(backbone):
    return len(describe_backbone(backbone, **TINY[backbone]).branch_points) - 1


@pytest.mark.parametrize("backbone", list(TINY))
def test_all_shared_tree_is_hard_sharing(backbone):
    branched = _net(backbone).eval()
    hard = _net(backbone, sharing="hard_sharing").eval()
    # the same units in the same order: the stem, then each block's only branch
    hard.load_state_dict(dict(zip(hard.state_dict(), (v for k, v in branched.state_dict().items() if k != "tree"))))
    x = torch.randn(2, 1, *[SIZE[backbone]] * 2)
    assert all(torch.equal(branched(x)[t], hard(x)[t]) for t in TASKS)


@pytest.mark.parametrize("backbone", list(TINY))
def test_fully_split_tree_is_single_task_columns(backbone):
    n = _blocks(backbone)
    tree = [[0, 0, 0]] + [[0, 1, 2]] * (n - 1)  # the first block shared, then one branch per task
    net = _net(backbone, tree).train()
    x = torch.randn(2, 1, *[SIZE[backbone]] * 2)
    net(x, "b")["b"].sum().backward()
    for l, branches in enumerate(net.blocks):
        for b, branch in enumerate(branches):
            grads = [p.grad for p in branch.parameters()]
            on_path = l == 0 or b == 1
            assert all((g is not None and g.abs().sum() > 0) if on_path else g is None for g in grads), (l, b)


@pytest.mark.parametrize("backbone", list(TINY))
def test_parameters_follow_the_tree_formula(backbone):
    n = _blocks(backbone)
    tree = [[0, 0, 0]] * (n - 1) + [[0, 0, 1]] if n > 1 else [[0, 0, 1]]
    net = _net(backbone, tree)
    hard = _net(backbone, sharing="hard_sharing")
    block_params = [sum(p.numel() for p in branches[0].parameters()) for branches in net.blocks]
    fixed = sum(p.numel() for p in net.stem.parameters()) + sum(p.numel() for p in net.heads.parameters())
    assert tree_params(net.config, block_params, fixed) == sum(p.numel() for p in net.parameters())
    assert tree_params([[0, 0, 0]] * n, block_params, fixed) == sum(p.numel() for p in hard.parameters())


def test_one_task_runs_only_its_path():
    tree = [[0, 0, 0], [0, 0, 1], [0, 1, 2], [0, 1, 2]]
    net = _net("resnet18", tree).eval()
    ran = []
    for l, branches in enumerate(net.blocks):
        for b, branch in enumerate(branches):
            branch.register_forward_hook(lambda m, i, o, key=(l, b): ran.append(key))
    x = torch.randn(2, 1, 8, 8)
    net(x, "c")
    assert ran == [(0, 0), (1, 1), (2, 2), (3, 2)]
    ran.clear()
    out = net(x)
    assert sorted(ran) == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2)]  # each branch once
    for t in TASKS:
        torch.testing.assert_close(out[t], net(x, t)[t], rtol=1e-5, atol=1e-6)


def test_tree_from_file_is_stored_in_the_checkpoint(tmp_path):
    tree = [[0, 0, 0], [0, 0, 1], [0, 0, 1], [0, 1, 2]]
    save_tree_json(tmp_path / "tree.json", tree, TASKS)
    net = _net("resnet18", str(tmp_path / "tree.json"))
    assert net.config == tree and net.tree.tolist() == tree
    other = _net("resnet18", tree, seed=1)
    other.load_state_dict(net.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(other.eval()(x)["c"], net.eval()(x)["c"])


def test_wrong_tree_shape_is_refused():
    with pytest.raises(ValueError, match="branchable blocks"):
        _net("resnet18", [[0, 0, 0], [0, 1, 2]])
    with pytest.raises(ValueError, match="3 tasks"):
        _net("resnet18", [[0, 0]] * 4)
