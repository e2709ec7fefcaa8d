"""The ``mtl-med`` console command: each job a thin layer over the bundle configs, its options named by the config
ids they set; one prediction run in-process on a tiny phantom with a tiny network."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mtl_med import cli
from mtl_med.pelvis.phantoms import generate_phantom, write_phantom
from mtl_med.build import sfg_highresnet
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
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    files = json.loads(cmd[cmd.index("--config_file") + 1])
    assert [Path(f).name for f in files] == ["inference.json", "multi_gpu_inference.json"]
    args = dict(zip(cmd[cmd.index("--bundle_root")::2], cmd[cmd.index("--bundle_root") + 1::2]))
    assert args["--datalist"] == str(root / "datalist.json") and args["--skip_existing"] == "True"
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


# ------------------------------------------------------------------------------- refused before anything runs
@pytest.fixture
def nothing_runs(monkeypatch):
    """Every way a job starts (in process, torchrun, a child job) recorded instead of run."""
    import monai.bundle

    started = []
    monkeypatch.setattr(monai.bundle, "run", lambda *a, **k: started.append(("run", k)))
    monkeypatch.setattr(cli.subprocess, "Popen", lambda *a, **k: started.append(("Popen", a)))
    monkeypatch.setattr(cli.subprocess, "call", lambda *a, **k: started.append(("call", a)) or 0)
    return started


@pytest.mark.parametrize("extra", [[], ["--nproc", "2"], ["--print-command"]], ids=["in-process", "torchrun", "print"])
@pytest.mark.parametrize("item, line", [
    ("num_sample=3", "num_sample: unknown config id; did you mean 'num_samples'?"),
    ("network_export_def::mod=argmax", "network_export_def::mod: unknown config id; did you mean 'network_export_def::mode'?"),
])
def test_misspelt_set_id_is_refused_in_one_line_before_anything_runs(env, tmp_path, capsys, nothing_runs, extra,
                                                                      item, line):
    root, c, opts = env
    out = tmp_path / "out"
    assert cli.main(["predict", c["mr"], "-o", str(out), *opts, "--set", item, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [f"mtl-med: error: {line}"]
    assert captured.out == "" and nothing_runs == [] and not out.exists()


def test_valid_nested_set_ids_run(env, tmp_path, capsys, nothing_runs):
    root, c, opts = env
    assert cli.main(["predict", c["mr"], "-o", str(tmp_path / "out"), *opts, "--set", "network_export_def::mode=argmax",
                     "--set", "roi_size_3d#2=16", "--set", "_meta_::version=x"]) == 0
    (kind, kw), = nothing_runs
    assert kw["network_export_def::mode"] == "argmax" and kw["roi_size_3d#2"] == 16


@pytest.mark.parametrize("argv, bad, allowed", [
    (["predict", "in.nii.gz", "-o", "o", "--inference-mode", "sampel"], "sampel", "'sample', 'argmax', 'relaxed'"),
    (["evaluate", "dl.json", "-o", "o", "--inference-mode", "max"], "max", "'sample', 'argmax', 'relaxed'"),
    (["predict", "in.nii.gz", "-o", "o", "--dicom-outputs", "ct", "sek"], "sek", "'ct', 'seg', 'rtstruct'"),
])
def test_enumerated_options_are_refused_at_parse_time_with_the_choices(argv, bad, allowed, capsys, monkeypatch):
    monkeypatch.setattr(cli, "default_bundle", lambda: pytest.fail("got past parsing"))
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"invalid choice: {bad!r}" in line and allowed in line, line


def test_enumerated_options_take_each_allowed_value():
    p = cli.build_parser()
    for mode in cli.INFERENCE_MODES:
        assert p.parse_args(["predict", "x", "-o", "o", "--inference-mode", mode]).inference_mode == mode
    args = p.parse_args(["predict", "x", "-o", "o", "--dicom-outputs", *cli.DICOM_OUTPUTS])
    assert args.dicom_outputs == list(cli.DICOM_OUTPUTS)


@pytest.mark.parametrize("bundle, bad, hint", [(BUNDLE, "crossstitch", "cross_stitch"),
                                               (REPO / "bundles" / "vision_multitask", "selectiv_sharing", "selective_sharing")])
def test_misspelt_variant_lists_the_variants_before_anything_runs(bundle, bad, hint, capsys, nothing_runs, monkeypatch):
    import mtl_med.config_ids

    monkeypatch.setattr(mtl_med.config_ids, "check_ids", lambda *a, **k: pytest.fail("got past the variant"))
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "dl.json", "--bundle", str(bundle), "--variant", bad])
    assert done.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    names = sorted(f.stem for f in (bundle / "configs" / "variants").glob("*.json"))
    assert f"invalid choice: {bad!r} (did you mean {hint!r}?)" in line, line
    assert f"choose from {', '.join(names)} " in line and nothing_runs == []


@pytest.mark.parametrize("job", ["predict", "evaluate", "train"])
def test_every_option_sets_an_id_its_configs_define(job, capsys):
    """The ids the options name in --help are ids of the job's config files (else the check would refuse them)."""
    from mtl_med.config_ids import check_ids

    with pytest.raises(SystemExit):
        cli.main([job, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    ids = {i for group in re.findall(r"\[config ids?: ([^\]]*)\]", text) for i in re.findall(r"[a-z_][a-z_0-9]*", group)}
    ids -= {"or"}
    args = cli.build_parser().parse_args([job, "in.json", "-o", "out"] if job != "train" else [job, "in.json"])
    files, _ = cli.job_configs(args, BUNDLE)
    assert len(ids) > 8
    check_ids(sorted(ids), files, str(BUNDLE / "configs" / "metadata.json"))


# ------------------------------------------------------------------------ the printed command, read back by fire
@pytest.mark.parametrize("value", ["1", "True", "None", "[a, b]", "a b", "$torch.device('cpu')", "/x/y.json", "",
                                   1, 1.5, 1e-5, True, False, None, [1, "a", True, None], {"a": [False], "b": "2"}])
def test_command_value_reads_back_as_the_same_value(value):
    from fire.parser import DefaultParseValue

    text = cli.command_value(value)
    assert DefaultParseValue(text) == value and type(DefaultParseValue(text)) is type(value), text


def test_printed_command_overrides_arrive_as_the_values_given(env, capsys, tmp_path, monkeypatch):
    """The printed command's arguments parsed as `python -m monai.bundle run` parses them (fire, into
    monai.bundle.scripts.run): booleans arrive as bool (the bundle refuses the text 'false'), lists as lists,
    text that looks like a number as text."""
    import types

    import fire
    from monai.bundle import scripts

    from mtl_med.errors import as_bool

    root, c, opts = env
    cli.main(["predict", str(root / "datalist.json"), "-o", str(tmp_path), "--nproc", "2", "--skip-existing",
              "--dicom-outputs", "ct", "seg", "--section", "1", "--print-command", *opts])
    cmd = shlex.split(capsys.readouterr().out)
    seen = {}
    monkeypatch.setattr(scripts, "create_workflow",
                        lambda **kw: seen.update(kw) or types.SimpleNamespace(run=lambda: None, finalize=lambda: None))
    fire.Fire({"run": scripts.run}, command=cmd[cmd.index("monai.bundle") + 1:])
    for flag, value in {"save_png": False, "n4": False, "progress": False, "skip_existing": True}.items():
        assert seen[flag] is value and as_bool(seen[flag], flag) is value, (flag, seen[flag])
    assert seen["dicom_outputs"] == ["ct", "seg"] and seen["features"] == TINY and seen["num_samples"] == 2
    assert seen["datalist_section"] == "1" and seen["device"] == '$torch.device("cpu")'
    assert [Path(f).name for f in seen["config_file"]] == ["inference.json", "multi_gpu_inference.json"]


# --------------------------------------------------------------------------- stopping a torchrun run stops it all
def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and (_stat(int(d)) or ["", ""])[1] == str(pid)]


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")  # a zombie has stopped; only its exit status is left


def _wait_until(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.2)
    return cond()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl(PR_SET_PDEATHSIG) are Linux")
@pytest.mark.parametrize("how", ["SIGTERM to mtl-med", "SIGKILL to torchrun"])
def test_stopping_a_torchrun_run_stops_its_workers(env, tmp_path, how):
    """`mtl-med predict --nproc 2` (2 gloo workers), each worker held in "initialize" once it is ready (a file
    each, then a sleep): stopping mtl-med, or killing torchrun outright, leaves no worker running. (A Ctrl-C
    reaches mtl-med alone, torchrun having a session of its own, and takes SIGTERM's path: the tests below.)"""
    root, c, opts = env
    marks = tmp_path / "ready"
    marks.mkdir()
    hold = (f'$open(os.path.join({str(marks)!r}, os.environ["RANK"]), "w").close() '
            'or __import__("time").sleep(600) or 0')
    cmd = [sys.executable, "-m", "mtl_med.cli", "predict", c["mr"], "-o", str(tmp_path / "out"), "--nproc", "2",
           *opts, "--set", f"seed={hold}"]
    log = tmp_path / "log.txt"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    mine = [proc.pid]
    try:
        assert _wait_until(lambda: len(list(marks.iterdir())) == 2, 240), log.read_text()[-3000:]
        (launcher,) = _children(proc.pid)
        workers = _children(launcher)
        mine += [launcher, *workers]
        assert len(workers) == 2, workers
        assert os.getsid(launcher) == launcher != os.getsid(proc.pid)  # the terminal's Ctrl-C reaches mtl-med only
        if how == "SIGTERM to mtl-med":
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.kill(launcher, signal.SIGKILL)
        assert _wait_until(lambda: not any(_alive(p) for p in workers), 60), log.read_text()[-3000:]
        sig = signal.SIGTERM if how == "SIGTERM to mtl-med" else signal.SIGKILL
        assert proc.wait(60) == 128 + sig
        assert not _alive(launcher)
    finally:
        for pid in mine:  # only what this test started
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(10)


#: a stand-in for torchrun: records the signal it gets in a file (after writing "ready"), exits 7 on it
FAKE_LAUNCHER = """
import os, signal, sys, time
path = sys.argv[1]
def stop(signum, frame):
    with open(path, "a") as fh:
        fh.write(signal.Signals(signum).name + "\\n")
    time.sleep(0.3)  # a second forwarded signal would be written too
    sys.exit(7)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
with open(path, "w") as fh:
    fh.write(f"ready {os.getpid()} {os.getsid(0)}\\n")
time.sleep(120)
"""


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def _mtl_med_running_the_fake(rec: Path) -> subprocess.Popen:
    """A process that runs :func:`cli.run_launcher` on :data:`FAKE_LAUNCHER`, as `mtl-med --nproc N` runs torchrun;
    it prints whether its own signal handlers are back afterwards and exits with run_launcher's code."""
    code = ("import signal, sys\n"
            "from mtl_med.cli import run_launcher\n"
            "before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]\n"
            f"code = run_launcher([sys.executable, '-c', {FAKE_LAUNCHER!r}, {str(rec)!r}])\n"
            "print(before == [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)])\n"
            "sys.exit(code)\n")
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE, text=True)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_run_launcher_forwards_a_signal_once_and_waits(tmp_path, sig):
    """Ctrl-C (SIGINT, to mtl-med's whole process group, as a terminal sends it) or SIGTERM: the launcher gets it
    once, in a session of its own; mtl-med waits for it to stop, exits with 128 + the signal, and has its own
    handlers back afterwards."""
    rec = tmp_path / "signals.txt"
    proc = _mtl_med_running_the_fake(rec)
    try:
        assert _wait_until(lambda: _lines(rec)[:1] and _lines(rec)[0].startswith("ready"), 30)
        os.killpg(proc.pid, sig)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 128 + sig and out.split() == ["True"]
        ready, *got = _lines(rec)
        assert got == [signal.Signals(sig).name]
        pid, sid = map(int, ready.split()[1:])
        assert pid == sid != proc.pid  # not in mtl-med's session (its own): the terminal's Ctrl-C is not doubled
    finally:
        if proc.poll() is None:
            proc.kill()
        child = int(_lines(rec)[0].split()[1]) if _lines(rec) else None
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux only")
def test_launcher_is_stopped_when_mtl_med_is_killed(tmp_path):
    rec = tmp_path / "signals.txt"
    code = f"import sys; from mtl_med.cli import run_launcher; run_launcher([sys.executable, '-c', {FAKE_LAUNCHER!r}, {str(rec)!r}])"
    parent = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        assert _wait_until(lambda: _lines(rec)[:1] and _lines(rec)[0].startswith("ready"), 30)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        assert _wait_until(lambda: len(_lines(rec)) > 1, 30)
        assert _lines(rec)[1:] == ["SIGTERM"]
    finally:
        if parent.poll() is None:
            parent.kill()
        child = int(_lines(rec)[0].split()[1]) if _lines(rec) else None
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)


def test_version_and_bundle_defaults_in_help(capsys):
    import mtl_med

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"mtl-med {mtl_med.__version__}"
    with pytest.raises(SystemExit):
        cli.main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(bundle default: 50) [config id: num_samples]" in text
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "bundle default:" in capsys.readouterr().out


def test_serve_is_a_job_of_the_command(capsys, monkeypatch):
    import mtl_med.serve

    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--help"])
    assert info.value.code == 0 and "DICOM storage node" in capsys.readouterr().out
    seen = []
    monkeypatch.setattr(mtl_med.serve, "serve_main", lambda args: seen.append(args) or 0)
    assert cli.main(["serve", "--port", "11112", "--destination", "PACS@127.0.0.1:4242", "--work-dir", "node"]) == 0
    assert seen and seen[0].port == 11112
