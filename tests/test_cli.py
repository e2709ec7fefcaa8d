"""The ``mtl-med`` console command: each job a thin layer over the bundle configs, its options named by the config
ids they set; one prediction run in-process on a tiny phantom with a tiny network."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mtl_med import cli
from mtl_med.data.phantoms import generate_phantom, write_phantom
from mtl_med.networks import sfg_highresnet
from mtl_med.transforms import learn_landmarks, save_landmarks

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "sfg_highresnet_pelvis"
TINY = [4, 8, 8]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    c = write_phantom(generate_phantom(7, shape=(24, 24, 4)), root / "case_0")
    save_landmarks(root / "landmarks.json", learn_landmarks([nib.load(c["mr"]).get_fdata()]))
    torch.manual_seed(0)
    torch.save(sfg_highresnet(features=TINY).state_dict(), root / "model.pt")
    (root / "datalist.json").write_text(json.dumps({"test": [{"mr": c["mr"], "label": c["label"]}]}))
    opts = ["--ckpt", str(root / "model.pt"), "--landmarks", str(root / "landmarks.json"), "--num-samples", "2",
            "--n4", "false", "--save-png", "false", "--device", "cpu", "--set", f"features={json.dumps(TINY)}",
            "--set", "progress=false"]
    return root, c, opts


def test_console_script_is_declared():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["mtl-med"] == "mtl_med.cli:console"


@pytest.mark.parametrize("job, ids", [
    ("predict", ["input_dir", "datalist", "output_dir", "num_samples", "dicom_outputs", "skip_existing",
                 "num_workers", "ckpt_path", "landmarks_path", "device", "bundle_root"]),
    ("evaluate", ["datalist", "output_dir", "save_outputs", "skip_existing", "num_samples"]),
    ("train", ["datalist", "max_epochs", "ckpt_dir", "resume_ckpt", "output_dir"]),
])
def test_help_lists_the_config_ids_it_overrides(job, ids, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([job, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    named = set()
    for group in re.findall(r"\[config ids?: ([^\]]*)\]", text):
        named |= set(re.findall(r"[a-z_]+", group))
    assert set(ids) <= named, set(ids) - named


def test_prepare_runs_the_data_tool(monkeypatch):
    seen = []
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: seen.append((cmd, os.environ["OMP_WAIT_POLICY"])) or 0)
    assert cli.main(["prepare", "phantoms", "--out", "demo_data", "--cases", "2"]) == 0
    # the child job inherits a passive OpenMP wait policy unless the user chose one
    assert seen == [([sys.executable, "-m", "data_prep.phantoms", "--out", "demo_data", "--cases", "2"], "PASSIVE")]
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    cli.main(["prepare", "phantoms"])
    assert seen[-1][1] == "ACTIVE"


def test_print_command_is_the_bundle_command(env, capsys, tmp_path):
    root, c, opts = env
    cli.main(["predict", str(root / "datalist.json"), "-o", str(tmp_path), "--nproc", "2", "--skip-existing",
              "--dicom-outputs", "ct", "seg", "--print-command", *opts])
    cmd = shlex.split(capsys.readouterr().out)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    files = json.loads(cmd[cmd.index("--config_file") + 1])
    assert [Path(f).name for f in files] == ["inference.json", "multi_gpu_inference.json"]
    args = dict(zip(cmd[cmd.index("--bundle_root")::2], cmd[cmd.index("--bundle_root") + 1::2]))
    assert args["--datalist"] == str(root / "datalist.json") and args["--skip_existing"] == "true"
    assert json.loads(args["--dicom_outputs"]) == ["ct", "seg"] and args["--features"] == json.dumps(TINY)

    cli.main(["train", str(root / "datalist.json"), "--demo", "--variant", "cross_stitch", "--max-epochs", "3",
              "--print-command"])
    cmd = shlex.split(capsys.readouterr().out)
    files = json.loads(cmd[cmd.index("--config_file") + 1])
    assert [Path(f).name for f in files] == ["train.json", "demo.json", "cross_stitch.json"]
    assert cmd[cmd.index("--max_epochs") + 1] == "3"


def test_predict_one_nifti_file_in_process(env, tmp_path):
    root, c, opts = env
    assert cli.main(["predict", c["mr"], "-o", str(tmp_path / "out"), *opts]) == 0
    ref = nib.load(c["mr"])
    for key in ("sct", "seg", "sct_std", "seg_uncertainty"):
        img = nib.load(tmp_path / "out" / "case_0" / f"case_0_{key}.nii.gz")
        assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case_0"]  # this file only


def test_user_error_is_one_line_and_exit_code_1(env, tmp_path, capsys):
    root, c, opts = env
    bad = [*opts, "--ckpt", str(tmp_path / "missing.pt")]
    assert cli.main(["predict", c["mr"], "-o", str(tmp_path / "out"), *bad]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "missing.pt: checkpoint file does not exist" in err[-1]
