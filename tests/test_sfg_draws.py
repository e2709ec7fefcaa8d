"""The posterior-draw diagnostic of SFG checkpoints (benchmarks/sfg_draws.py) on the demo weights and a small
phantom: its modal network is the bundle's argmax inference, its probabilities of a harmful draw follow from the
kernels' p, and a mean of one draw is that draw."""

import json
import math
from pathlib import Path

import pytest

from mtl_med.pelvis.phantoms import generate_phantom, write_phantom
from mtl_med.inference import Predictor

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "sfg_highresnet_pelvis"


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    paths = write_phantom(generate_phantom(3, shape=(32, 32, 8)), tmp_path_factory.mktemp("case"))
    return {k: paths[k] for k in ("mr", "ct", "label", "bone")}


def _run(load_benchmark, tmp_path, case, *extra):
    out = tmp_path / "r.json"
    args = [f"--{k}={v}" for k, v in case.items()] + ["--no-progress", "--json", str(out), *extra]
    assert load_benchmark("sfg_draws").main(args) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def result(tmp_path_factory, case, load_benchmark):
    """One run: the modal network, every move of the first SFG layer's kernels counted harmful (a threshold below
    any change), one posterior draw, the bundle's sampler with two passes."""
    return _run(load_benchmark, tmp_path_factory.mktemp("run"), case, "--scan", "--layers", "layers.0.groups", "--harm-hu=-1e9", "--draws", "1",
                "--slice-draws", "2")


@pytest.fixture(scope="module")
def pred():
    return Predictor(BUNDLE, [BUNDLE / "configs" / "inference.json", BUNDLE / "configs" / "demo.json"], inference_mode="argmax",
                     num_samples=1, engine="dense", compute_dtype="float32", device="cpu", progress=False, save_png=False)


def test_modal_network_is_the_bundles_argmax_inference(result, case, pred):
    r = result
    m = pred.predict_case(case["mr"], ct=case["ct"], label=case["label"], bone=case["bone"])["metrics"]
    for k in ("mae_overall", "psnr_overall", "dice_mean"):
        assert r["modal"][k] == pytest.approx(m[k], rel=1e-6), k


def test_every_move_harmful_makes_every_non_modal_draw_harmful(result, pred):
    """With a threshold below any change every scanned move counts, so P(harmful draw) = 1 - P(the scanned
    kernels all draw their modal group), computed here from the checkpoint's p."""
    r = result
    p = pred.network.get_submodule("layers.0.groups").probabilities.detach()
    kernels, groups = p.shape
    assert len(r["scan"]) == kernels * (groups - 1)  # every other group of every kernel of the layer, once
    assert {row["layer"] for row in r["scan"]} == {"layers.0.groups"}
    for row in r["scan"]:
        assert row["to"] != row["from"] and row["p"] == pytest.approx(float(p[row["kernel"], row["to"]]), abs=1e-6)
    assert r["p_harmful_draw"] == pytest.approx(1.0 - float(p.max(-1).values.prod()), rel=1e-5)


def test_mean_of_one_draw_is_that_draw(result):
    r = result
    (d,) = r["draws"]
    for k in ("mae_overall", "psnr_overall", "dice_mean"):
        assert r["mean_of_draws"][k] == pytest.approx(d[k], rel=1e-5), k
    assert math.isfinite(r["p_modal_draw"]) and 0.0 <= r["p_modal_draw"] <= 1.0


def test_unknown_layer_is_one_clear_error(tmp_path, case, capsys, load_benchmark):
    with pytest.raises(SystemExit):
        _run(load_benchmark, tmp_path, case, "--scan", "--layers", "nope")
    assert "nope" in capsys.readouterr().err


@pytest.fixture(scope="module")
def data(case, pred):
    return pred.preprocess({"name": "c", "mr": case["mr"]})


def test_bundle_sampler_records_every_slice_draw(result, data):
    s = result["slice_draws"]
    slices = data["mr"].shape[-1]
    assert s["passes"] == 2 and s["slice_draws"] == 2 * slices  # each copy of each slice, none lost
    assert 0 <= s["far_outside"] <= s["slice_draws"] and s["extreme_hu"] > 0


def test_draws_far_outside_the_ct_range_are_reported(data, pred, caplog):
    """A posterior sCT std above the CT range's width cannot come from draws inside the range: the case's log
    says so (the demo weights' modal pass has std 0 and stays quiet)."""
    name = "c"
    maps = pred.sample(data)
    ours = lambda: [r for r in caplog.records if r.name == "mtl_med.inference"]  # noqa: E731
    with caplog.at_level("WARNING", logger="mtl_med.inference"):
        assert pred.check_posterior(name, maps) == 0.0
        assert not ours()
        lo, hi = pred.ct_clip
        wild = maps["sct_std"].clone()
        wild.view(-1)[: wild.numel() // 4] = 2 * (hi - lo)
        assert pred.check_posterior(name, {**maps, "sct_std": wild}) == pytest.approx(0.25, abs=1e-3)
    (rec,) = ours()
    assert rec.levelname == "WARNING" and rec.getMessage().startswith("c: ") and "25%" in rec.getMessage()


def test_missing_or_corrupt_case_file_is_one_clear_error(tmp_path, case, capsys, load_benchmark):
    bad = tmp_path / "mr.nii.gz"
    bad.write_bytes(b"not a nifti")
    for mr, problem in ((tmp_path / "none.nii.gz", "does not exist"), (bad, str(bad))):
        with pytest.raises(SystemExit):
            _run(load_benchmark, tmp_path, {**case, "mr": str(mr)})
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert problem in err and "Traceback" not in err
