"""The compacted SFG pass equals the dense one for hard assignments, costs what the grouping implies, and
serves the posterior sampler (slices, 3D patches, bfloat16, adaptive pass count)."""

import pytest
import torch
from monai.inferers import SimpleInferer, SlidingWindowInferer
from torch.utils.flop_counter import FlopCounterMode

from mtl_med.inference import PosteriorSampler, sample_posterior
from mtl_med.sharing.sfg.compact import CompactSFG, compact_unsupported
from mtl_med.sharing.sfg.layers import SHARING_MODES
from mtl_med.build import build_network


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small convolutions: one thread avoids OpenMP's spin-waits on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _highresnet(tasks, spatial_dims, grouping, **kw):
    out = [1] * (len(tasks) - 1) + [3]
    return build_network("highresnet", "sfg", tasks, out, spatial_dims=spatial_dims, features=(6, 12, 12), grouping=grouping, per_example=True, **kw)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("num_tasks", [2, 3])
@pytest.mark.parametrize("grouping", SHARING_MODES)
def test_compact_equals_dense_for_per_example_assignments(spatial_dims, num_tasks, grouping, randomise_statistics):
    """Same generator, same draws: the compacted outputs of B images x k copies (each its own assignment)
    equal the dense forward of the repeated batch to float32 rounding."""
    torch.manual_seed(num_tasks)
    net = randomise_statistics(_highresnet([f"t{i}" for i in range(num_tasks)], spatial_dims, grouping))
    x = torch.randn(2, 1, *([7] * spatial_dims))
    dense = net(x.repeat(2, *[1] * spatial_dims, 1), generator=torch.Generator().manual_seed(5))
    compact = CompactSFG(net)(x, torch.Generator().manual_seed(5), copies=2)
    assert dense.keys() == compact.keys()
    for k in dense:
        torch.testing.assert_close(compact[k], dense[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone, kw, size, cin", [("vgg11_bn", {"width": 1 / 16}, 32, 3), ("mnist_cnn", {}, 28, 1)])
def test_compact_equals_dense_with_pooling_and_pooled_heads(backbone, kw, size, cin, randomise_statistics):
    net = randomise_statistics(build_network(backbone, "sfg", ("a", "b"), (1, 2), in_channels=cin, grouping="constant_p", per_example=True, **kw))
    x = torch.randn(2, cin, size, size)
    dense = net(x, generator=torch.Generator().manual_seed(1))
    compact = CompactSFG(net)(x, torch.Generator().manual_seed(1))
    for k in dense:
        torch.testing.assert_close(compact[k], dense[k], rtol=1e-5, atol=1e-5)


def _flops(fn):
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return fc.get_total_flops()


def test_compact_cost_hard_sharing_is_a_plain_network_and_sfg_about_half_the_dense():
    x = torch.randn(1, 1, 8, 8)
    plain = build_network("highresnet", "hard_sharing", ("sct", "seg"), (1, 6), features=(8, 16, 16)).eval()
    sfg = build_network("highresnet", "sfg", ("sct", "seg"), (1, 6), features=(8, 16, 16)).eval()
    sfg.set_inference("argmax")  # A.1's initial p: every kernel shared -> hard sharing's cost
    assert _flops(lambda: CompactSFG(sfg)(x)) == _flops(lambda: plain(x))
    sfg.set_inference("sample")
    dense, compact = _flops(lambda: sfg(x, generator=torch.Generator().manual_seed(0))), _flops(lambda: CompactSFG(sfg)(x, torch.Generator().manual_seed(0)))
    assert compact < 0.6 * dense


def test_sampler_compact_and_dense_engines_agree_and_empty_groups_skip_their_towers(randomise_statistics):
    torch.manual_seed(0)
    net = randomise_statistics(_highresnet(["sct", "seg"], 2, "constant_p"))
    x = torch.randn(3, 1, 12, 12)
    run = lambda engine: sample_posterior(net, x, num_samples=5, samples_per_batch=2, regression=("sct",), labels={"seg": 3},  # noqa: E731
                                          generator=torch.Generator().manual_seed(2), engine=engine, margin=2, dtype="float32")
    dense, compact = run("dense"), run("compact")
    torch.testing.assert_close(compact["sct"], dense["sct"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compact["sct_std"], dense["sct_std"], rtol=1e-4, atol=1e-5)
    assert (compact["seg"] != dense["seg"]).float().mean() < 0.01  # a vote may tie differently at rounding level
    # p_s = 0 and argmax draws: every kernel goes to a task, the shared group is empty
    single = build_network("highresnet", "sfg", ("a", "b"), (1, 2), features=(4, 8, 8), shared_init=0.0).eval()
    single.set_inference("argmax")
    assert all(p[2] == 0 for p in single.group_proportions().values())
    calls = []
    for towers in (m for m in single.layers if isinstance(m, torch.nn.ModuleList)):
        towers[2].register_forward_pre_hook(lambda m, a: calls.append(1))  # the shared group's (empty) tower
    CompactSFG(single)(torch.randn(1, 1, 8, 8))
    assert not calls


def test_sliding_window_3d_patches_run_compacted_unchanged(randomise_statistics):
    torch.manual_seed(0)
    net = randomise_statistics(_highresnet(["sct", "seg"], 3, "sfg"))
    vol = torch.randn(1, 1, 10, 8, 6)
    inferer = SlidingWindowInferer(roi_size=(6, 6, 6), sw_batch_size=2, overlap=0.25, progress=False)
    maps = {e: PosteriorSampler(net, 3, max_batch=4, regression=("sct",), labels={"seg": 3}, engine=e, dtype="float32").run(inferer, vol, generator=torch.Generator().manual_seed(0))
            for e in ("dense", "compact")}
    assert maps["compact"]["sct_mean"].shape == (1, 1, 10, 8, 6)
    torch.testing.assert_close(maps["compact"]["sct_mean"], maps["dense"]["sct_mean"], rtol=1e-5, atol=1e-5)


def test_what_cannot_run_compacted_runs_dense_or_says_why():
    net = build_network("highresnet", "sfg", ("a", "b"), (1, 2), features=(4, 8, 8))
    assert "training" in compact_unsupported(net)
    assert compact_unsupported(net.eval()) is None
    batch = build_network("highresnet", "sfg", ("a", "b"), (1, 2), features=(4, 8, 8), bn_inference="batch").eval()
    assert "test-batch statistics" in compact_unsupported(batch)
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="relaxed"):
        PosteriorSampler(net, 2, mode="relaxed", labels={"b": 2}, engine="compact").run(SimpleInferer(), x)
    assert PosteriorSampler(net, 2, mode="relaxed", labels={"b": 2}, regression=("a",)).run(SimpleInferer(), x)["a_mean"].shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="dtype"):
        PosteriorSampler(net, 2, dtype="float8")
    with pytest.raises(ValueError, match="engine"):
        PosteriorSampler(net, 2, engine="fast")


def test_bfloat16_channels_last_is_close_to_float32(randomise_statistics):
    torch.manual_seed(0)
    net = randomise_statistics(_highresnet(["sct", "seg"], 2, "sfg"))
    x = torch.randn(2, 1, 12, 12)
    ref = CompactSFG(net)(x, torch.Generator().manual_seed(0))
    low = CompactSFG(net, dtype=torch.bfloat16, channels_last=True)(x, torch.Generator().manual_seed(0))
    assert low["sct"].dtype == torch.float32
    err = (low["sct"] - ref["sct"]).abs().max() / ref["sct"].abs().max()
    assert 0 < err < 0.05


def test_auto_pass_count_stops_early_without_spread_and_runs_to_the_maximum_with_it(randomise_statistics):
    x = torch.randn(2, 1, 8, 8)
    hard = build_network("highresnet", "hard_sharing", ("sct", "seg"), (1, 6), features=(4, 8, 8))  # deterministic
    sampler = PosteriorSampler(hard, "auto", max_batch=8, regression=("sct",), labels={"seg": 6}, min_samples=4,
                               max_samples=12, regression_tol=30.0 / 1024.0)
    sampler.run(SimpleInferer(), x)
    assert sampler.passes == [4] and sampler.num_samples == 12  # no spread: settled at the minimum
    noisy = randomise_statistics(_highresnet(["sct", "seg"], 2, "constant_p"))
    sampler = PosteriorSampler(noisy, "auto", max_batch=8, regression=("sct",), labels={"seg": 3}, min_samples=4, max_samples=8, regression_tol=1e-6, label_tol=0.0)
    sampler.run(SimpleInferer(), x)
    assert sampler.passes_used() == {"batches": 1, "mean": 8.0, "min": 8, "max": 8}
    with pytest.raises(ValueError, match="auto"):
        PosteriorSampler(hard, "many")
