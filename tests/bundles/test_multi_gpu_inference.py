"""Cohort inference past one process: ``multi_gpu_inference.json`` under torchrun (2 gloo ranks on CPU) and
``multi_gpu_evaluate.json``; resume (``skip_existing``); the evaluation CSV written as it goes; preprocessing
in DataLoader workers. Tiny phantoms and a tiny random network, as the other inference tests use."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mtl_med.pelvis.phantoms import generate_phantom, write_phantom
from mtl_med.errors import CaseFailures, user_error
from mtl_med.inference import Predictor, bundle_parser
from mtl_med.inference import read_case_csv
from mtl_med.build import sfg_highresnet
from mtl_med.transforms import learn_landmarks, save_landmarks

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "sfg_highresnet_pelvis"
CONFIGS = BUNDLE / "configs"
TINY = [4, 8, 8]
OUTPUTS = ("sct", "seg", "sct_std", "seg_uncertainty")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Four phantom cases (a folder of MRs and a datalist with CT and labels), landmarks, a random checkpoint."""
    root = tmp_path_factory.mktemp("cohort")
    inp = root / "in"
    inp.mkdir()
    cases = []
    for i, name in enumerate("abcd"):
        ph = generate_phantom(200 + i, shape=(24, 24, 4))
        c = write_phantom(ph, root / f"src_{name}")
        cases.append(c)
        (inp / f"{name}.nii.gz").write_bytes(Path(c["mr"]).read_bytes())
    save_landmarks(root / "landmarks.json", learn_landmarks([nib.load(c["mr"]).get_fdata() for c in cases]))
    torch.manual_seed(0)
    net = sfg_highresnet(features=TINY)
    with torch.no_grad():
        net.heads[0].bias.fill_(1.0)
    torch.save(net.state_dict(), root / "model.pt")
    items = [{"mr": c["mr"], "ct": c["ct"], "label": c["label"]} for c in cases]
    for n in (2, 3):  # tests use as few cases as show their point
        (root / f"datalist{n}.json").write_text(json.dumps({"test": items[:n]}))
        (root / f"in{n}").mkdir()
        for name in "abcd"[:n]:
            (root / f"in{n}" / f"{name}.nii.gz").write_bytes((inp / f"{name}.nii.gz").read_bytes())
    overrides = {"ckpt_path": str(root / "model.pt"), "landmarks_path": str(root / "landmarks.json"),
                 "features": TINY, "num_samples": 2, "max_batch": 8, "device": "cpu", "n4": False,
                 "progress": False, "save_png": False, "truth_geometry": "resample"}
    return {"root": root, "inputs": inp, "cases": cases, "overrides": overrides}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_run_each_case_once_and_report_every_failure(env, tmp_path):
    """4 cases over 2 gloo ranks: cases[rank::2], so rank 1 gets b and d, and d is corrupt. Each good case is
    written once, the summary lists every case once with its rank, and the run exits non-zero."""
    inp = tmp_path / "in"
    inp.mkdir()
    for name in "abc":
        (inp / f"{name}.nii.gz").write_bytes((env["inputs"] / f"{name}.nii.gz").read_bytes())
    (inp / "d.nii.gz").write_bytes((env["inputs"] / "d.nii.gz").read_bytes()[:300])
    o = env["overrides"]
    files = json.dumps([str(CONFIGS / "inference.json"), str(CONFIGS / "multi_gpu_inference.json")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "monai.bundle", "run", "--config_file", files, "--bundle_root", str(BUNDLE),
           "--input_dir", str(inp), "--output_dir", str(tmp_path / "out"), "--ckpt_path", o["ckpt_path"],
           "--landmarks_path", o["landmarks_path"], "--features", json.dumps(TINY), "--num_samples", "2",
           "--n4", "False", "--save_png", "False"]
    env_vars = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env_vars, capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert "1 of 4 cases failed" in log and "d.nii.gz" in log, log[-3000:]
    summary = json.loads((tmp_path / "out" / "inference_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["num_cases"] == 4
    assert summary["done"] == ["a", "b", "c"] and list(summary["failed"]) == ["d"]
    assert summary["ranks"] == {"0": ["a", "c"], "1": ["b", "d"]}  # each case on exactly one rank
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "b", "c", "inference_summary.json"]
    for name in "abc":
        for key in OUTPUTS:
            assert (tmp_path / "out" / name / f"{name}_{key}.nii.gz").is_file()


def _evaluate_rank(rank: int, port: int, files: list[str], overrides: dict, fail_case: str | None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    parser = bundle_parser(BUNDLE, files, **overrides)
    if fail_case:  # a case that fails on rank 1 (its second case)
        pred = parser.get_parsed_content("predictor")
        real = pred.predict_item

        def predict_item(item, *a, **k):
            if item["name"] == fail_case:
                raise RuntimeError("simulated failure")
            return real(item, *a, **k)

        pred.predict_item = predict_item
    parser.get_parsed_content("initialize")
    code = 0
    try:
        parser.get_parsed_content("evaluate")
    except Exception as err:  # MONAI wraps what an expression raises
        code = 3 if isinstance(user_error(err), CaseFailures) else 1
    finally:
        torch.distributed.destroy_process_group()
    os._exit(code)


def test_two_rank_evaluation_equals_one_rank_and_resumes(env, tmp_path):
    """Two forked gloo ranks evaluate 3 cases (rank 1 has src_b, which fails): the merged CSV equals a
    one-process evaluation's, row for row, rank parts are removed, and only rank 0 reports the failure (exit
    code); a resumed run evaluates only the failed case and recomputes the summary from the CSV."""
    one = tmp_path / "one"
    dl = str(env["root"] / "datalist3.json")
    parser = bundle_parser(BUNDLE, [CONFIGS / "inference.json", CONFIGS / "evaluate.json"], **env["overrides"],
                           datalist=dl, output_dir=str(one))
    parser.get_parsed_content("evaluate")
    ref = read_case_csv(one / "metrics.csv")
    assert [r["case"] for r in ref] == ["src_a", "src_b", "src_c"]

    two = tmp_path / "two"
    files = [str(CONFIGS / "inference.json"), str(CONFIGS / "evaluate.json"), str(CONFIGS / "multi_gpu_evaluate.json")]
    ov = {**env["overrides"], "datalist": dl, "output_dir": str(two), "device": "$torch.device('cpu')"}
    port = _free_port()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_evaluate_rank, args=(r, port, files, ov, "src_b")) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [3, 0]  # one failure report, from rank 0, for rank 1's case
    rows = read_case_csv(two / "metrics.csv")
    assert [r["case"] for r in rows] == ["src_a", "src_c"]
    for r, e in zip(rows, ref[::2]):
        assert r == e  # the same numbers as one process (same seed per case)
    assert not list(two.glob("metrics.rank*"))
    summary = json.loads((two / "metrics_summary.json").read_text())
    assert summary["num_cases"] == 2 and list(summary["failed"]) == ["src_b"]

    # resume in one process: only src_b runs; the summary covers the three rows of the CSV
    parser = bundle_parser(BUNDLE, [CONFIGS / "inference.json", CONFIGS / "evaluate.json"], **env["overrides"],
                           datalist=dl, output_dir=str(two), skip_existing=True)
    res = parser.get_parsed_content("evaluate")
    assert res["skipped"] == ["src_a", "src_c"]
    assert read_case_csv(two / "metrics.csv") == ref
    summary = json.loads((two / "metrics_summary.json").read_text())
    vals = [r["psnr_overall"] for r in ref]
    assert summary["num_cases"] == 3
    assert summary["metrics"]["psnr_overall"]["mean"] == pytest.approx(np.mean(vals), rel=1e-6)


def test_evaluation_csv_keeps_finished_rows_when_a_run_dies(env, tmp_path):
    """A crash (here: an exception that is not a case failure, as a kill would be) after one case leaves its
    row in the CSV; the resumed run evaluates the other case only."""
    pred = Predictor(BUNDLE, **env["overrides"])
    real = pred.predict_item
    seen = []

    def dying(item, *a, **k):
        if len(seen) == 1:
            raise KeyboardInterrupt
        seen.append(item["name"])
        return real(item, *a, **k)

    pred.predict_item = dying
    from mtl_med.inference import evaluate_cases

    dl = str(env["root"] / "datalist2.json")
    with pytest.raises(KeyboardInterrupt):
        evaluate_cases(pred, dl, output_dir=tmp_path)
    assert [r["case"] for r in read_case_csv(tmp_path / "metrics.csv")] == ["src_a"]
    assert not (tmp_path / "metrics_summary.json").exists()
    pred.predict_item, ran = real, []
    pred.predict_item = lambda item, *a, **k: (ran.append(item["name"]), real(item, *a, **k))[1]
    res = evaluate_cases(pred, dl, output_dir=tmp_path, skip_existing=True)
    assert ran == ["src_b"] and res["skipped"] == ["src_a"]
    assert [r["case"] for r in read_case_csv(tmp_path / "metrics.csv")] == ["src_a", "src_b"]


def test_skip_existing_skips_complete_output_sets_only(env, tmp_path):
    out = tmp_path / "out"
    pred = Predictor(BUNDLE, **env["overrides"])
    pred.run(input_dir=env["root"] / "in2", output_dir=out)
    (out / "b" / "b_sct_std.nii.gz").unlink()  # b's set is incomplete: run again
    before = (out / "a" / "a_sct.nii.gz").stat().st_mtime_ns
    res = pred.run(input_dir=env["root"] / "in2", output_dir=out, skip_existing=True)
    assert res["skipped"] == ["a"] and list(res["cases"]) == ["b"]
    assert (out / "b" / "b_sct_std.nii.gz").is_file()
    assert (out / "a" / "a_sct.nii.gz").stat().st_mtime_ns == before


def test_preprocessing_in_workers_gives_identical_outputs(env, tmp_path):
    Predictor(BUNDLE, **env["overrides"]).run(input_dir=env["root"] / "in2", output_dir=tmp_path / "w0")
    pred = Predictor(BUNDLE, **env["overrides"])
    calls = []
    real = pred.preprocess
    pred.preprocess = lambda item: (calls.append(item["name"]), real(item))[1]
    res = pred.run(input_dir=env["root"] / "in2", output_dir=tmp_path / "w2", num_workers=2)
    assert list(res["cases"]) == ["a", "b"]
    assert not calls  # this process never preprocessed: the workers did
    for case in "ab":
        for key in OUTPUTS:
            a, b = (np.asarray(nib.load(tmp_path / w / case / f"{case}_{key}.nii.gz").dataobj) for w in ("w0", "w2"))
            np.testing.assert_array_equal(a, b, err_msg=f"{case} {key}")


def test_bad_case_in_a_worker_fails_alone(env, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.nii.gz").write_bytes((env["inputs"] / "a.nii.gz").read_bytes())
    (inp / "b.nii.gz").write_bytes(b"not a nifti")
    pred = Predictor(BUNDLE, **env["overrides"])
    with pytest.raises(CaseFailures, match=r"b\.nii\.gz") as err:
        pred.run(input_dir=inp, output_dir=tmp_path / "out", num_workers=1)
    assert list(err.value.failures) == ["b"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a"]
