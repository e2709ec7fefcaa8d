"""Task affinity by RSA (Branched Multi-Task Networks, section 3.1): RDMs, Spearman, the affinity
tensor, the streaming stage on tiny networks, figures and affinity.npz."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from mtl_med.build import build_network
from mtl_med.sharing.branched.affinity import (
    AffinityResult,
    affinity_image,
    affinity_tensor,
    collect_features,
    feature_locations,
    load_affinity,
    location_names,
    network_rdms,
    pareto_image,
    rdm,
    rdm_similarity,
    save_affinity,
    select_images,
    task_affinity,
    tree_image,
    trunk_of,
)


def _net(seed: int):
    torch.manual_seed(seed)
    net = build_network("vgg11_bn", "hard_sharing", ["t"], 2, width=1 / 16, in_channels=1)
    with torch.no_grad():  # non-trivial batch-norm statistics so that eval mode differs from train mode
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net


def _images(n: int = 20, seed: int = 0):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _average_ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their positions (written out, no scipy)."""
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


# --- RDM --------------------------------------------------------------------------------------------
X46 = np.array(
    [
        [1.0, 2.0, 0.0, 3.0, 1.0, 4.0],
        [0.5, 1.0, 2.0, 0.0, 3.0, 1.0],
        [2.0, 2.0, 1.0, 1.0, 0.0, 5.0],
        [3.0, 0.0, 1.0, 2.0, 2.0, 2.0],
    ]
)


def _hand_rdm(x: np.ndarray, center: bool) -> np.ndarray:
    if center:
        x = x - x.mean(axis=0, keepdims=True)
    k = x.shape[0]
    out = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            a, b = x[i] - x[i].mean(), x[j] - x[j].mean()
            out[i, j] = 1.0 - (a @ b) / np.sqrt((a @ a) * (b @ b))
    np.fill_diagonal(out, 0.0)
    return out


@pytest.mark.parametrize("center", [True, False])
def test_rdm_equals_a_hand_computation(center):
    want = _hand_rdm(X46, center)
    got = rdm(X46, center_features=center)
    assert isinstance(got, np.ndarray) and got.shape == (4, 4)
    np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_allclose(rdm(torch.tensor(X46, dtype=torch.float32), center).numpy(), want, atol=1e-6)
    if center:  # Dwivedi & Roig's recipe: np.corrcoef of the feature-centred rows
        np.testing.assert_allclose(got, 1.0 - np.corrcoef(X46 - X46.mean(0)), atol=1e-12)
    assert not np.allclose(rdm(X46, True), rdm(X46, False))  # the option matters


def test_rdm_is_symmetric_with_zero_diagonal_and_ignores_the_order_of_features(monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 50, generator=g) + torch.linspace(0, 3, 50)
    r = rdm(x)
    assert r.shape == (10, 10) and r.dtype == torch.float64
    assert torch.equal(r, r.T) and torch.all(r.diagonal() == 0.0)
    assert torch.all(r[~torch.eye(10, dtype=torch.bool)] > 0)
    perm = torch.randperm(50, generator=g)
    torch.testing.assert_close(rdm(x[:, perm]), r, atol=1e-12, rtol=0)
    # computed in chunks of features: the same RDM as in one piece
    monkeypatch.setattr("mtl_med.sharing.branched.affinity._RDM_CHUNK_ELEMENTS", 30)
    torch.testing.assert_close(rdm(x), r, atol=1e-12, rtol=0)
    torch.testing.assert_close(rdm(x, center_features=False), torch.as_tensor(_hand_rdm(x.double().numpy(), False)), atol=1e-12, rtol=0)


def test_rdm_of_an_image_with_constant_features_warns():
    x = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [3.0, 1.0, 2.0]])
    with pytest.warns(RuntimeWarning, match="constant"):
        r = rdm(x, center_features=False)
    assert np.isfinite(r).all() and r[1, 0] == r[1, 2] == 1.0 and r[1, 1] == 0.0


# --- Spearman and the affinity tensor ----------------------------------------------------------------
def test_rdm_similarity_is_pearson_of_average_ranks_of_the_strict_upper_triangles():
    g = np.random.default_rng(0)
    k = 9
    a = np.round(g.random((k, k)), 1)  # one decimal: many ties
    b = np.round(0.5 * a + 0.5 * g.random((k, k)), 1)
    iu = np.triu_indices(k, 1)
    assert len(np.unique(a[iu])) < len(iu[0])  # there are ties
    ra, rb = _average_ranks(a[iu]), _average_ranks(b[iu])
    want = np.corrcoef(ra, rb)[0, 1]
    assert rdm_similarity(a, b) == pytest.approx(want, abs=1e-12)
    # the diagonal and the lower triangle are not read
    a2, b2 = a.copy(), b.copy()
    a2[np.tril_indices(k)] = g.random(k * (k + 1) // 2)
    b2[np.tril_indices(k)] = -5.0
    assert rdm_similarity(a2, b2) == pytest.approx(want, abs=1e-12)
    # a monotone transform of one RDM does not change a rank correlation; Pearson would change
    assert rdm_similarity(a, b**3) == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError):
        rdm_similarity(a[:2, :2], b[:2, :2])


def test_affinity_tensor_is_symmetric_with_unit_diagonal():
    g = torch.Generator().manual_seed(2)
    rdms = {t: torch.stack([rdm(torch.randn(8, 12, generator=g)) for _ in range(3)]) for t in "abc"}
    a = affinity_tensor(rdms)
    assert a.shape == (3, 3, 3)
    assert np.array_equal(a, a.transpose(0, 2, 1))
    assert np.all(a[:, range(3), range(3)] == 1.0)
    assert a[1, 0, 2] == pytest.approx(rdm_similarity(rdms["a"][1], rdms["c"][1]))
    assert np.all(np.abs(a) <= 1.0) and not np.allclose(a, 1.0)
    assert np.array_equal(affinity_tensor([rdms[t] for t in "abc"]), a)
    swapped = affinity_tensor(rdms, task_names=["c", "b", "a"])  # the mapping read in that order
    assert np.array_equal(swapped, a[:, ::-1, ::-1])
    with pytest.raises(ValueError):
        affinity_tensor([rdms["a"], rdms["b"][:2]])


# --- features and the streaming stage ------------------------------------------------------------------
def test_locations_are_the_outputs_of_the_blocks_after_the_stem():
    net = _net(0).eval()
    trunk = trunk_of(net)
    assert trunk is net.trunk and trunk_of(trunk) is trunk
    assert feature_locations(net) == list(trunk.branch_points[1:]) and len(trunk.branch_points) == 5
    assert location_names(net) == ["block1", "block2", "block3", "block4"]
    x = _images(6)
    feats = collect_features(net, x, batch_size=4)
    assert len(feats) == 4
    for f, unit in zip(feats, trunk.branch_points[1:]):
        with torch.no_grad():
            want = trunk.run(x, 0, unit + 1).flatten(1)
        assert f.dtype == torch.float32 and f.device.type == "cpu"
        torch.testing.assert_close(f, want)
    # a loader of dict / tuple batches gives the same features
    loader = [{"image": x[:4], "label": 0}, {"image": x[4:]}]
    for a, b in zip(collect_features(net, loader), feats):
        torch.testing.assert_close(a, b)
    for a, b in zip(collect_features(net, [(x[:3], 1), (x[3:], 2)]), feats):
        torch.testing.assert_close(a, b)
    # a hard-sharing network whose other heads weighed 0 (the bundles' single-task runs) has its trunk read;
    # a network whose trunk is not plain (task routing) has none
    two = build_network("vgg11_bn", "hard_sharing", ["a", "b"], 2, width=1 / 16, in_channels=1)
    assert trunk_of(two) is two.trunk
    with pytest.raises(TypeError, match="no plain trunk"):
        trunk_of(build_network("vgg11_bn", "routing", ["a", "b"], 2, width=1 / 16, in_channels=1))


def test_pool_to_shrinks_the_features_and_keeps_the_shapes():
    net = _net(0)
    x = _images(8)
    full = collect_features(net, x)
    pooled = collect_features(net, x, pool_to=1)
    # 16x16 input: the blocks' outputs are 4x4, 2x2, 1x1, 1x1 (4x 8, 16, 32, 32 channels)
    assert [f.shape[1] for f in full] == [8 * 16, 16 * 4, 32, 32]
    assert [f.shape[1] for f in pooled] == [8, 16, 32, 32]
    torch.testing.assert_close(pooled[0], full[0].view(8, 8, 16).mean(-1))
    assert sum(f.numel() for f in pooled) < sum(f.numel() for f in full)
    assert [f.shape for f in collect_features(net, x, pool_to=(2, 8))] == [(8, 8 * 8), (8, 16 * 4), (8, 32), (8, 32)]
    r = task_affinity([net, _net(1)], x, pool_to=1)
    assert r.affinity.shape == (4, 2, 2) and all(v.shape == (4, 8, 8) for v in r.rdms.values())
    assert r.pool_to == 1


def test_task_affinity_on_two_tiny_networks_streams_and_is_deterministic(monkeypatch):
    nets = [_net(0).train(), _net(1).eval()]
    bn = nets[0].trunk.units[0][1]
    stats = bn.running_mean.clone()
    x = _images(20)
    held = []  # how many networks' features are alive while features are collected
    import mtl_med.sharing.branched.affinity as aff

    real = aff.collect_features

    def counting(net, *a, **k):
        out = real(net, *a, **k)
        held.append(len(out))
        return out

    monkeypatch.setattr(aff, "collect_features", counting)
    r = task_affinity(nets, x, num_images=500, seed=3)
    assert isinstance(r, AffinityResult)
    d = len(nets[0].trunk.branch_points) - 1
    assert r.affinity.shape == (d, 2, 2) == (4, 2, 2) and r.num_images == 20
    assert r.task_names == ["task0", "task1"] and r.location_names == ["block1", "block2", "block3", "block4"]
    assert set(r.rdms) == {"task0", "task1"} and all(v.shape == (d, 20, 20) for v in r.rdms.values())
    assert np.all(r.affinity[:, [0, 1], [0, 1]] == 1.0) and np.all(np.abs(r.affinity[:, 0, 1]) < 1.0)
    np.testing.assert_allclose(r.dissimilarity, 1.0 - r.affinity)
    assert held == [d, d]
    assert nets[0].training and not nets[1].training  # flags restored
    assert torch.equal(bn.running_mean, stats)  # eval mode: running statistics untouched
    # the RDMs are those of each network alone
    torch.testing.assert_close(r.rdms["task1"], network_rdms(nets[1], x))
    # deterministic for a seed; another seed draws other images
    again = task_affinity({"a": nets[0], "b": nets[1]}, x, num_images=10, seed=3)
    same = task_affinity({"a": nets[0], "b": nets[1]}, x, num_images=10, seed=3)
    other = task_affinity({"a": nets[0], "b": nets[1]}, x, num_images=10, seed=4)
    assert again.task_names == ["a", "b"] and again.num_images == 10
    assert np.array_equal(again.affinity, same.affinity) and np.array_equal(again.indices, same.indices)
    assert np.array_equal(again.indices, select_images(20, 10, 3).numpy())
    assert not np.array_equal(again.indices, other.indices) and not np.array_equal(again.affinity, other.affinity)
    torch.testing.assert_close(again.rdms["b"], network_rdms(nets[1], x[again.indices]))
    # a dataset of dict items gives what the tensor gives
    ds = [{"image": x[i], "label": i} for i in range(20)]
    from_ds = task_affinity({"a": nets[0], "b": nets[1]}, ds, num_images=10, seed=3)
    np.testing.assert_allclose(from_ds.affinity, again.affinity)
    A, rdms = again  # unpacks as (A, rdms)
    assert A is again.affinity and rdms is again.rdms


def test_identical_networks_have_affinity_one():
    net = _net(5)
    r = task_affinity({"a": net, "b": copy.deepcopy(net), "c": _net(6)}, _images(12), seed=0)
    assert r.affinity.shape == (4, 3, 3)
    np.testing.assert_allclose(r.affinity[:, 0, 1], 1.0, atol=1e-12)
    assert np.all(r.affinity[:, 0, 2] < 1.0)


def test_select_images():
    idx = select_images(20, 8, seed=1)
    assert idx.shape == (8,) and torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == 8
    assert torch.equal(idx, select_images(20, 8, seed=1)) and not torch.equal(idx, select_images(20, 8, seed=2))
    assert torch.equal(select_images(5, 500), torch.arange(5))


# --- figures and affinity.npz ----------------------------------------------------------------------------
def _is_rgb(img) -> bool:
    return img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.min() < 128 < img.max()


def test_figures_render_to_rgb_arrays():
    a = np.stack([np.array([[1.0, 0.2, -0.1], [0.2, 1.0, 0.5], [-0.1, 0.5, 1.0]])] * 2)
    img = affinity_image(a, ["s", "d", "n"], ["block1", "block2"])
    assert _is_rgb(img)
    assert affinity_image(a[:1], ["s", "d", "n"]).shape[1] < img.shape[1]  # one panel per location
    table = [([[0, 0, 0], [0, 0, 0]], 1.5, 3), ([[0, 0, 0], [0, 0, 1]], 0.75, 5), ([[0, 0, 1], [0, 0, 1]], 0.2, 6),
             ([[0, 1, 2], [0, 1, 2]], 0.0, 9)]
    assert _is_rgb(pareto_image(table, chosen=[[0, 0, 1], [0, 0, 1]]))
    as_dicts = [dict(config=c, cost=k, params=p) for c, k, p in table]
    assert _is_rgb(pareto_image(as_dicts, chosen=1, budget=6))
    assert _is_rgb(tree_image([[0, 0, 0], [0, 0, 1], [0, 1, 2]], ["s", "d", "n"], ["b1", "b2", "b3"]))


def test_affinity_npz_round_trip(tmp_path):
    r = task_affinity({"a": _net(0), "b": _net(1)}, _images(10), num_images=8, seed=2, pool_to=(2, 2))
    path = tmp_path / "out" / "affinity.npz"
    assert save_affinity(path, r) == os.fspath(path)
    assert sorted(os.listdir(path.parent)) == ["affinity.npz"]  # no temporary left behind
    back = load_affinity(path)
    assert np.array_equal(back.affinity, r.affinity) and back.task_names == ["a", "b"]
    assert back.location_names == r.location_names and back.num_images == 8 and back.seed == 2
    assert back.center_features is True and back.pool_to == (2, 2) and np.array_equal(back.indices, r.indices)
    assert back.rdms is None
    save_affinity(path, r.affinity[:2], ["x", "y"], ["l1", "l2"], num_images=8, seed=0, center_features=False)
    back = load_affinity(path)
    assert back.affinity.shape == (2, 2, 2) and back.task_names == ["x", "y"] and back.location_names == ["l1", "l2"]
    assert back.seed == 0 and back.center_features is False and back.pool_to is None and back.indices is None
    with pytest.raises(ValueError):
        save_affinity(path, r.affinity, ["only_one"])
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="not an affinity file"):
        load_affinity(tmp_path / "other.npz")
