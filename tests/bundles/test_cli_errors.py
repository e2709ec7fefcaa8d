"""User errors at the bundle command line (``python -m monai.bundle run``): one line ``error: <file or config
id>: <problem>`` on stderr, exit code 1, no traceback on the terminal, the traceback in the debug log
(``$MTL_MED_DEBUG_LOG``), and nothing written to the output folder.

Each kind of report is a real subprocess. Each costs 5-8 s of imports (torch, MONAI) and fails before
inference, so the module starts them all at once in a small pool (two at a time) and each test waits for its
own run. Further files with the same kind of problem are checked in process, for the error the command line
reports in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mtl_med.pelvis.phantoms import generate_phantom, write_phantom
from mtl_med.errors import ConfigError, as_bool
from mtl_med.build import sfg_highresnet
from mtl_med.transforms import learn_landmarks, save_landmarks

REPO = Path(__file__).resolve().parents[2]
PELVIS = REPO / "bundles" / "sfg_highresnet_pelvis"
VISION = REPO / "bundles" / "vision_multitask"
TINY = [4, 8, 8]
WORKERS = max(1, min(2, os.cpu_count() or 1))
TIMEOUT = 240


def pelvis_cmd(shared: Path, *extra: str, configs=("inference.json",)) -> list[str]:
    """Inference on the tiny phantom with a tiny random network; ``extra`` overrides (later ids win)."""
    files = [str(PELVIS / "configs" / c) for c in configs]
    config_file = files[0] if len(files) == 1 else json.dumps(files)
    args = {
        "--input_dir": str(shared / "inputs"), "--output_dir": "out", "--ckpt_path": str(shared / "model.pt"),
        "--landmarks_path": str(shared / "landmarks.json"), "--features": json.dumps(TINY), "--n4": "False",
        "--save_png": "False", "--progress": "False", "--num_samples": "1", "--device": "$torch.device('cpu')",
    }
    for key, value in zip(extra[::2], extra[1::2]):
        args[key] = value
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file, "--bundle_root", str(PELVIS)]
    for key, value in args.items():
        cmd += [key, value]
    return cmd


def vision_cmd(configs, *extra: str) -> list[str]:
    config_file = json.dumps([str(VISION / "configs" / c) for c in configs])
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file, "--bundle_root", "vroot",
            "--meta_file", str(VISION / "configs" / "metadata.json"), "--logging_file", "False", *extra]


def make_inputs(shared: Path) -> None:
    """A 32x32x8 phantom MR, its landmarks, a random-init tiny SFG-HighResNet checkpoint, a 4x4x2 MR."""
    ph = generate_phantom(0, shape=(32, 32, 8))
    paths = write_phantom(ph, shared / "phantom")
    (shared / "inputs").mkdir()
    (shared / "inputs" / "pelvis.nii.gz").write_bytes(Path(paths["mr"]).read_bytes())
    save_landmarks(shared / "landmarks.json", learn_landmarks([nib.load(paths["mr"]).get_fdata()]))
    torch.manual_seed(0)
    torch.save(sfg_highresnet(features=TINY).state_dict(), shared / "model.pt")
    (shared / "tiny").mkdir()
    arr = np.random.default_rng(0).uniform(10, 100, (4, 4, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(arr, np.diag([1.46, 1.46, 1.46, 1.0])), str(shared / "tiny" / "tiny.nii.gz"))


def cases(shared: Path) -> dict[str, tuple[list[str], dict[str, bytes]]]:
    """case -> (command, files to write in the case's own working folder first)."""
    return {
        "missing_checkpoint": (pelvis_cmd(shared, "--ckpt_path", "nope.pt"), {}),
        "random_bytes_checkpoint": (pelvis_cmd(shared, "--ckpt_path", "garbage.pt"),
                                    {"garbage.pt": np.random.default_rng(1).bytes(4096)}),
        "save_png_string": (pelvis_cmd(shared, "--save_png", "false"), {}),
        "misspelt_id": (pelvis_cmd(shared, "--num_sample", "3"), {}),
        "output_not_creatable": (pelvis_cmd(shared, "--output_dir", "blocker/out"), {"blocker": b"a regular file\n"}),
        "too_small_mr": (pelvis_cmd(shared, "--input_dir", str(shared / "tiny"), "--n4", "True"), {}),
        "vision_flag_string": (vision_cmd(["train.json", "multi_gpu_train.json"], "--ddp_find_unused_parameters", "false"), {}),
        "vision_missing_data": (vision_cmd(["train.json"], "--dataset", "utkface", "--data_root", "missing"), {}),
        "vision_missing_checkpoint": (vision_cmd(["train.json", "inference.json"]), {}),
    }


class Run:
    def __init__(self, folder: Path, proc: subprocess.CompletedProcess, seconds: float):
        self.folder, self.proc, self.seconds = folder, proc, seconds
        self.log = folder / "debug.log"
        self.output = folder / "out"

    @property
    def both(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def error_line(self) -> str:
        """The one ``error: `` line, after the checks every case shares."""
        lines = [ln for ln in self.proc.stderr.splitlines() if ln.startswith("error: ")]
        assert self.proc.returncode == 1, (self.proc.returncode, self.both[-3000:])
        assert len(lines) == 1, self.proc.stderr[-3000:]
        assert "Traceback" not in self.both, self.both[-3000:]
        assert self.log.is_file(), f"no debug log; stderr: {self.proc.stderr[-2000:]}"
        log = self.log.read_text()
        assert "Traceback (most recent call last)" in log
        assert self.proc.stderr.rstrip().endswith(f"(traceback in {self.log})")  # where the traceback went
        return lines[0]

    def assert_output_untouched(self) -> None:
        """No case folder, no temporary folder: the output folder is absent or empty."""
        assert not self.output.exists() or not list(self.output.rglob("*")), sorted(self.output.rglob("*"))


def _run(folder: Path, cmd: list[str], files: dict[str, bytes]) -> Run:
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MTL_MED_DEBUG_LOG": str(folder / "debug.log")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    return Run(folder, proc, time.perf_counter() - t0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case started at once (``WORKERS`` at a time, in test order); case -> future of its :class:`Run`."""
    shared = tmp_path_factory.mktemp("cli_inputs")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_inputs(shared)
    finally:
        torch.set_num_threads(n)
    root = tmp_path_factory.mktemp("cli_runs")
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    futures = {name: pool.submit(_run, root / name, cmd, files) for name, (cmd, files) in cases(shared).items()}
    yield {"futures": futures, "shared": shared}
    pool.shutdown(wait=True, cancel_futures=True)  # a -k selection does not wait for the other cases


def result(runs, name: str) -> Run:
    return runs["futures"][name].result(timeout=TIMEOUT * len(runs["futures"]))


# ---------------------------------------------------------------------------------------------- pelvis bundle
def test_missing_checkpoint_says_how_to_get_one(runs):
    r = result(runs, "missing_checkpoint")
    line = r.error_line()
    assert "nope.pt" in line and "does not exist" in line and "configs/demo.json" in line, line
    r.assert_output_untouched()


def test_random_bytes_checkpoint_named_without_weights_only_advice(runs):
    r = result(runs, "random_bytes_checkpoint")
    line = r.error_line()
    assert "garbage.pt" in line and "checkpoint" in line, line
    assert "weights_only" not in r.both  # never advise running code from an untrusted file
    r.assert_output_untouched()


#: file problems reported by the same one-line path as the checkpoint cases above, checked in process
#: (each subprocess costs 5-8 s of imports): what the user must read is the file and its problem
FILE_PROBLEMS = {
    "missing_landmarks": (("inference.json",), "landmarks_path", "no_landmarks.json", None, "landmarks file does not exist"),
    "corrupt_landmarks": (("inference.json",), "landmarks_path", "broken_landmarks.json",
                          b'{"format": "mtl_med-histogram-landmarks", "landm', "cannot read landmarks JSON"),
    "missing_datalist": (("inference.json", "evaluate.json"), "datalist", "missing.json", None, "datalist file does not exist"),
}


@pytest.mark.parametrize("case", FILE_PROBLEMS)
def test_bad_landmarks_or_datalist_is_named(runs, tmp_path, case):
    from monai.bundle import ConfigWorkflow

    from mtl_med.errors import user_error

    configs, key, name, content, problem = FILE_PROBLEMS[case]
    if content is not None:
        (tmp_path / name).write_bytes(content)
    shared, out = runs["shared"], tmp_path / "out"
    args = {"input_dir": str(shared / "inputs"), "output_dir": str(out), "ckpt_path": str(shared / "model.pt"),
            "landmarks_path": str(shared / "landmarks.json"), "features": TINY, "n4": False, "save_png": False,
            "progress": False, "num_samples": 1, "device": torch.device("cpu"), key: str(tmp_path / name)}
    wf = ConfigWorkflow(config_file=[str(PELVIS / "configs" / c) for c in configs], workflow_type=None,
                        meta_file=str(PELVIS / "configs" / "metadata.json"), logging_file=False,
                        bundle_root=str(PELVIS), **args)
    hook = sys.excepthook
    try:
        with pytest.raises(Exception) as info:
            wf.initialize()
            wf.run()
    finally:
        sys.excepthook = hook  # the bundle's initialize installs the command-line hook
    err = user_error(info.value)
    assert err is not None, repr(info.value)  # the kind the command line reports in one line
    assert str(tmp_path / name) in str(err) and problem in str(err), str(err)
    assert not out.exists() or not list(out.rglob("*")), sorted(out.rglob("*"))


@pytest.mark.parametrize("case, flag", [("save_png_string", "save_png")])
def test_lower_case_boolean_flag_refused_before_inference(runs, case, flag):
    r = result(runs, case)
    line = r.error_line()
    assert line.startswith(f"error: {flag}: must be true or false"), line
    assert "'false'" in line and f"--{flag} False" in line, line
    assert not r.output.exists()  # refused in "initialize", before the run touches the output folder
    assert "ConfigError" in r.log.read_text()


def test_misspelt_config_id_is_refused_with_the_closest_one(runs):
    """MONAI's parser would add the unknown id and run 50 samples; the bundle's "initialize" refuses it first."""
    r = result(runs, "misspelt_id")
    line = r.error_line()
    assert line.startswith("error: num_sample: unknown config id; did you mean 'num_samples'?"), line
    assert "ConfigError" in r.log.read_text()
    assert not r.output.exists()  # refused before the run touches the output folder


def test_output_folder_that_cannot_be_created_is_named(runs):
    r = result(runs, "output_not_creatable")
    line = r.error_line()
    out = str(r.folder / "blocker" / "out")
    assert f"error: {out}: output folder cannot be created" in line, line
    assert str(runs["shared"] / "inputs") not in line and "pelvis.nii.gz" not in line, line
    assert (r.folder / "blocker").is_file()  # left as it was


def test_too_small_mr_is_a_case_failure_with_a_clear_message(runs):
    r = result(runs, "too_small_mr")
    line = r.error_line()
    assert "1 of 1 cases failed" in line, line
    tiny = str(runs["shared"] / "tiny" / "tiny.nii.gz")
    # CaseFailures lists each failed case on the lines after the error line: "  tiny: <file>: <problem>"
    detail = [ln for ln in r.proc.stderr.splitlines() if ln.strip().startswith("tiny:")]
    assert len(detail) == 1 and tiny in detail[0] and "too small" in detail[0], r.proc.stderr[-2000:]
    assert "CaseFailures" in r.log.read_text()
    r.assert_output_untouched()


# ---------------------------------------------------------------------------------------------- vision bundle
def test_vision_lower_case_boolean_flag_refused(runs):
    """multi_gpu_train.json checks its flag before the process group is set up (no torchrun needed)."""
    r = result(runs, "vision_flag_string")
    line = r.error_line()
    assert line.startswith("error: ddp_find_unused_parameters: must be true or false"), line
    assert "'false'" in line, line
    assert not (r.folder / "vroot").exists()


def test_every_boolean_id_of_the_pelvis_bundle_is_checked():
    """The ids check_flags covers in "initialize" (a subprocess above shows the one-line report for save_png)."""
    from mtl_med.errors import ConfigError, check_flags

    cfg = json.loads((REPO / "bundles" / "sfg_highresnet_pelvis" / "configs" / "inference.json").read_text())
    call = next(x for x in cfg["initialize"] if "check_flags" in x)
    flags = [k for k, v in cfg.items() if isinstance(v, bool)]
    assert flags and all(f"{k}=@{k}" in call for k in flags), (flags, call)
    for k in flags:
        with pytest.raises(ConfigError, match=rf"^{k}: must be true or false"):
            check_flags(**{k: "false"})


def test_vision_missing_data_folder_is_one_line(runs):
    line = result(runs, "vision_missing_data").error_line()
    assert line.startswith("error: missing") and "not found" in line, line


def test_vision_missing_checkpoint_is_one_line(runs):
    line = result(runs, "vision_missing_checkpoint").error_line()
    assert "model.pt: checkpoint does not exist; train one with configs/train.json" in line, line


# ---------------------------------------------------------------------------------------------- in process
@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (1, True), (0, False)])
def test_as_bool_accepts_booleans_and_0_1(value, expected):
    assert as_bool(value, "save_png") is expected


@pytest.mark.parametrize("value", ["false", "true", "yes", 2, None])
def test_as_bool_refuses_anything_else_naming_the_id(value):
    with pytest.raises(ConfigError) as info:
        as_bool(value, "save_png")
    assert str(info.value).startswith("save_png: must be true or false"), str(info.value)
    assert info.value.path == "save_png"
    assert repr(value) in str(info.value)
