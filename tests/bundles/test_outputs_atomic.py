"""A case's outputs appear as a complete set or not at all, even when the run is killed (SIGKILL: no cleanup
handler runs), and the next run leaves no partial set and no temporary folder behind.

The killed runs are forked children of this test process (``os.fork`` after mtl_med, torch and MONAI are
imported: a fresh interpreter would spend most of this file's time budget importing MONAI). Each child builds
the bundle's predictor with :func:`mtl_med.inference.Predictor`, patches one point of its own copy of the code
to ``os.kill(os.getpid(), SIGKILL)`` and calls ``run``; nothing it patches reaches this process.
"""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mtl_med.pelvis.phantoms import generate_phantom, write_phantom
from mtl_med import inference
from mtl_med.inference import Predictor, publish, writer
from mtl_med.build import sfg_highresnet
from mtl_med.transforms import learn_landmarks, save_landmarks

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child process (POSIX only)")

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "sfg_highresnet_pelvis"
TINY = [4, 8, 8]
CASES = ("case_a", "case_b")  # input files case_a.nii.gz, case_b.nii.gz, run in this order
OUTPUTS = ("sct", "seg", "sct_std", "seg_uncertainty")  # written in this order
CHILD_TIMEOUT_S = 120


def _names(case):
    return sorted([*(f"{case}_{k}.nii.gz" for k in OUTPUTS), f"{case}_run.json"])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny volumes; a forked child inherits this
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two small phantom MRs in one input folder, landmarks, a random-init checkpoint; the complete outputs of
    a clean run (seed 0, what every run here computes) and of an earlier run with another seed (seed 1)."""
    root = tmp_path_factory.mktemp("atomic")
    inp = root / "in"
    inp.mkdir()
    mrs = []
    for i, case in enumerate(CASES):
        ph = generate_phantom(200 + i, shape=(32, 32, 8), mr_spacing=(1.46, 1.6, 3.0), oblique_deg=10.0 * i)
        mr = write_phantom(ph, root / case)["mr"]
        shutil.copyfile(mr, inp / f"{case}.nii.gz")
        mrs.append(mr)
    save_landmarks(root / "landmarks.json", learn_landmarks([nib.load(m).get_fdata() for m in mrs]))
    torch.manual_seed(0)
    net = sfg_highresnet(features=TINY)
    with torch.no_grad():  # synthetic CT around 0 HU, inside the clipped range, so that the sampling seed shows
        net.heads[0].bias.fill_(1.0)
    torch.save(net.state_dict(), root / "model.pt")
    overrides = {
        "ckpt_path": str(root / "model.pt"), "landmarks_path": str(root / "landmarks.json"), "features": TINY,
        "num_samples": 2, "max_batch": 8, "margin": 4, "device": "cpu", "n4": False, "progress": False,
        "save_png": False, "seed": 0,
    }
    pred = Predictor(BUNDLE, **overrides)
    pred.run(input_dir=inp, output_dir=root / "reference")
    Predictor(BUNDLE, **{**overrides, "seed": 1}).run(input_dir=inp, output_dir=root / "earlier")
    ref = {c: {k: np.asarray(nib.load(root / "reference" / c / f"{c}_{k}.nii.gz").dataobj) for k in OUTPUTS}
           for c in CASES}
    shapes = {c: nib.load(inp / f"{c}.nii.gz").shape for c in CASES}
    earlier = _snapshot(root / "earlier")
    for c in CASES:  # the earlier run's files differ from this run's: a mixture of the two would show
        assert not np.array_equal(np.asarray(nib.load(root / "earlier" / c / f"{c}_sct.nii.gz").dataobj), ref[c]["sct"])
    return {"root": root, "input": inp, "overrides": overrides, "predictor": pred, "ref": ref, "shapes": shapes,
            "earlier": earlier}


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included), relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _visible(out: Path) -> dict[str, list[str]]:
    """What a user (or the next pipeline step) sees: the non-hidden case folders and their files."""
    return {p.name: sorted(f.name for f in p.iterdir()) for p in out.iterdir() if not p.name.startswith(".")}


def _private(out: Path) -> list[Path]:
    return sorted(out.glob(f".*.mtl_med-{socket.gethostname()}-*"))


# ----------------------------------------------------------------------------------------------- killed runs
def _child(kill: str, n: int, overrides: dict, inp: Path, out: Path) -> None:
    """Runs in the forked child: build the predictor, arm one kill point, run over ``inp``."""
    torch.set_num_threads(1)
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    pred = Predictor(BUNDLE, **overrides)
    if kill == "inference":  # first network call of the second case (the first case's write has returned)
        written = []
        write, call = inference.VolumePredictor.write, inference.PosteriorSampler.__call__
        inference.VolumePredictor.write = lambda *a, **k: (write(*a, **k), written.append(1))[0]
        inference.PosteriorSampler.__call__ = lambda self, x: die() if written else call(self, x)
    elif kill in ("between_files", "during_write"):
        save, saves = writer.nib.save, []

        def patched_save(img, filename, *args, **kwargs):
            saves.append(filename)
            if kill == "during_write" and len(saves) == n:  # half of the real bytes reach the file, then death
                data = img.to_bytes()
                data = gzip.compress(data) if str(filename).endswith(".gz") else data
                with open(filename, "wb") as f:
                    f.write(data[: len(data) // 2])
                die()
            save(img, filename, *args, **kwargs)
            if len(saves) == n:
                die()

        writer.nib.save = patched_save
    elif kill == "between_renames":  # the old case folder has been moved aside, the new one not yet renamed in
        rename = publish.os.rename

        def patched_rename(src, dst, *args, **kwargs):
            rename(src, dst, *args, **kwargs)
            if str(dst).endswith(".old"):
                die()

        publish.os.rename = patched_rename
    else:
        raise ValueError(kill)
    pred.run(input_dir=inp, output_dir=out)


def _killed_run(kill: str, n: int, env: dict, out: Path) -> int:
    """Fork, run ``_child`` there; the child's exit code as ``subprocess`` reports it (-9: SIGKILL)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # never return into pytest from here
        code = 3
        try:
            _child(kill, n, env["overrides"], env["input"], out)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:  # e.g. a lock copied in a held state by fork: fail, do not hang
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the {kill} child did not finish within {CHILD_TIMEOUT_S} s")
        time.sleep(0.02)


def _assert_clean_rerun(env: dict, out: Path) -> None:
    """A normal run over ``out``: every case a complete, loadable set equal to a clean run's, nothing hidden."""
    res = env["predictor"].run(input_dir=env["input"], output_dir=out)
    assert sorted(res["cases"]) == list(CASES) and not res["failed"]
    assert _visible(out) == {c: _names(c) for c in CASES}
    for c in CASES:
        for k in OUTPUTS:
            img = nib.load(out / c / f"{c}_{k}.nii.gz")
            assert img.shape == env["shapes"][c], (c, k)
            np.testing.assert_array_equal(np.asarray(img.dataobj), env["ref"][c][k], err_msg=f"{c} {k}")
    assert list(out.rglob(".*")) == []  # no private folder, no temporary file left anywhere


def _earlier(env: dict, out: Path) -> None:
    shutil.copytree(env["root"] / "earlier", out)
    assert _snapshot(out) == env["earlier"]


def _earlier_files(env: dict, case: str) -> dict[str, bytes]:
    return {k: v for k, v in env["earlier"].items() if k.startswith(case + os.sep)}


@pytest.mark.parametrize("earlier", [False, True], ids=["fresh", "over_earlier"])
def test_kill_during_inference(env, tmp_path, earlier):
    """Killed in the second case's first network call: the first case is published whole, the second is
    absent (or still the earlier run's set, byte for byte); no temporary folder is pending."""
    out = tmp_path / "out"
    if earlier:
        _earlier(env, out)
    assert _killed_run("inference", 0, env, out) == -signal.SIGKILL
    assert _visible(out) == {c: _names(c) for c in (CASES if earlier else CASES[:1])}
    for k in OUTPUTS:  # the first case is the new run's complete set
        np.testing.assert_array_equal(np.asarray(nib.load(out / "case_a" / f"case_a_{k}.nii.gz").dataobj),
                                      env["ref"]["case_a"][k])
    if earlier:
        assert {k: v for k, v in _snapshot(out).items() if k.startswith("case_b")} == _earlier_files(env, "case_b")
    assert list(out.rglob(".*")) == []  # the first case's private folder became case_a; none for case_b yet
    _assert_clean_rerun(env, out)


@pytest.mark.parametrize(
    "kill, n, earlier",
    [
        ("between_files", 2, False),  # case_a: sct and seg written, sct_std not begun
        ("during_write", 3, False),  # case_a: sct, seg written, half of sct_std
        ("between_files", 6, True),  # case_a re-published; case_b: 2 of 4 new files written over an earlier set
        ("during_write", 7, True),  # case_b: half of its third file, over an earlier set
    ],
    ids=["between_files", "during_write", "between_files_over_earlier", "during_write_over_earlier"],
)
def test_kill_while_writing_leaves_no_partial_set(env, tmp_path, kill, n, earlier):
    """Killed between two output files or in the middle of one: the case being written is not visible at all
    (or is still the earlier complete set, byte for byte); its files so far are in a private folder, which
    the next run removes before writing every case whole."""
    out = tmp_path / "out"
    if earlier:
        _earlier(env, out)
    assert _killed_run(kill, n, env, out) == -signal.SIGKILL
    killed = CASES[(n - 1) // len(OUTPUTS)]
    done = CASES[: CASES.index(killed)]
    expected = {c: _names(c) for c in done}
    if earlier:
        expected[killed] = _names(killed)
    assert _visible(out) == expected
    if earlier:  # not one file of the killed case's set replaced
        assert {k: v for k, v in _snapshot(out).items() if k.startswith(killed + os.sep)} == _earlier_files(env, killed)
    for c in done:
        assert nib.load(out / c / f"{c}_sct.nii.gz").shape == env["shapes"][c]

    # the kill really happened where intended: the partial set is there, in the dead child's private folder
    (tmp,) = _private(out)
    assert tmp.name.startswith(f".{killed}.mtl_med-") and tmp.name.endswith(".tmp")
    written = (n - 1) % len(OUTPUTS) + 1
    assert sorted(p.name for p in tmp.iterdir()) == sorted(f"{killed}_{k}.nii.gz" for k in OUTPUTS[:written])
    last = tmp / f"{killed}_{OUTPUTS[written - 1]}.nii.gz"
    if kill == "during_write":
        with pytest.raises(Exception):  # truncated gzip stream
            np.asarray(nib.load(last).dataobj)
    else:
        assert nib.load(last).shape == env["shapes"][killed]

    assert inference.check_output_dir(out) == out.resolve()  # start of the next run: the dead run's folder goes
    assert _private(out) == [] and _visible(out) == expected
    _assert_clean_rerun(env, out)


def test_kill_between_renames_restores_earlier_set(env, tmp_path):
    """Killed after the earlier case folder was moved aside and before the new one was renamed onto its place:
    the next run puts the earlier set back (byte for byte) and removes the new, unpublished one, then writes
    the complete new sets."""
    out = tmp_path / "out"
    _earlier(env, out)
    assert _killed_run("between_renames", 0, env, out) == -signal.SIGKILL
    private = _private(out)
    assert sorted(p.suffix for p in private) == [".old", ".tmp"], private
    assert all(p.name.startswith(".case_a.mtl_med-") for p in private)
    assert _visible(out) == {"case_b": _names("case_b")}  # case_a is absent, never partial
    (tmp,) = [p for p in private if p.suffix == ".tmp"]
    assert sorted(p.name for p in tmp.iterdir()) == _names("case_a")  # the new complete set, not yet published

    inference.check_output_dir(out)
    assert _snapshot(out) == env["earlier"]  # earlier sets back in place, nothing else (no hidden entries)
    _assert_clean_rerun(env, out)


# ----------------------------------------------------------------------------------------------- clean-up rules
def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_cleanup_removes_only_dead_runs_folders_on_this_host(tmp_path):
    host = socket.gethostname()
    live = subprocess.Popen(["sleep", "60"])  # another process, running for the whole test
    try:
        dead = _dead_pid()
        out = tmp_path / "out"
        (out / "case_a").mkdir(parents=True)
        (out / "case_a" / "case_a_sct.nii.gz").write_bytes(b"published")
        kept = [
            f".case_a.mtl_med-{host}-{live.pid}.tmp",  # being written by a live run
            f".case_b.mtl_med-{host}-{live.pid}.old",  # moved aside by a live run, about to be replaced
            f".case_a.mtl_med-another-host-{dead}.tmp",  # another machine (shared file system): cannot tell
            f".case_a.mtl_med-{host}-{dead}.bak",  # not a kind the runs write
            f".case_a.mtl_med-{host}-x{dead}.tmp",  # no pid
            ".case_a.tmp", ".hidden", f"case_c.mtl_med-{host}-{dead}.tmp",  # other naming schemes
        ]
        removed = [f".case_a.mtl_med-{host}-{dead}.tmp", f".case_a.mtl_med-{host}-{dead}.old"]
        restored = f".case_c.mtl_med-{host}-{dead}.old"  # moved aside, never replaced: put back as case_c
        for name in (*kept, *removed, restored):
            (out / name).mkdir()
            (out / name / "f.nii.gz").write_bytes(name.encode())
        (out / ".notes.mtl_med-x.tmp").write_text("a file, not a folder")
        before = _snapshot(out)

        inference.check_output_dir(out)
        names = sorted(p.name for p in out.iterdir())
        assert names == sorted([*kept, "case_a", "case_c", ".notes.mtl_med-x.tmp"])
        after = _snapshot(out)
        for name in (*kept, "case_a", ".notes.mtl_med-x.tmp"):  # untouched, contents included
            assert {k: v for k, v in after.items() if k.split(os.sep)[0] == name} == \
                   {k: v for k, v in before.items() if k.split(os.sep)[0] == name}
        assert (out / "case_c" / "f.nii.gz").read_bytes() == restored.encode()
    finally:
        live.kill()
        live.wait()


def test_leftover_with_this_process_pid_does_not_fail_the_case(env, tmp_path):
    """A dead run's folder named with our own pid (a restarted container keeps its hostname and reuses pids)."""
    out = tmp_path / "out"
    stale = out / f".case_a.mtl_med-{socket.gethostname()}-{os.getpid()}.tmp"
    stale.mkdir(parents=True)
    (stale / "case_a_sct.nii.gz").write_bytes(b"half a file")
    try:
        _assert_clean_rerun(env, out)
    except inference.CaseFailures as err:
        raise AssertionError(str(err)) from err
