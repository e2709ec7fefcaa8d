"""Through the bundle's predictor: inputs named by DICOM UIDs are separate cases with separate outputs,
``skip_existing`` recognises a finished dotted case, and a name of '..' writes nothing anywhere."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mtl_med.pelvis.phantoms import generate_phantom, write_phantom
from mtl_med.errors import InputError
from mtl_med.inference import Predictor
from mtl_med.build import sfg_highresnet
from mtl_med.transforms import learn_landmarks, save_landmarks

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "sfg_highresnet_pelvis"
TINY = [4, 8, 8]
# two shapes, so that one case's outputs written over the other's would show
CASES = {"1.2.840.113619.100": (32, 32, 6), "1.2.840.113619.200": (28, 36, 8), "pat.v1": (32, 32, 6)}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    inp = root / "in"
    inp.mkdir()
    mrs = []
    for i, (case, shape) in enumerate(CASES.items()):
        ph = generate_phantom(300 + i, shape=shape, mr_spacing=(1.46, 1.46, 3.0))
        mr = write_phantom(ph, root / f"ph{i}")["mr"]
        shutil.copyfile(mr, inp / f"{case}.nii.gz")
        mrs.append(mr)
    save_landmarks(root / "landmarks.json", learn_landmarks([nib.load(m).get_fdata() for m in mrs]))
    torch.manual_seed(0)
    torch.save(sfg_highresnet(features=TINY).state_dict(), root / "model.pt")
    pred = Predictor(BUNDLE, ckpt_path=str(root / "model.pt"), landmarks_path=str(root / "landmarks.json"),
                     features=TINY, num_samples=1, max_batch=8, margin=2, device="cpu", n4=False, progress=False,
                     save_png=False)
    return root, inp, pred


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_dotted_names_are_separate_cases_and_resume(env):
    root, inp, pred = env
    out = root / "sbx" / "out"
    res = pred.run(input_dir=inp, output_dir=out)
    assert sorted(res["cases"]) == sorted(CASES)
    for case in CASES:
        files = sorted(p.name for p in (out / case).iterdir())
        assert files == sorted([*(f"{case}_{k}.nii.gz" for k in ("sct", "seg", "sct_std", "seg_uncertainty")),
                                f"{case}_run.json"])
        mine = nib.load(str(inp / f"{case}.nii.gz")).shape
        assert nib.load(str(out / case / f"{case}_sct.nii.gz")).shape == mine  # its own, not another case's
    assert sorted(p.name for p in out.iterdir()) == sorted(CASES)
    again = pred.run(input_dir=inp, output_dir=out, skip_existing=True)
    assert sorted(again["skipped"]) == sorted(CASES) and not again["cases"]


@pytest.mark.parametrize("stem", [".", ".."])
def test_a_dot_case_writes_nothing_anywhere(env, stem):
    root, inp, pred = env
    sbx = root / f"sbx_{len(stem)}"
    (sbx / "keep").mkdir(parents=True)
    bad = sbx / "in" / f"{stem}.nii.gz"
    bad.parent.mkdir()
    shutil.copyfile(inp / "pat.v1.nii.gz", bad)
    before = _tree(root)
    with pytest.raises(InputError) as info:
        pred.run(input_dir=bad, output_dir=sbx / "out")
    assert str(bad) in str(info.value)
    assert _tree(root) == before  # not even the output folder


def test_a_case_named_in_a_call_cannot_leave_the_output_folder(env):
    root, inp, pred = env
    with pytest.raises(InputError):
        pred.predict_case(str(inp / "pat.v1.nii.gz"), output_dir=root / "sbx_call" / "out", case="..")
    assert not (root / "sbx_call" / ".._sct.nii.gz").exists() and not any((root / "sbx_call").glob("*_sct*"))
