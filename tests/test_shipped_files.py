"""Shipped weights are read-only to every command: nothing writes beside them, whatever configs are merged, and
loading them checks the MD5 of the bundle's large_files.yml."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtl_med.errors import ConfigError, InputError
from mtl_med.inference import check_output_dir, load_checkpoint
from mtl_med.io import atomic_write_json, refuse_shipped, verify_shipped, writable_dir
from mtl_med.build import sfg_highresnet
from mtl_med.transforms import load_landmarks, save_landmarks

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "sfg_highresnet_pelvis"
DEMO = BUNDLE / "models" / "demo"


def _state(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def bundle_copy(tmp_path):
    """The bundle's large_files.yml and shipped weights in a folder of the test's own."""
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    shutil.copyfile(BUNDLE / "large_files.yml", root / "large_files.yml")
    shutil.copytree(DEMO, root / "models" / "demo")
    return root


def test_the_shipped_files_match_their_listed_md5():
    for name in ("model.pt", "landmarks.json"):
        verify_shipped(DEMO / name)


def test_a_changed_shipped_file_is_named_when_loaded(bundle_copy):
    demo = bundle_copy / "models" / "demo"
    with open(demo / "landmarks.json", "a") as f:
        f.write(" ")
    with pytest.raises(InputError) as info:
        load_landmarks(demo / "landmarks.json")
    assert str(demo / "landmarks.json") in str(info.value) and "large_files.yml" in str(info.value)
    net = sfg_highresnet(features=[8, 16, 16])
    load_checkpoint(net, demo / "model.pt")  # unchanged: loads
    state = torch.load(demo / "model.pt", weights_only=True)
    next(iter(state.values())).add_(1.0)
    torch.save(state, demo / "model.pt")
    with pytest.raises(InputError) as info:
        load_checkpoint(net, demo / "model.pt")
    assert "model.pt" in str(info.value) and "differs" in str(info.value)


def test_no_writer_writes_beside_the_shipped_weights(bundle_copy):
    demo = bundle_copy / "models" / "demo"
    before = _state(demo)
    with pytest.raises(InputError):
        save_landmarks(demo / "landmarks.json", [0.0, 50.0, 100.0], quantiles=[0.01, 0.5, 0.99])
    with pytest.raises(InputError):
        atomic_write_json({}, demo / "policy.json")
    with pytest.raises(InputError):
        check_output_dir(demo / "cases")
    with pytest.raises(ConfigError) as info:
        writable_dir(demo)
    assert str(info.value).startswith("ckpt_dir:")
    assert _state(demo) == before
    # the folder above is the bundle's own training output: writable
    atomic_write_json({}, bundle_copy / "models" / "policy.json")
    assert writable_dir(bundle_copy / "models" / "run1") == str(bundle_copy / "models" / "run1")
    refuse_shipped(bundle_copy / "models" / "model.pt")


def test_training_with_the_demo_config_is_refused_before_it_writes(tmp_path):
    """``train.json`` + ``demo.json`` (which points ckpt_dir at models/demo) stops in initialize with one line."""
    before = _state(DEMO)
    cfg = BUNDLE / "configs"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           str([str(cfg / "train.json"), str(cfg / "demo.json")]), "--bundle_root", str(BUNDLE),
           "--datalist", str(tmp_path / "datalist.json"), "--output_dir", str(tmp_path / "runs")]
    env = {**os.environ, "MTL_MED_DEBUG_LOG": str(tmp_path / "debug.log")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ckpt_dir:") and str(DEMO) in last, res.stderr[-2000:]
    assert _state(DEMO) == before


def test_atomic_writers_leave_files_readable_like_any_other(tmp_path):
    """mkstemp's private 0600 must not reach the output: metrics and figures are shared like the NIfTI files."""
    mask = os.umask(0o022)
    try:
        out = atomic_write_json({"a": 1}, tmp_path / "summary.json")
    finally:
        os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o644
