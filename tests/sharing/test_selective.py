"""Selective Sharing (Strezoski et al.): the TT-SVD, the gradient factors, the clustering under the four
sharing conditions, survivors, the stop rule, merges that keep checkpoints and the optimiser valid,
and the method's defining property (a task's loss reaches only its branch until a merge)."""

import math

import numpy as np
import pytest
import torch

from mtl_med.build import build_network
from mtl_med.sharing import METHODS, SelectiveSharing
from mtl_med.build import selective_mnist
from mtl_med.sharing.selective import (
    FactorAccumulator,
    StopRule,
    cluster_branches,
    factor_vectors,
    merge_groups,
    mutual_reachability,
    pairwise_distances,
    pick_survivor,
    tensorize_shape,
    tt_full_ranks,
    tt_reconstruct,
    tt_svd,
)

TASKS = ["a", "b", "c", "d"]
SMALL = dict(width=0.25, shared_width=24, branch_widths=(12, 6))


def _net(tasks=TASKS, seed=0, **kw):
    torch.manual_seed(seed)
    return build_network("mnist_cnn", "selective", list(tasks), 2, spatial_dims=2, in_channels=1, **{**SMALL, **kw})


def _x(batch=4, size=16, seed=1):
    return torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _losses(out):
    return [torch.nn.functional.cross_entropy(v, torch.arange(v.shape[0]) % 2) for v in out.values()]


# ---- TT-SVD ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (10, 10, 20, 32), (7,), (2, 9)])
def test_tt_svd_is_exact_at_full_rank(shape):
    g = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cores = tt_svd(g)
    ranks = tt_full_ranks(shape)
    assert [tuple(c.shape) for c in cores] == [(ranks[k], n, ranks[k + 1]) for k, n in enumerate(shape)]
    torch.testing.assert_close(tt_reconstruct(cores), g, rtol=0, atol=1e-10)


def test_fixed_ranks_give_fixed_shapes_and_low_rank_tensors_stay_exact():
    gen = torch.Generator().manual_seed(0)
    u, v, w, z = (torch.randn(n, dtype=torch.float64, generator=gen) for n in (4, 5, 6, 7))
    rank_one = torch.einsum("a,b,c,d->abcd", u, v, w, z)
    cores = tt_svd(rank_one, 3)  # rank 1 padded with zero slices to the requested rank 3
    assert [tuple(c.shape) for c in cores] == [(1, 4, 3), (3, 5, 3), (3, 6, 3), (3, 7, 1)]
    torch.testing.assert_close(tt_reconstruct(cores), rank_one, rtol=0, atol=1e-12)
    full = torch.randn(4, 5, 6, 7, dtype=torch.float64, generator=gen)
    approx = tt_reconstruct(tt_svd(full, 2))
    assert 0 < float((approx - full).norm()) < float(full.norm())
    with pytest.raises(ValueError):
        tt_svd(full, [1, 2, 2, 1])  # one rank short


def _unfoldings(cores):
    return [c.reshape(-1, c.shape[-1]) for c in cores[:-1]]


def test_sign_fixed_cores_are_unique_and_deterministic():
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        g = torch.randn(6, 5, 8, 4, dtype=torch.float64, generator=gen)
        cores = tt_svd(g, 3)
        for u in _unfoldings(cores):  # the convention: largest-magnitude entry of each column positive
            top = u.gather(0, u.abs().argmax(0, keepdim=True))
            assert bool((top > 0).all())
        # -G: the left-orthonormal cores are the same, the sign sits in the last core
        neg = tt_svd(-g, 3)
        for a, b in zip(cores[:-1], neg[:-1]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        torch.testing.assert_close(neg[-1], -cores[-1], rtol=0, atol=1e-10)
        # another precision or the batched path give the same cores, not just the same product
        single = tt_svd(g.float(), 3)
        for a, b in zip(cores, single):
            torch.testing.assert_close(b.double(), a, rtol=0, atol=5e-3)
        assert all(torch.equal(a, b) for a, b in zip(cores, tt_svd(g, 3)))


def test_factor_vectors_have_fixed_length_unit_norm_and_batch_independence():
    assert tensorize_shape(100, 640) == (10, 10, 20, 32)
    assert tensorize_shape(7, 12) == (1, 7, 3, 4)
    grads = torch.randn(3, 100, 640, generator=torch.Generator().manual_seed(0))
    rows = factor_vectors(grads, rank=4)
    assert rows.shape == (3, 1 * 10 * 4 + 4 * 10 * 4 + 4 * 20 * 4 + 4 * 32 * 1)  # 648 numbers per mini-batch at rank 4
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(3))
    alone = factor_vectors(grads[1:2] * 5.0, rank=4)  # another batch and scale: the same row
    torch.testing.assert_close(alone[0], rows[1], rtol=0, atol=3e-4)
    assert bool((factor_vectors(torch.zeros(1, 12, 20)) == 0).all())


# ---- clustering --------------------------------------------------------------------------------------
FAMILIES = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]  # ten branches, three task families (the paper's MNIST group sizes)


def _planted_points(batches=6, noise=0.15, seed=0):
    """Per mini-batch, each family has its own gradient; a branch's is its family's plus noise, at its
    own scale (one-vs-all tasks have different loss scales)."""
    gen = torch.Generator().manual_seed(seed)
    acc = FactorAccumulator(rank=4)
    scales = torch.logspace(-2, 1, len(FAMILIES))[torch.randperm(len(FAMILIES), generator=gen)]
    for _ in range(batches):
        base = torch.randn(3, 20, 48, generator=gen)
        grads = torch.stack([scales[b] * (base[f] + noise * torch.randn(20, 48, generator=gen)) for b, f in enumerate(FAMILIES)])
        acc.add(range(len(FAMILIES)), grads)
    branches, points = acc.points()
    assert branches == list(range(len(FAMILIES))) and len(acc) == batches
    torch.testing.assert_close(points.norm(dim=1), torch.ones(len(FAMILIES), dtype=torch.float64))
    return points


def test_planted_gradients_of_three_families_cluster_into_those_families():
    points = _planted_points()
    labels = cluster_branches(points, "similarity")
    assert labels.tolist() == FAMILIES  # groups numbered in order of their first branch
    # dissimilarity pairs branches from different families; never two of one family
    far = cluster_branches(points, "dissimilarity")
    for g in set(far.tolist()) - {-1}:
        members = [FAMILIES[b] for b in np.flatnonzero(far == g)]
        assert len(members) >= 2 and len(set(members)) == len(members)
    # variance joins clusters closer than the median distance: coarser than similarity, never finer
    wide = cluster_branches(points, "variance")
    for g in set(labels.tolist()):
        assert len(set(wide[labels == g].tolist())) == 1 and wide[labels == g][0] >= 0


def test_unrelated_branches_stay_alone_and_degenerate_inputs():
    points = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    points[3] = points[1] + 1e-3  # only these two are related: they form a group of their own
    labels = cluster_branches(points, "similarity")
    assert labels[1] == labels[3] >= 0 and sum(labels == labels[1]) == 2
    assert cluster_branches(points[:1]).tolist() == [-1]
    assert cluster_branches(points[:2]).tolist() == [-1, -1]  # no single cluster: two branches never merge
    assert cluster_branches(points[:2], allow_single_cluster=True).tolist() == [0, 0]
    with pytest.raises(ValueError, match="condition"):
        cluster_branches(points, "entropy")
    # min_samples counts the point itself (scikit-learn): 2 = the nearest other point
    d = pairwise_distances(points)
    mr = mutual_reachability(d, 2)
    nearest = np.sort(d, 1)[:, 1]
    assert mr[0, 2] == pytest.approx(max(d[0, 2], nearest[0], nearest[2]))


def test_random_condition_gives_the_requested_group_count():
    points = _planted_points()
    sim_sizes = sorted(np.bincount(cluster_branches(points, "similarity")).tolist())
    partitions = set()
    for seed in range(6):
        labels = cluster_branches(points, "random", seed=seed)
        assert sorted(np.bincount(labels[labels >= 0]).tolist()) == sim_sizes  # matched to similarity's groups
        assert labels.tolist() == cluster_branches(points, "random", seed=seed).tolist()  # seeded
        partitions.add(tuple(labels.tolist()))
        for k in (1, 2, 4, 5):
            labels = cluster_branches(points, "random", seed=seed, num_groups=k)
            groups = set(labels.tolist()) - {-1}
            assert len(groups) == k and all((labels == g).sum() >= 2 for g in groups)
    assert len(partitions) > 1 and tuple(FAMILIES) not in partitions
    with pytest.raises(ValueError):
        cluster_branches(points, "random", num_groups=6)  # ten branches hold at most five groups
    with pytest.raises(ValueError):
        cluster_branches(points, "similarity", num_groups=2)


# ---- survivors, merges, stop rule ------------------------------------------------------------------------
def test_the_survivor_is_the_branch_of_lowest_loss():
    losses = {0: 0.5, 2: 0.2, 5: 0.9, 7: 0.2}
    assert pick_survivor([0, 2, 5], losses) == 2
    assert pick_survivor([5, 0], losses) == 0
    assert pick_survivor([7, 2], losses) == 2  # a tie goes to the lower index
    assert pick_survivor([5, 9], losses) == 5  # no loss: never preferred
    assert pick_survivor([0, 5], {0: float("nan"), 5: 1.0}) == 5
    new, merges = merge_groups([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], [0, 1, 0, -1, 1, 0], {0: 0.3, 1: 0.1, 2: 0.2, 3: 0.0, 4: 0.4, 5: 0.5})
    assert new == [2, 1, 2, 3, 1, 2]
    assert merges == [{"members": [0, 2, 5], "survivor": 2}, {"members": [1, 4], "survivor": 1}]
    # after a merge the clustering points are branches: merging branch 2 (tasks 0, 2, 5) with 3
    again, _ = merge_groups(new, [1, 2, 3], [-1, 0, 0], {1: 0.1, 2: 0.3, 3: 0.2})
    assert again == [3, 1, 3, 3, 1, 3]


def test_stop_rule_locks_after_three_unchanged_epochs_or_when_every_task_is_grouped():
    rule = StopRule(patience=3)
    assert not rule.update(True, [0, 0, 2, 3])
    assert not rule.update(False, [0, 0, 2, 3]) and not rule.update(False, [0, 0, 2, 3])
    assert rule.update(False, [0, 0, 2, 3]) and rule.unchanged == 3
    rule = StopRule(patience=3)
    rule.update(False, [0, 1, 2])
    rule.update(False, [0, 1, 2])
    assert not rule.update(True, [0, 0, 2]) and rule.unchanged == 0  # a change resets the count
    resumed = StopRule(patience=3)
    resumed.load_state_dict(rule.state_dict())
    assert not resumed.update(False, [0, 0, 2])
    assert resumed.update(True, [0, 0, 0])  # every task shares its branch with another
    with pytest.raises(ValueError):
        StopRule(patience=0)


# ---- the network -------------------------------------------------------------------------------------------
def test_paper_mnist_network():
    net = selective_mnist()
    assert isinstance(net, SelectiveSharing) and METHODS["selective"] is SelectiveSharing
    assert net.shared.weight.shape == (640, 640)  # the flattened 40 x 4 x 4 features into FC 640
    assert [tuple(w.shape) for w in net.branch_weights] == [(10, 100, 640), (10, 50, 100)]
    out = net(torch.randn(2, 1, 28, 28))
    assert list(out) == [f"digit_{k}" for k in range(10)] and all(v.shape == (2, 2) for v in out.values())
    conv = (20 * 25 + 2 * 20) + (40 * 20 * 25 + 2 * 40)
    branches = 10 * (100 * 640 + 100 + 50 * 100 + 50)
    assert sum(p.numel() for p in net.parameters()) == conv + 640 * 640 + 640 + branches + 10 * (50 * 2 + 2)
    assert net.active_parameter_count() == sum(p.numel() for p in net.parameters())
    net.merge([2, 3, 5], survivor=3)
    assert net.active_parameter_count() == sum(p.numel() for p in net.parameters()) - 2 * (100 * 640 + 100 + 50 * 100 + 50)
    assert net.groups()[2:4] == [["digit_2", "digit_3", "digit_5"], ["digit_4"]]


def test_dense_backbones_apply_the_fc_layers_at_every_voxel():
    torch.manual_seed(0)
    net = build_network("highresnet", "selective", ["sct", "seg"], (1, 3), features=(4, 4, 4), blocks_per_stage=1, shared_width=8, branch_widths=(6,))
    x = torch.randn(2, 1, 8, 8)
    out = net(x)
    assert out["sct"].shape == (2, 1, 8, 8) and out["seg"].shape == (2, 3, 8, 8)
    with torch.no_grad():  # one voxel's output is the FC chain on that voxel's features
        f = net.trunk.eval()(x)[0, :, 3, 5]
        y = torch.relu(net.shared(f))
        y = torch.relu(y @ net.branch_weights[0][1].T + net.branch_biases[0][1])
        ref = net.heads[1].weight[:, :, 0, 0] @ y + net.heads[1].bias
        torch.testing.assert_close(net.eval()(x)["seg"][0, :, 3, 5], ref, rtol=1e-5, atol=1e-6)


def test_a_task_trains_only_its_branch_until_a_merge_then_the_survivor():
    net = _net().train()
    x = _x()
    first = net.branch_weights[0]
    for t, loss in enumerate(_losses(net(x))):
        (g,) = torch.autograd.grad(loss, [first], retain_graph=True)
        assert bool((g[t] != 0).any()) and all(bool((g[b] == 0).all()) for b in range(len(TASKS)) if b != t)
    net.merge([0, 2, 3], survivor=2)
    assert net.assignment() == [2, 1, 2, 2] and net.groups() == [["b"], ["a", "c", "d"]]
    for t, loss in enumerate(_losses(net(x))):
        (g,) = torch.autograd.grad(loss, [first], retain_graph=True)
        own = 1 if t == 1 else 2
        assert bool((g[own] != 0).any()) and all(bool((g[b] == 0).all()) for b in range(len(TASKS)) if b != own)
    branches, grads = (net.zero_grad(), sum(_losses(net(x))).backward(), net.branch_weight_grads())[2]
    assert branches == [1, 2] and grads.shape == (2, 12, 24)
    with pytest.raises(ValueError):
        net.merge([0, 1], survivor=3)
    with pytest.raises(ValueError):
        net.set_assignment([0, 1, 2, 4])


def test_state_dict_and_optimiser_state_survive_a_merge_and_resume_keeps_the_groups():
    net = _net().train()
    opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.5)
    x = _x()

    def step():
        opt.zero_grad()
        sum(_losses(net(x))).backward()
        opt.step()

    step()
    keys = {k: v.shape for k, v in net.state_dict().items()}
    params = [id(p) for p in net.parameters()]
    momentum = {k: v["momentum_buffer"].clone() for k, v in opt.state_dict()["state"].items()}
    net.merge([1, 3], survivor=3)
    assert {k: v.shape for k, v in net.state_dict().items()} == keys and [id(p) for p in net.parameters()] == params
    state = opt.state_dict()["state"]
    assert set(state) == set(momentum) and all(torch.equal(state[k]["momentum_buffer"], v) for k, v in momentum.items())
    unused = net.branch_weights[0][1].detach().clone()
    step()  # the optimiser steps on as before; the discarded branch gets no gradient
    assert bool((net.branch_weights[0].grad[1] == 0).all())
    # a checkpoint of the merged network loads strictly into a fresh one: the same groups, the same outputs
    resumed = _net(seed=5)
    resumed.load_state_dict(net.state_dict())
    assert resumed.assignment() == [0, 3, 2, 3] and resumed.active_branches() == [0, 2, 3]
    net.eval(), resumed.eval()
    with torch.no_grad():
        a, b = net(x), resumed(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # momentum only: the discarded slot drifts by its decaying momentum, unused by any task
    assert not torch.equal(unused, net.branch_weights[0][1]) or bool((momentum[next(iter(momentum))] == 0).all())
    net.lock()
    resumed.load_state_dict(net.state_dict())
    assert resumed.is_locked


def test_per_example_task_ids_follow_the_map():
    net = _net().eval()
    net.merge([0, 1], survivor=0)
    x, ids = _x(batch=6), torch.tensor([1, 0, 3, 2, 1, 3])
    with torch.no_grad():
        out = net(x, task=ids)
        for k in ids.unique().tolist():
            torch.testing.assert_close(out[TASKS[k]], net(x[ids == k], task=k)[TASKS[k]], rtol=1e-5, atol=1e-6)


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="condition"):
        _net(condition="entropy")
    with pytest.raises(ValueError, match="branch_widths"):
        _net(branch_widths=())
    with pytest.raises(ValueError, match="patience"):
        _net(patience=0)
    assert math.isclose(_net(dropout=0.2).branch_parameter_count(), 24 * 12 + 12 + 12 * 6 + 6)


# ---- the training side: SelectiveSharingHandler on MultiTaskTrainer -----------------------------------------
class _Writer:
    """A SummaryWriter stand-in that keeps what it is given."""

    def __init__(self):
        self.scalars, self.images = {}, {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, float(value)))

    def add_image(self, tag, image, step, dataformats="CHW"):
        self.images.setdefault(tag, []).append((step, image, dataformats))


def _loader(batches=3, batch=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(batches * batch):
        digit = int(torch.randint(0, 4, (), generator=gen))
        image = torch.randn(1, 16, 16, generator=gen) + digit
        items.append({"image": image, "targets": {t: torch.tensor(int(digit == k)) for k, t in enumerate(TASKS)}})
    return torch.utils.data.DataLoader(items, batch_size=batch, shuffle=False)


def _train(net, epochs, handler, spy=None):
    from ignite.engine import Events

    from mtl_med.engines import MultiTaskPrepareBatch, MultiTaskTrainer
    from mtl_med.losses import MultiTaskLoss

    trainer = MultiTaskTrainer(
        device=torch.device("cpu"), max_epochs=epochs, train_data_loader=_loader(), network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.5),
        loss_function=MultiTaskLoss({t: torch.nn.CrossEntropyLoss() for t in TASKS}),
        prepare_batch=MultiTaskPrepareBatch("image", "targets"), train_handlers=[handler],
    )
    if spy is not None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, spy)
    trainer.run()
    return trainer


def test_handler_captures_every_iteration_clusters_and_records_each_epoch(tmp_path):
    import json

    from monai.engines.utils import IterationEvents

    net, writer, record = _net(), _Writer(), tmp_path / "selective.json"
    (handler,) = net.train_handlers(summary_writer=writer, record_file=record)
    terms = []
    trainer = _train(net, 3, handler, spy=lambda e: terms.append({t: float(v) for t, v in e.state.output["terms"].items()}))
    assert trainer.has_event_handler(handler.capture, IterationEvents.BACKWARD_COMPLETED)  # after backward, before the step
    data = json.loads(record.read_text())
    assert data["task_names"] == TASKS and data["settings"]["condition"] == "similarity"
    epochs = data["epochs"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    first = epochs[0]
    assert first["clustered"] and first["batches"] == 3 and first["branches"] == [0, 1, 2, 3]
    assert np.asarray(first["distances"]).shape == (4, 4) and len(first["labels"]) == 4
    for t in TASKS:  # the epoch's mean loss of each task, from state.output["terms"]
        assert first["task_losses"][t] == pytest.approx(np.mean([x[t] for x in terms[:3]]))
    for r in epochs:
        assert sorted(sum(r["groups"], [])) == TASKS  # every task in exactly one group
        for m in r.get("merges", []):  # each group keeps its branch of lowest loss
            losses = {int(b): v for b, v in m["losses"].items()}
            assert m["survivor"] == min(m["members"], key=lambda b: (losses[b], b))
    last = epochs[-1]
    assert last["branch_of_task"] == dict(zip(TASKS, net.assignment())) and last["active_parameters"] == net.active_parameter_count()
    assert last["locked"] == net.is_locked
    assert [s for s, _ in writer.scalars["selective/active_branches"]] == [1, 2, 3]
    step, image, fmt = writer.images["selective/membership"][-1]
    assert step == 3 and fmt == "HWC" and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert writer.images["selective/clusters"][0][0] == 1


def test_handler_merges_into_the_lowest_loss_branch_locks_and_resumes(tmp_path, monkeypatch):
    import json

    import mtl_med.sharing.selective.handler as engine_module

    plan = {1: [0, -1, 0, -1]}  # seed (the settings' 0 + the epoch) -> labels: branches 0 and 2 group at epoch 1
    monkeypatch.setattr(engine_module, "cluster_branches", lambda points, condition, seed, **kw: np.array(plan.get(seed, [-1] * len(points))))
    net, record = _net(patience=2), tmp_path / "selective.json"
    (handler,) = net.train_handlers(record_file=record)
    _train(net, 4, handler)
    epochs = json.loads(record.read_text())["epochs"]
    first = epochs[0]
    losses = {int(b): v for b, v in first["branch_losses"].items()}
    survivor = 0 if losses[0] <= losses[2] else 2
    assert first["survivors"] == [survivor] and first["merges"][0]["tasks"] == ["a", "c"]
    assert net.assignment() == [survivor, 1, survivor, 3]
    assert first["groups"] == ([["a", "c"], ["b"], ["d"]] if survivor == 0 else [["b"], ["a", "c"], ["d"]])
    # epochs 2 and 3 change nothing: locked after the third (patience 2); epoch 4 neither captures nor clusters
    assert [r["locked"] for r in epochs] == [False, False, True, True] and epochs[2]["lock_epoch"] == 3
    assert epochs[3]["batches"] == 0 and not epochs[3]["clustered"] and net.is_locked
    assert epochs[3]["active_parameters"] == sum(p.numel() for p in net.parameters()) - net.branch_parameter_count()
    # resume: the network's state dict keeps the groups and the lock, the handler's its records
    fresh = _net(seed=3)
    fresh.load_state_dict(net.state_dict())
    (again,) = fresh.train_handlers(record_file=record)
    again.load_state_dict(handler.state_dict())
    assert fresh.assignment() == net.assignment() and fresh.is_locked and again.records == handler.records
    assert again.stop.locked and again.lock_epoch == 3


def test_handler_skips_non_finite_gradients_and_refuses_other_networks():
    from types import SimpleNamespace

    from mtl_med.sharing.selective import SelectiveSharingHandler

    net = _net()
    (handler,) = net.train_handlers()
    engine = SimpleNamespace(state=SimpleNamespace(epoch=1))
    sum(_losses(net(_x()))).backward()
    handler.capture(engine)
    net.branch_weights[0].grad[2, 0, 0] = float("inf")  # an AMP overflow: the scaler skips the step, so do we
    handler.capture(engine)
    assert len(handler.factors) == 1 and handler.skipped == 1
    with pytest.raises(ValueError, match="selective"):
        SelectiveSharingHandler(build_network("mnist_cnn", "hard_sharing", TASKS, 2, in_channels=1, width=0.25))
    with pytest.raises(ValueError, match="unknown"):
        net.train_handlers(temperature=1.0)
