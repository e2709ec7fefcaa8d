"""Every shell command of the three bundle READMEs (their ```bash blocks) runs as written, at a tiny size.

Each bundle's commands run in order (a training command makes the checkpoint that the next one evaluates) in a
copy of the repository's bundles and data_prep under a temporary folder, so nothing is written into the checkout:
paths in /tmp/ and the schema's relative path are mapped into that folder, documented sizes (epochs, images,
cases) are replaced by tiny ones (RULES: the first rule whose pattern matches a command decides), and a command
that no rule names fails the test, so a new README command must be placed here. Skipped, with the reason:
benchmark harnesses (their own tests run them at small sizes) and the commands RULES lists as not run.
About 2.5 minutes on a 2-core CPU (vision 66 s, pelvis 41 s, dense 37 s), hence ``slow``."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
BUNDLES = ["vision_multitask", "dense_multitask", "sfg_highresnet_pelvis"]

VISION_TINY = {"--image_size": "16", "--max_epochs": "1", "--epoch_length": "2", "--val_epoch_length": "1",
               "--val_interval": "1", "--batch_size": "16"}
DENSE_TINY = {"--max_epochs": "1", "--epoch_length": "1", "--val_epoch_length": "1", "--width": "0.125",
              "--head_hidden": "8", "--batch_size": "2", "--val_batch_size": "2"}
EVAL_ONLY = ("--max_epochs", "--epoch_length", "--val_interval", "--batch_size")  # ids a train run alone takes

# (pattern, action): action is a dict of "set" (--id value, replacing the command's own), "cwd" ("bundle" or "repo")
# or a str: the reason the command is not run
RULES: dict[str, list[tuple[str, object]]] = {
    "vision_multitask": [
        (r"benchmarks/", "benchmark harness: every method to convergence over seeds (tests/test_benchmarks* run it small)"),
        (r"configs/affinity\.json", {"set": {**VISION_TINY, "--affinity_images": "16",
                                             "--dataset_kwargs": "{'digits':[3,8]}"}}),
        (r"variants/branched\.json", {"set": {**VISION_TINY, "--dataset_kwargs": "{'digits':[3,8]}"}}),
        (r"early_stopping\.json", {"set": {**VISION_TINY, "--max_epochs": "2", "--patience": "1"}}),
        (r"monai\.bundle run", {"set": VISION_TINY}),
        (r"monai\.bundle (verify_metadata|verify_net_in_out)", {}),
        (r"monai\.bundle ckpt_export", {"set": {"--image_size": "16"}}),
        (r"^(mkdir|python -c)", {}),
    ],
    "dense_multitask": [
        (r"benchmarks/|--out (test_)?scenes ", "benchmark harness and its data: every variant over seeds "
                                             "(tests/test_dense_benchmark.py runs it on a miniature set)"),
        (r"data_prep\.synthetic_scenes", {"cwd": "repo", "set": {"--n": "4", "--val": "4", "--size": "16 16"}}),
        (r"variants/adashare\.json", {"set": {**DENSE_TINY, "--warmup_epochs": "1", "--policy_epochs": "1"}}),
        (r"configs/affinity\.json", {"set": {**DENSE_TINY, "--affinity_images": "4"}}),
        (r"monai\.bundle run", {"set": DENSE_TINY}),
        (r"monai\.bundle (verify_metadata|verify_net_in_out)", {}),
        (r"monai\.bundle ckpt_export", {"set": {"--width": "0.125", "--head_hidden": "8"}}),
        (r"^python -c", {}),
    ],
    "sfg_highresnet_pelvis": [
        (r"monai\.bundle (verify_metadata|verify_net_in_out|ckpt_export)", {"cwd": "repo"}),
        (r"run onnx_export", {"cwd": "repo", "needs": "onnx"}),
        # (--overwrite: one copy holds every section's phantom folders, as a user's checkout would)
        (r"data_prep\.phantoms", {"cwd": "repo", "set": {"--cases": "3", "--preset": "small", "--shape": "32 32 8",
                                                         "--quiet": "", "--overwrite": ""}}),
        (r"write_mr_series", {"cwd": "repo"}),
        (r"^torchrun|multi_gpu", "two processes over a cohort (tests/bundles/test_multi_gpu_inference.py and "
                                 "test_pelvis_train.py run them on phantoms)"),
        (r"variants/branched|configs/affinity", "needs the affinity stage and training first "
                                                "(tests/bundles/test_pelvis_branched.py runs both on phantoms)"),
        (r"configs/inference\.json", {"cwd": "repo", "set": {"--num_samples": "2", "--n4": "False"}}),
        (r"^mtl-med predict --help$", {"cwd": "repo"}),
        (r"benchmarks/", "benchmark harness: training to a plateau and a 50-sample held-out evaluation "
                         "(tests/test_flagship_training.py checks its bookkeeping)"),
        (r".", "not made tiny here: training on phantoms and the mtl-med command line over a 20-case cohort "
               "(tests/bundles/test_pelvis_train.py and tests/test_cli.py run these paths on small phantoms)"),
    ],
}


def readme_commands(bundle: str) -> list[str]:
    """The commands of the ```bash blocks of ``bundle``'s README: continuation lines joined, comments and blank
    lines dropped, a ``for ... done`` loop kept as one command."""
    text = (REPO / "bundles" / bundle / "docs" / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines = block.replace("\\\n", " ").splitlines()
        loop: list[str] = []
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if loop or line.startswith("for "):
                loop.append(line)
                if line.startswith("done"):
                    out.append("\n".join(loop))
                    loop = []
                continue
            out.append(re.sub(r"\s+#\s.*$", "", line))  # a trailing comment
    return out


def _rule(bundle: str, cmd: str):
    for pattern, action in RULES[bundle]:
        if re.search(pattern, cmd):
            return action
    raise AssertionError(f"{bundle} README command without a rule in {__file__}: {cmd}")


def _tiny(cmd: str, values: dict[str, str], evaluate: bool) -> str:
    """``cmd`` with each ``--id`` of ``values`` set to the tiny value (replaced where the command gives it)."""
    words = shlex.split(cmd)
    for key, value in values.items():
        if evaluate and key in EVAL_ONLY:
            continue
        if key in words:
            i = words.index(key)
            j = i + 1
            while j < len(words) and not words[j].startswith("--"):
                j += 1
            words[i + 1:j] = value.split()
        else:
            words += [key, *value.split()]
    return shlex.join(words)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    for bundle in BUNDLES:
        shutil.copytree(REPO / "bundles" / bundle, root / "bundles" / bundle,
                        ignore=shutil.ignore_patterns("runs", "eval", "data", "affinity"))
    shutil.copytree(REPO / "data_prep", root / "data_prep", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "demo").mkdir()
    (root / "schema").mkdir()
    shutil.copy(SCHEMA, root / "schema" / SCHEMA.name)
    return root


# One interpreter imports torch, MONAI and mtl_med once and forks a child per "python -m <module> ..." command
# (the child runs the module as `python -m` would, in the command's folder, its output in a log file): the
# imports cost each command several seconds otherwise. Commands with shell syntax or torchrun run under bash.
_RUNNER = r"""
import json, os, runpy, sys
import torch, monai, monai.bundle, mtl_med, mtl_med.engines, mtl_med.inference, mtl_med.transforms
print(json.dumps("ready"), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(job["cwd"])
            fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.path.insert(0, job["cwd"])
            sys.argv = [job["module"], *job["args"]]
            try:
                runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                import traceback
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])), flush=True)
"""
_FORKED = ("monai.bundle", "data_prep.synthetic_scenes", "data_prep.phantoms")


def _run_all(bundle: str, root: Path) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{root}{os.pathsep}{REPO}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    runner = subprocess.Popen([sys.executable, "-c", _RUNNER], cwd=root, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert runner.stdout.readline().strip() == '"ready"'
    try:
        return _run_commands(bundle, root, tmp, env, runner)
    finally:
        runner.stdin.close()
        runner.wait(timeout=60)


def _run_commands(bundle, root, tmp, env, runner) -> list[str]:
    ran, failures = [], []
    for cmd in readme_commands(bundle):
        action = _rule(bundle, cmd)
        if isinstance(action, str):
            continue
        if action.get("needs") and not __import__("importlib").util.find_spec(action["needs"]):
            continue
        run = cmd.replace("/tmp/", f"{tmp}/")
        run = re.sub(r"(\.\./)+shared/schemas/", f"{root}/schema/", run)
        run = run.replace(f"bundles/{bundle}/", f"{root}/bundles/{bundle}/")
        if action.get("set"):
            evaluate = bool(re.search(r"(evaluate|inference)\.json", run))
            run = _tiny(run, action["set"], evaluate)
        cwd = root if action.get("cwd") == "repo" else root / "bundles" / bundle
        words = shlex.split(run) if "\n" not in run else []
        plain = not any(w in ("&&", "||", "|", ";", "&") or w.startswith((">", "<")) for w in words)
        if plain and words[:2] == ["python", "-m"] and words[2] in _FORKED:
            log = tmp / f"command{len(ran)}.log"
            runner.stdin.write(json.dumps({"cwd": str(cwd), "module": words[2], "args": words[3:],
                                           "log": str(log)}) + "\n")
            runner.stdin.flush()
            code, text = int(json.loads(runner.stdout.readline())), log.read_text(errors="replace")
        else:
            run = re.sub(r"^python ", f"{shlex.quote(sys.executable)} ", run)
            run = run.replace("torchrun ", f"{shlex.quote(sys.executable)} -m torch.distributed.run ")
            out = subprocess.run(["bash", "-c", run], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
            code, text = out.returncode, out.stdout + out.stderr
        ran.append(cmd)
        if code:
            errors = [line for line in text.splitlines() if "rror" in line or "xception" in line]
            failures.append(f"{cmd}\n  ran: {run}\n  exit {code}: " + "\n".join(errors)[-2000:])
    assert ran, f"no {bundle} README command ran"
    return failures


def test_every_readme_command_has_a_rule():
    for bundle in BUNDLES:
        for cmd in readme_commands(bundle):
            _rule(bundle, cmd)
    assert any("verify_metadata" in c for c in readme_commands("dense_multitask"))


# what the commands leave (under the copy's root): the last step of each chain (train -> evaluate / infer / export)
EXPECTED = {
    "vision_multitask": ["tmp/vb_cli/my_digits.csv", "tmp/vb_cli/tr_sigma0.4/model.ts",
                         "tmp/vb_cli/tr_sigma0.4/eval/summary.json", "bundles/vision_multitask/affinity/tree.json"],
    "dense_multitask": ["bundles/dense_multitask/runs/hard/eval/metrics.json", "bundles/dense_multitask/runs/hard/model.ts",
                        "bundles/dense_multitask/runs/hard/mine/predictions/seg/room0.npy",
                        "bundles/dense_multitask/runs/adashare/models/model.pt"],
    "sfg_highresnet_pelvis": ["demo/model.ts", "demo/pelvis_out", "demo/pelvis_out_dicom", "demo/pelvis_eval"],
}


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_readme_commands_run(bundle, workdir):
    failures = _run_all(bundle, workdir)
    assert not failures, "\n\n".join(failures)
    missing = [p for p in EXPECTED[bundle] if not (workdir / p).exists()]
    assert not missing, missing
    if bundle == "vision_multitask":
        rows = (workdir / EXPECTED[bundle][0]).read_text().splitlines()
        assert [r.split(",")[0] for r in rows[1:]] == [f"digit{i}" for i in range(5)]
