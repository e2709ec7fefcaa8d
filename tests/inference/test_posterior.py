import math

import pytest
import torch

from mtl_med.inference import PosteriorAggregator, sample_posterior
from mtl_med.build import build_network, sfg_highresnet
from mtl_med.pelvis import NUM_LABELS, SCT_TASK, SEG_TASK

# the outputs of the pelvis networks below (the sampler has no default outputs)
TASKS = {"regression": (SCT_TASK,), "labels": {SEG_TASK: NUM_LABELS}}


def test_regression_mean_and_std_in_chunks():
    samples = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0]).reshape(5, 1, 1, 1)
    agg = PosteriorAggregator(regression=["ct"], labels={})
    agg.update({"ct": samples[:2]})
    agg.update({"ct": samples[2:3]})
    agg.update({"ct": samples[3]}, stacked=False)
    agg.update({"ct": samples[4:]})
    out = agg.result()
    assert out["ct"].item() == pytest.approx(4.0)
    assert out["ct_std"].item() == pytest.approx(math.sqrt(((samples - 4.0) ** 2).mean().item()))


def test_labels_mode_disagreement_entropy():
    labels = torch.tensor([0, 1, 1, 2, 1])
    logits = torch.nn.functional.one_hot(labels, 3).float().reshape(5, 1, 3, 1)  # S, B, C, X
    agg = PosteriorAggregator(labels={"seg": 3})
    agg.update({"seg": logits})
    out = agg.result()
    assert out["seg"].item() == 1 and out["seg"].dtype == torch.int64
    assert out["seg_disagreement"].item() == pytest.approx(0.4)
    freq = torch.tensor([0.2, 0.6, 0.2])
    assert out["seg_entropy"].item() == pytest.approx(float(-(freq * freq.log()).sum()))


def test_single_sample_has_no_spread():
    agg = PosteriorAggregator(regression=["ct"], labels={"seg": 2})
    agg.update({"ct": torch.randn(1, 2, 3), "seg": torch.randn(1, 2, 2, 3)})
    out = agg.result()
    assert out["ct_std"].abs().max() == 0 and out["seg_disagreement"].abs().max() == 0


def test_posterior_of_sfg_highresnet():
    torch.manual_seed(0)
    model = sfg_highresnet(features=(4, 8, 8), grouping="constant_p")
    x = torch.randn(2, 1, 16, 16)
    run = lambda seed, **kw: sample_posterior(model, x, generator=torch.Generator().manual_seed(seed), **TASKS, **kw)  # noqa: E731
    a, b, c = run(0, num_samples=7, samples_per_batch=3), run(0, num_samples=7, samples_per_batch=3), run(1, num_samples=7, samples_per_batch=3)
    assert a["sct"].shape == (2, 1, 16, 16) and a["seg"].shape == (2, 1, 16, 16)
    assert a["seg"].min() >= 0 and a["seg"].max() <= 5
    assert (a["sct_std"] > 0).any() and (a["sct_std"] >= 0).all()
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["sct"], c["sct"])
    assert model.training  # the model's mode is restored


def test_deterministic_network_has_zero_posterior_spread():
    # a registered deterministic baseline: its 50 posterior samples are one network run 50 times
    model = build_network("highresnet", "hard_sharing", ("sct", "seg"), (1, 6), in_channels=1, features=(4, 8, 8))
    out = sample_posterior(model, torch.randn(1, 1, 16, 16), num_samples=4, samples_per_batch=2, **TASKS)
    assert out["sct_std"].max() < 1e-5 and out["seg_disagreement"].max() == 0


@pytest.mark.parametrize("bn_inference", ["population", "batch"])
def test_batch_statistics_sample_one_assignment_per_pass(bn_inference):
    """With A.4's test-batch statistics the passes must not share a forward call (batch-norm would
    pool copies with different assignments): one pass of the plain batch, one draw for all of it."""
    from monai.inferers import SimpleInferer

    from mtl_med.inference import PosteriorSampler

    torch.manual_seed(0)
    model = sfg_highresnet(features=(4, 8, 8), grouping="constant_p", bn_inference=bn_inference)
    calls, draws = [], []
    model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    groups = next(m for _, m in model.sfg_layers()).groups
    groups.register_forward_hook(lambda m, args, out: draws.append(out.ndim))
    x = torch.randn(2, 1, 16, 16)
    PosteriorSampler(model, num_samples=3, max_batch=64, **TASKS).run(SimpleInferer(), x)
    sample_posterior(model, x, num_samples=3, samples_per_batch=3, **TASKS)
    if bn_inference == "batch":
        assert calls == [2] * 6 and draws == [2] * 6  # (kernels, T+1): one assignment per pass
    else:
        assert calls == [6, 6] and draws == [3, 3]  # (copies x slices, kernels, T+1): vectorised


def test_margin_removes_the_slice_border_from_the_outputs():
    """A constant slice has no structure: with a replicate margin of the receptive-field radius (33 for
    SFG-HighResNet) every output pixel is the same; without it the zero padding at the border shows."""
    from monai.inferers import SimpleInferer

    from mtl_med.inference import PosteriorSampler

    torch.manual_seed(0)
    model = build_network("highresnet", "hard_sharing", ("sct", "seg"), (1, 6), in_channels=1, features=(4, 8, 8)).eval()
    x = torch.full((2, 1, 24, 20), 0.7)
    for margin, flat in ((0, False), (33, True)):
        maps = PosteriorSampler(model, num_samples=1, mode="argmax", margin=margin, **TASKS).run(SimpleInferer(), x)
        assert maps["sct_mean"].shape == (2, 1, 24, 20) and maps["seg_votes"].shape == (2, 6, 24, 20)
        spread = float(maps["sct_mean"].max() - maps["sct_mean"].min())
        assert (spread < 1e-5) == flat, (margin, spread)
    with pytest.raises(ValueError, match="margin"):
        PosteriorSampler(model, margin=-1, **TASKS)


def test_inferer_path_equals_sample_posterior_batch_by_batch():
    """The volume path (the sampler as a SliceInferer's network) and ``sample_posterior`` are one sampler:
    with the same generator and the same slice batches they give the same numbers, bit for bit."""
    from monai.inferers import SliceInferer

    from mtl_med.inference import PosteriorSampler

    torch.manual_seed(0)
    model = sfg_highresnet(features=(4, 8, 8), grouping="constant_p")
    vol = torch.randn(1, 1, 20, 18, 6)
    inferer = SliceInferer(spatial_dim=2, roi_size=(-1, -1), sw_batch_size=4, overlap=0.0, progress=False)
    sampler = PosteriorSampler(model, num_samples=5, max_batch=8, margin=3, **TASKS)
    maps = sampler.run(inferer, vol, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    ref = []
    for z in (slice(0, 4), slice(4, 6)):  # the inferer's batches: 4 slices (2 copies a call), then 2 (4 copies)
        x = vol[0, ..., z].permute(3, 0, 1, 2).contiguous()
        ref.append(sample_posterior(model, x, num_samples=5, samples_per_batch=8 // x.shape[0], generator=g, margin=3, **TASKS))
    ref = {k: torch.cat([r[k] for r in ref]).permute(1, 2, 3, 0)[None] for k in ref[0]}
    assert torch.equal(maps["sct_mean"], ref["sct"]) and torch.equal(maps["sct_std"], ref["sct_std"])
    assert (ref["sct_std"] > 0).any()
    freq = maps["seg_votes"]
    assert torch.equal(freq.argmax(1, keepdim=True), ref["seg"])
    assert torch.equal(1.0 - freq.amax(1, keepdim=True), ref["seg_disagreement"])
    assert torch.equal(torch.special.entr(freq).sum(1, keepdim=True), ref["seg_entropy"])
    assert sampler.generator is None and model.training  # the run's generator and the model's mode are not kept


def test_argmax_mode_makes_one_pass_and_says_so():
    from monai.inferers import SimpleInferer

    from mtl_med.inference import PosteriorSampler

    model = sfg_highresnet(features=(4, 8, 8), grouping="constant_p")
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    sampler = PosteriorSampler(model, num_samples=7, mode="argmax", **TASKS)
    assert sampler.num_samples == 1 and sampler.requested_samples == 7
    maps = sampler.run(SimpleInferer(), torch.randn(2, 1, 16, 16))
    assert calls == [2] and maps["sct_std"].max() == 0 and set(maps["seg_votes"].unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(TypeError):
        PosteriorSampler(model, 5, 64)  # settings after num_samples are keyword-only


def test_outputs_and_tolerance_are_the_callers():
    """No application's outputs or tolerance are defaults: a sampler names its outputs, and "auto" with a
    regression output needs the tolerance in network units."""
    from mtl_med.inference import PosteriorSampler

    model = sfg_highresnet(features=(4, 8, 8), grouping="constant_p")
    with pytest.raises(ValueError, match="nothing to sample"):
        PosteriorSampler(model, 3)
    with pytest.raises(ValueError, match="nothing to sample"):
        sample_posterior(model, torch.randn(1, 1, 16, 16), num_samples=2)
    with pytest.raises(ValueError, match="regression_tol"):
        PosteriorSampler(model, "auto", **TASKS)
    assert PosteriorSampler(model, "auto", labels=TASKS["labels"]).regression_tol is None  # labels only: not needed
    assert PosteriorSampler(model, "auto", regression_tol=0.5, **TASKS).regression_tol == 0.5
