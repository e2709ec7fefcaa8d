"""Receptive-field cropping: every layer computed only on the region the kept outputs need equals the full pass
on the (margin-padded) frame, cropped -- dense and compacted, 2D and 3D -- and costs the MACs the geometry says;
the sampler's engine="auto" rule picks the dense forward for small images and the compacted pass for large ones."""

import pytest
import torch
from monai.inferers import SimpleInferer
from torch.utils.flop_counter import FlopCounterMode

from mtl_med.build import build_network
from mtl_med.inference import PosteriorSampler
from mtl_med.inference.posterior import engine_choice
from mtl_med.networks.receptive import CropPlan, chain_macs, conv_radius, crop_unsupported, cropped_forward, take
from mtl_med.sharing.sfg.compact import CompactSFG, crop_unsupported as sfg_crop_unsupported, dense_cropped, plan_crop


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inner(x, crop):
    crop = crop if isinstance(crop, tuple) else (crop,) * (x.ndim - 2)
    return x[(slice(None), slice(None), *(slice(c, s - c) for c, s in zip(crop, x.shape[2:])))]


@pytest.fixture
def sfg(randomise_statistics):
    """``sfg(spatial_dims, grouping="sfg", features=(4, 8, 8), **kw)``: a per-example SFG-HighResNet with
    non-trivial batch-norm statistics, its weights seeded by ``spatial_dims``."""

    def make(spatial_dims, grouping="sfg", features=(4, 8, 8), **kw):
        torch.manual_seed(spatial_dims)
        return randomise_statistics(build_network("highresnet", "sfg", ("sct", "seg"), (1, 3), spatial_dims=spatial_dims,
                                                  features=features, grouping=grouping, per_example=True, **kw))

    return make


# crops below, at and above the radius (33 in 2D; 3D at the paper's dilations needs big frames, so smaller crops),
# and one different per dim (the frame's edge is reached in some dims, not in others)
CASES = [(2, (72, 69), 33), (2, (72, 69), 34), (2, (40, 37), 10), (2, (40, 37), (3, 12)), (3, (30, 27, 21), 8), (3, (26, 22, 24), (2, 9, 5))]


@pytest.mark.parametrize("spatial_dims, size, crop", CASES)
@pytest.mark.parametrize("grouping", ["sfg", "constant_p", "constant_mask"])
def test_sfg_cropped_passes_equal_the_full_pass_cropped(spatial_dims, size, crop, grouping, sfg):
    """Same draws: the compacted and the dense pass on their regions equal the full dense pass on the frame,
    cropped, within 1e-5 (float32)."""
    net = sfg(spatial_dims, grouping)
    x = torch.randn(2, 1, *size)
    full = net(x.repeat(2, *[1] * (spatial_dims + 1)), generator=torch.Generator().manual_seed(5))
    engine = CompactSFG(net)
    compact = engine(x, torch.Generator().manual_seed(5), copies=2, crop=crop)
    dense = engine.dense(x, torch.Generator().manual_seed(5), copies=2, crop=crop)
    for k in full:
        ref = _inner(full[k], crop)
        assert compact[k].shape == ref.shape == dense[k].shape
        torch.testing.assert_close(compact[k], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dense[k], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["hard_sharing", "single_task"])
@pytest.mark.parametrize("spatial_dims, size, crop", [CASES[0], CASES[3], CASES[5]])
def test_plain_highresnet_networks_crop_exactly(method, spatial_dims, size, crop, randomise_statistics):
    torch.manual_seed(0)
    net = randomise_statistics(build_network("highresnet", method, ("sct", "seg"), (1, 3), spatial_dims=spatial_dims, features=(4, 8, 8)))
    assert crop_unsupported(net) is None
    x = torch.randn(2, 1, *size)
    full, cropped = net(x), cropped_forward(net, x, crop)
    for k in full:
        torch.testing.assert_close(cropped[k], _inner(full[k], crop), rtol=1e-5, atol=1e-5)


def test_geometry_radius_macs_and_refusals(sfg):
    net = sfg(2, features=(16, 32, 64))
    assert plan_crop(net, 0).radius == (33, 33)  # 1 + 4 + 1 + 8 + 1 + 16 + 1 + 1: the bundle's margin
    plain = build_network("highresnet", "hard_sharing", ("sct", "seg"), (1, 6), features=(16, 32, 64)).eval()
    # the trunk's chain: conv, 4 convs at d=1, conv, 4 at d=2, conv, 4 at d=4, 2 convs (the 1x1 heads apart)
    chain = [(1, 16, 3, 1)] + [(16, 16, 3, 1)] * 4 + [(16, 32, 3, 1)] + [(32, 32, 3, 2)] * 4 + [(32, 64, 3, 1)] + [(64, 64, 3, 4)] * 4 + [(64, 64, 3, 1)] * 2
    x = torch.randn(1, 1, 90, 84)
    for crop in (0, 33, 20):
        plan = CropPlan(crop, 2)
        with FlopCounterMode(display=False) as fc:
            cropped_forward(plain, x, crop, plan)
        heads = 64 * 7 * (90 - 2 * crop) * (84 - 2 * crop)  # the two 1x1 heads, 1 + 6 outputs
        assert plan.macs == chain_macs(chain, (90, 84), crop) == fc.get_total_flops() // 2 - heads
    assert chain_macs(chain, (354, 354), 33) / chain_macs(chain, (354, 354), 0) < 0.8
    with pytest.raises(ValueError, match="stride-1"):
        conv_radius(torch.nn.Conv2d(1, 1, 3, stride=2, padding=1))
    with pytest.raises(ValueError, match="stride-1"):
        conv_radius(torch.nn.Conv2d(1, 1, 3))  # unpadded
    with pytest.raises(ValueError, match="widen"):
        take(torch.zeros(1, 1, 4, 4), (8, 8), (1, 1))
    assert "training" in sfg_crop_unsupported(build_network("highresnet", "sfg", ("a", "b"), (1, 2), features=(4, 8, 8)))
    assert "statistics" in sfg_crop_unsupported(build_network("highresnet", "sfg", ("a", "b"), (1, 2), features=(4, 8, 8), bn_inference="batch").eval())
    assert "heads" in sfg_crop_unsupported(build_network("mnist_cnn", "sfg", ("a", "b"), (1, 2)).eval())  # pooled heads
    with pytest.raises(ValueError, match="cropping"):
        dense_cropped(build_network("highresnet", "sfg", ("a", "b"), (1, 2), features=(4, 8, 8)), torch.randn(1, 1, 8, 8), 1)


@pytest.mark.parametrize("engine", ["dense", "compact"])
@pytest.mark.parametrize("spatial_dims, size, margin, ratio", [(2, (20, 18), 33, 0.7), (3, (6, 5, 4), 6, 0.95)])
def test_sampler_with_a_margin_crops_its_passes_and_matches_the_uncropped_run(engine, spatial_dims, size, margin, ratio, monkeypatch, sfg):
    """2D at the bundle's margin (= the radius: no zero padding anywhere); 3D with a margin under the radius
    (the early layers' regions reach past the frame and are zero-padded there)."""
    net = sfg(spatial_dims, "constant_p")
    x = torch.randn(2, 1, *size)

    def run(crop):
        monkeypatch.setattr(PosteriorSampler, "receptive_crop", crop)
        s = PosteriorSampler(net, 4, max_batch=4, regression=("sct",), labels={"seg": 3}, engine=engine, margin=margin, dtype="float32",
                             generator=torch.Generator().manual_seed(1))
        with FlopCounterMode(display=False) as fc:
            maps = s.run(SimpleInferer(), x)
        return maps, fc.get_total_flops()

    (cropped, f_crop), (whole, f_whole) = run(True), run(False)
    assert cropped["sct_mean"].shape == (2, 1, *size)
    for k in whole:
        torch.testing.assert_close(cropped[k], whole[k], rtol=1e-4, atol=1e-5)
    assert f_crop < ratio * f_whole  # most of the frame's work is margin


def test_engine_auto_rule_picks_dense_for_small_images_and_compact_for_large(monkeypatch):
    """The rule's decisions at the sizes measured (docs/performance.md): 32 x 32 dense (the compacted sampler
    was 0.85x there), 96 x 96 and the paper's 354 x 354 compacted (1.5x faster and more)."""
    net = build_network("highresnet", "sfg", ("sct", "seg"), (1, 6), features=(16, 32, 64)).eval()
    engine = CompactSFG(net)
    rows = 64  # the sampler's default max_batch: images x copies per dense call
    assert engine_choice(engine.cost((32, 32)), rows) == "dense"
    assert engine_choice(engine.cost((96, 96)), rows) == "compact"
    assert engine_choice(engine.cost((354, 354), 33), 1) == "compact"
    assert engine_choice(engine.cost((16, 16, 16)), rows) == "dense"
    # the sampler follows the rule: count the compacted engine's calls
    calls = []
    real = type(engine).__call__
    monkeypatch.setattr(type(engine), "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    small = PosteriorSampler(net, 2, max_batch=64, regression=("sct",), labels={"seg": 6}, dtype="float32")
    small.run(SimpleInferer(), torch.randn(1, 1, 32, 32))
    assert not calls
    PosteriorSampler(net, 2, max_batch=64, regression=("sct",), labels={"seg": 6}, dtype="float32").run(SimpleInferer(), torch.randn(1, 1, 96, 96))
    assert calls
    calls.clear()
    PosteriorSampler(net, 2, max_batch=64, regression=("sct",), labels={"seg": 6}, dtype="float32", engine="compact").run(SimpleInferer(), torch.randn(1, 1, 32, 32))
    assert calls  # an explicit engine is obeyed
