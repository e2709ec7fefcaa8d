"""Every (backbone, sharing) pair that builds, for 2 and 3 tasks in 2D and 3D: a forward and a
backward pass, and the property that defines the method.

- hard_sharing: one plain trunk whose features every task reads; every trunk weight learns from
  every task.
- single_task: independent columns; column ``k`` plus head ``k`` is a one-task network.
- cross_stitch: identity stitches give the single-task columns; the default stitches mix them.
- routing: channels masked out for a task get no gradient from it; ``sigma = 1`` is hard sharing.
- sfg: with fixed single-task groups, task ``t`` never trains the kernels of another task's group.
- adashare: blocks a task skips get no gradient from it; the all-ones policy is the warm-up trunk.

Plus: refused pairs say why, and per-example task ids give what each task alone gives.
"""

import pytest
import torch
from torch import nn

from mtl_med.networks.blocks import HighResBlock, Trunk
from mtl_med.build import allowed_pairs, build_network, describe_backbone
from mtl_med.networks.heads import DenseHeads, PooledHeads
from mtl_med.sharing import METHODS
from mtl_med.sharing.adashare import GatedBlock
from mtl_med.sharing.branched import tree_params
from mtl_med.sharing.routing import RoutedNorm

NAMES = ["a", "b", "c"]
OUT = 2  # outputs per task
BATCH = 2

#: tiny versions of each backbone (a few channels per layer)
_RESNET = dict(width=0.0625, conv1_t_size=3, conv1_t_stride=1, no_max_pool=True)
TINY = {
    "highresnet": dict(features=(4, 4, 4), blocks_per_stage=1),
    "resnet18": _RESNET,
    "resnet34": _RESNET,
    "vgg11": dict(width=0.0625),
    "vgg11_bn": dict(width=0.0625),
    "vgg16": dict(width=0.0625),
    "vgg16_bn": dict(width=0.0625),
    # 5 and 10 channels: at width 0.0625 the first layer has one, and SFG's single-task grouping
    # needs at least T kernels per layer
    "mnist_cnn": dict(width=0.25),
}
#: smallest convenient input side: mnist_cnn's two unpadded 5x5 convolutions and poolings need 16
SIZE = {"mnist_cnn": 16}

PAIRS = {d: allowed_pairs(d) for d in (2, 3)}
ALLOWED = [(b, s, d) for d in (2, 3) for (b, s), why in PAIRS[d].items() if why is None]
REFUSED = [(b, s, d) for d in (2, 3) for (b, s), why in PAIRS[d].items() if why is not None]


def _build(backbone, sharing, num_tasks, spatial_dims, seed=0, names=None, **kwargs):
    torch.manual_seed(seed)
    names = NAMES[:num_tasks] if names is None else names
    return build_network(backbone, sharing, names, OUT, spatial_dims=spatial_dims, **TINY[backbone], **kwargs)


_REFERENCES: dict = {}


def _reference(backbone, sharing, num_tasks, spatial_dims, names=None):
    """A network in train mode that a check overwrites with another one's weights (every parameter
    and buffer, strictly), so one per configuration serves every test."""
    key = (backbone, sharing, num_tasks, spatial_dims, tuple(names or ()))
    if key not in _REFERENCES:
        _REFERENCES[key] = _build(backbone, sharing, num_tasks, spatial_dims, seed=123, names=names)
    return _REFERENCES[key].train()


def _input(backbone, spatial_dims, batch=BATCH, seed=1):
    spec = describe_backbone(backbone, spatial_dims, **TINY[backbone])
    size = SIZE.get(backbone, 8)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, spec.in_channels, *([size] * spatial_dims), generator=g)


def _losses(out: dict) -> list[torch.Tensor]:
    """One loss per task, against a fixed random target (a square loss: no cancellation)."""
    losses = []
    for k, v in enumerate(out.values()):
        target = torch.randn(v.shape, generator=torch.Generator().manual_seed(100 + k))
        losses.append((v - target).square().mean())
    return losses


def _grads(loss, params):
    return torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)


def _zero(g) -> bool:
    """No gradient at all, or exactly zero."""
    return g is None or bool((g == 0).all())


def _nonzero(grads) -> bool:
    return any(g is not None and bool((g != 0).any()) for g in grads)


def _copy_head(src, k, dst, j=0):
    """Head ``k`` of ``src`` into head ``j`` of ``dst``."""
    with torch.no_grad():
        if isinstance(src, PooledHeads):
            for a, b in zip([*src.weights, *src.biases], [*dst.weights, *dst.biases]):
                b[j].copy_(a[k])
        else:
            dst[j].load_state_dict(src[k].state_dict())


# ---- the defining property of each method ---------------------------------------------------------
# Each check gets the network as built by default, in train mode, its input ``x``, its outputs
# ``out`` of every task and ``grads[k][parameter]``, the gradients of task ``k``'s loss (None where
# the loss does not reach the parameter; methods of TASK_GRADS only, the others build another
# configuration and take their own).


def check_hard_sharing(net, backbone, num_tasks, spatial_dims, x, out, grads):
    for k in range(num_tasks):
        for p in net.trunk.parameters():
            g = grads[k][p]
            assert g is not None and bool((g != 0).any()), f"task {k} does not reach a trunk parameter"
    assert type(net.trunk) is Trunk
    with torch.no_grad():
        feats = net.task_features(x, None, None)
        assert len(feats) == num_tasks and all(f is feats[0] for f in feats)
        shared = net.trunk(x)  # train mode: batch statistics of the same batch, the same computation
        for k, name in enumerate(net.task_names):
            assert torch.equal(out[name], net.heads(shared, k))


def check_single_task(net, backbone, num_tasks, spatial_dims, x, out, grads):
    for k in range(num_tasks):
        for u, column in enumerate(net.columns):
            g = [grads[k][p] for p in column.parameters()]
            if u == k:
                assert _nonzero(g)
            else:
                assert all(_zero(v) for v in g), f"task {k}'s loss reaches column {u}"
    # column k and head k are a one-task network (train mode: batch statistics of the same batch)
    alone = _reference(backbone, "hard_sharing", 1, spatial_dims, names=["t"])
    with torch.no_grad():
        for k, name in enumerate(net.task_names):
            alone.trunk.load_state_dict(net.columns[k].state_dict())
            _copy_head(net.heads, k, alone.heads)
            assert torch.equal(out[name], alone(x)["t"])


def check_cross_stitch(net, backbone, num_tasks, spatial_dims, x, out, grads):
    # default stitches mix the columns: task k's loss trains every other column
    for k in range(num_tasks):
        for u, column in enumerate(net.columns):
            assert _nonzero([grads[k][p] for p in column.parameters()]), f"task {k}'s loss does not reach column {u}"
    # identity stitches: the single-task columns with the same weights. Exact: every stitched value
    # is 1 * x_t plus products with 0, which floating point sums to x_t.
    with torch.no_grad():
        for stitch in net.stitches:
            eye = torch.eye(num_tasks).reshape(num_tasks, num_tasks, *([1] * (stitch.alpha.ndim - 2)))
            stitch.alpha.copy_(eye.expand_as(stitch.alpha))
    single = _reference(backbone, "single_task", num_tasks, spatial_dims)
    single.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("stitches.")})
    with torch.no_grad():
        stitched, columns = net(x), single(x)
    for name in net.task_names:
        assert torch.equal(stitched[name], columns[name])


def _conv_feeding(net, x):
    """``(conv, routed_norm)`` for each routed norm whose input is the output of one convolution."""
    outputs, pairs, hooks = {}, {}, []  # outputs: id -> (conv, output), kept alive so ids stay unique

    def conv_out(conv, args, y):
        outputs[id(y)] = (conv, y)

    def norm_in(norm, args):
        pairs[id(norm)] = (outputs.get(id(args[0]), (None,))[0], norm)

    for m in net.trunk.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            hooks.append(m.register_forward_hook(conv_out))
        elif isinstance(m, RoutedNorm):
            hooks.append(m.register_forward_pre_hook(norm_in))
    try:
        with torch.no_grad():
            net(x, task=0)
    finally:
        for h in hooks:
            h.remove()
    return list(pairs.values())


def check_routing(net, backbone, num_tasks, spatial_dims, x, out, grads):
    pairs = _conv_feeding(net, x)
    routed = [m for m in net.trunk.modules() if isinstance(m, RoutedNorm)]
    assert len(pairs) == len(routed)
    # only HighResNet's pre-activation norms read a sum (the block's input), not one convolution
    pre = {id(b.norm1) for b in net.trunk.modules() if isinstance(b, HighResBlock)}
    assert all(conv is not None or id(norm) in pre for conv, norm in pairs)
    pairs = [(c, n) for c, n in pairs if c is not None]
    assert pairs
    masked_somewhere = False
    for t in range(num_tasks):
        reached = False
        for conv, norm in pairs:
            off = ~norm.route.masks[t]
            masked_somewhere |= bool(off.any())
            g = grads[t][conv.weight]
            assert g is not None
            assert bool((g[off] == 0).all()), f"task {t}: masked channels of {conv} get a gradient"
            reached |= bool((g[~off] != 0).any())
            for p in norm.norm.parameters():  # the norm's affine parameters of those channels too
                assert grads[t][p] is not None and bool((grads[t][p][off] == 0).all())
        assert reached
    assert masked_somewhere
    # sigma = 1: every mask is all ones and the network is hard sharing with the same weights
    routed1 = _build(backbone, "routing", num_tasks, spatial_dims, sigma=1.0).train()
    assert all(bool(layer.masks.all()) for layer in routed1.routing_layers())
    hard = _reference(backbone, "hard_sharing", num_tasks, spatial_dims)
    names = [n for n, m in routed1.named_modules() if isinstance(m, RoutedNorm)]
    state = {}
    for key, v in routed1.state_dict().items():
        owner = next((n for n in names if key.startswith(n + ".")), None)
        if owner is None:
            state[key] = v
        elif key.startswith(owner + ".norm."):
            state[owner + "." + key[len(owner + ".norm."):]] = v
        else:
            assert key.startswith(owner + ".route.")
    hard.load_state_dict(state)  # strict: every key matched
    with torch.no_grad():
        routed, shared = routed1(x), hard(x)  # x * 1 is x: the same computation
    for name in hard.task_names:
        assert torch.equal(routed[name], shared[name])


def check_sfg(net, backbone, num_tasks, spatial_dims, x, out, grads):
    # a fixed assignment: kernel block t belongs to task t, none shared (A.4's single-task split)
    fixed = _build(backbone, "sfg", num_tasks, spatial_dims).train()
    layers = [m for _, m in fixed.sfg_layers()]
    assert layers
    for m in layers:
        m.groups.fix(torch.arange(m.out_channels) * num_tasks // m.out_channels)
    for t, loss in enumerate(_losses(fixed(x, generator=torch.Generator().manual_seed(0)))):
        for m, g in zip(layers, _grads(loss, [m.conv.weight for m in layers])):
            groups = m.groups.assignment.argmax(-1)
            assert set(groups.tolist()) == set(range(num_tasks))
            assert g is not None and bool((g[groups == t] != 0).any())
            for u in range(num_tasks):
                if u != t:
                    assert bool((g[groups == u] == 0).all()), f"task {t} trains kernels of task {u}'s group"


def check_adashare(net, backbone, num_tasks, spatial_dims, x, out, grads):
    gated = sorted((m for m in net.trunk.modules() if isinstance(m, GatedBlock)), key=lambda m: m.index)
    assert len(gated) == net.num_blocks >= 2
    # warm-up (the default: ``out``) against the all-ones policy: every block run, the same computation
    assert net.policy.mode == "warmup"
    net.policy.set_policy(torch.ones(num_tasks, net.num_blocks, dtype=torch.bool))
    with torch.no_grad():
        ones = net(x)
    for name in net.task_names:
        assert torch.equal(out[name], ones[name])
    # a mixed policy: every task skips one block at least and runs one at least
    draw = torch.Generator().manual_seed(num_tasks * 10 + spatial_dims)
    policy = torch.rand(num_tasks, net.num_blocks, generator=draw) < 0.5
    for t in range(num_tasks):
        policy[t, t % net.num_blocks], policy[t, (t + 1) % net.num_blocks] = False, True
    net.policy.set_policy(policy)
    for t, loss in enumerate(_losses(net(x))):
        for block in gated:
            # a skipped block leaves its shortcut (ResNet's downsampling convolution where the
            # shape changes); the residual branch is what it skips
            params = [p for n, p in block.block.named_parameters() if not n.startswith("downsample.")]
            block_grads = _grads(loss, params)
            if policy[t, block.index]:
                assert _nonzero(block_grads), f"task {t} runs block {block.index} and does not train it"
            else:
                assert all(_zero(g) for g in block_grads), f"task {t} skips block {block.index} and trains it"


def check_branched(net, backbone, num_tasks, spatial_dims, x, out, grads):
    # the default tree shares every block: hard sharing with the same weights, unit for unit
    hard = _reference(backbone, "hard_sharing", num_tasks, spatial_dims)
    state = [v for k, v in net.state_dict().items() if k != "tree"]
    hard.load_state_dict(dict(zip(hard.state_dict(), state)))
    with torch.no_grad():
        ref = hard(x)
    for name in net.task_names:
        assert torch.equal(out[name], ref[name])
    # the last block split per task: task t's loss reaches only its own branch there, and the
    # parameters are the tree's formula
    tree = [[0] * num_tasks] * (len(net.blocks) - 1) + [list(range(num_tasks))]
    split = _build(backbone, "branched", num_tasks, spatial_dims, tree=tree).train()
    losses = _losses(split(x))
    for t, loss in enumerate(losses):
        for b, branch in enumerate(split.blocks[-1]):
            g = _grads(loss, list(branch.parameters()))
            assert _nonzero(g) if b == t else all(_zero(v) for v in g), f"task {t} and branch {b}"
    block = [sum(p.numel() for p in branches[0].parameters()) for branches in split.blocks]
    fixed = sum(p.numel() for m in (split.stem, split.heads) for p in m.parameters())
    assert tree_params(split.config, block, fixed) == sum(p.numel() for p in split.parameters())


def check_selective(net, backbone, num_tasks, spatial_dims, x, out, grads):
    # identical, identically initialised branches; the outputs are trunk -> shared FC -> own branch -> head
    assert net.assignment() == list(range(num_tasks))
    for w in [*net.branch_weights, *net.branch_biases]:
        assert all(torch.equal(w[b], w[0]) for b in range(num_tasks))
    with torch.no_grad():
        shared = net.shared_features(x)  # train mode: batch statistics of the same batch, the same computation
        for k, name in enumerate(net.task_names):
            assert torch.equal(out[name], net.heads(net.branch(shared, k), k))
    # before any merge each task's loss reaches only its own branch, exactly
    weights = [*net.branch_weights, *net.branch_biases]
    for t, loss in enumerate(_losses(net(x))):
        for g in _grads(loss, weights):
            assert bool((g[t] != 0).any()), f"task {t} does not train its branch"
            assert all(bool((g[b] == 0).all()) for b in range(num_tasks) if b != t), f"task {t} trains another branch"
    # a merge rewrites the map only: the group's tasks share the survivor, the rest is untouched
    keys, before = list(net.state_dict()), net.active_parameter_count()
    net.merge([0, 1], survivor=1)
    assert list(net.state_dict()) == keys and net.assignment() == [1, 1, *range(2, num_tasks)]
    assert net.active_branches() == list(range(1, num_tasks))
    assert before - net.active_parameter_count() == net.branch_parameter_count()
    merged = net(x)
    for t, loss in enumerate(_losses(merged)):
        own = 1 if t < 2 else t
        for g in _grads(loss, weights):
            assert bool((g[own] != 0).any()) and all(bool((g[b] == 0).all()) for b in range(num_tasks) if b != own)
    with torch.no_grad():
        shared = net.shared_features(x)
        assert torch.equal(merged[net.task_names[0]], net.heads(net.branch(shared, 1), 0))


CHECKS = {
    "branched": check_branched,
    "selective": check_selective,
    "hard_sharing": check_hard_sharing,
    "single_task": check_single_task,
    "cross_stitch": check_cross_stitch,
    "routing": check_routing,
    "sfg": check_sfg,
    "adashare": check_adashare,
}
#: methods whose check reads the per-task gradients of the default network
TASK_GRADS = {"hard_sharing", "single_task", "cross_stitch", "routing"}


def test_every_method_has_a_check():
    assert set(CHECKS) == set(METHODS)
    assert {s for _, s, _ in ALLOWED} == set(METHODS)
    assert {b for b, _, _ in ALLOWED} == set(TINY)


@pytest.mark.parametrize("num_tasks", [2, 3], ids=["T2", "T3"])
@pytest.mark.parametrize("backbone,sharing,spatial_dims", ALLOWED, ids=[f"{b}-{s}-{d}d" for b, s, d in ALLOWED])
def test_pair(backbone, sharing, spatial_dims, num_tasks):
    net = _build(backbone, sharing, num_tasks, spatial_dims).train()
    x = _input(backbone, spatial_dims)
    # forward and backward with the method's defaults
    out = net(x, generator=torch.Generator().manual_seed(0))
    assert list(out) == net.task_names == NAMES[:num_tasks]
    for v in out.values():
        size = x.shape[2:] if isinstance(net.heads, DenseHeads) else ()
        assert v.shape == (BATCH, OUT, *size) and bool(torch.isfinite(v).all())
    losses = _losses(out)
    params = [p for p in net.parameters() if p.requires_grad]
    if sharing in TASK_GRADS:
        assert not net.regularizer().requires_grad
        grads = [dict(zip(params, _grads(loss, params))) for loss in losses]  # one backward pass per task
    else:
        (sum(losses) + net.regularizer()).backward()
        grads = [{p: p.grad for p in params}]
    assert all(g is None or bool(torch.isfinite(g).all()) for gs in grads for g in gs.values())
    assert all(any(gs[p] is not None for gs in grads) for p in net.heads.parameters())
    CHECKS[sharing](net, backbone, num_tasks, spatial_dims, x, out, grads)


@pytest.mark.parametrize("backbone,sharing,spatial_dims", REFUSED, ids=[f"{b}-{s}-{d}d" for b, s, d in REFUSED])
def test_refused_pair_says_why(backbone, sharing, spatial_dims):
    with pytest.raises(ValueError) as e:
        _build(backbone, sharing, 2, spatial_dims)
    message = str(e.value)
    assert backbone in message and sharing in message and PAIRS[spatial_dims][(backbone, sharing)] in message


#: per-method settings that make the per-example test meaningful and deterministic in eval mode
PER_EXAMPLE = {
    "sfg": dict(grouping="constant_mask"),  # every group holds kernels
    "branched": dict(tree=[[0, 0, 0], [0, 0, 1], [0, 1, 2], [0, 1, 2]]),  # tasks on different paths
}


@pytest.mark.parametrize("sharing", sorted(METHODS))
def test_per_example_task_ids_equal_each_task_alone(sharing):
    backbone, num_tasks = "highresnet", 3
    net = _build(backbone, sharing, num_tasks, 2, **PER_EXAMPLE.get(sharing, {}))
    x = _input(backbone, 2, batch=6)
    with torch.no_grad():
        net.train()(x, generator=torch.Generator().manual_seed(0))  # running statistics not the defaults
    net.eval()
    if sharing == "sfg":
        net.set_inference("argmax")
    if sharing == "adashare":
        net.policy.set_policy(torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=torch.bool))
    for ids in ([2, 0, 1, 2, 0, 1], [2, 0, 2, 2, 0, 0]):
        ids = torch.tensor(ids)
        with torch.no_grad():
            out = net(x, task=ids)
            assert set(out) == {NAMES[k] for k in ids.tolist()}
            for k in torch.unique(ids).tolist():
                alone = net(x[ids == k], task=k)[NAMES[k]]
                # the same arithmetic per row, but on batches of other sizes, whose convolution
                # kernels may sum in another order: equal to rounding
                torch.testing.assert_close(out[NAMES[k]], alone, rtol=1e-5, atol=1e-6)
