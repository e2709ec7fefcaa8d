"""Config ids a run may override (mtl_med.config_ids): a misspelt id is refused with the closest known one, in
process and through MONAI's own entry points (create_workflow / run, fire's parsing of the command line);
every bundle's config sets pass the check they run first in "initialize"; the torchrun worker's tie to its
launcher. Parse-level only: the one subprocess for the bundle command line is in tests/bundles/test_cli_errors.py,
the signal tests in tests/test_cli.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mtl_med.config_ids import check_ids, config_ids
from mtl_med.errors import ConfigError, user_error

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
PELVIS = BUNDLES / "sfg_highresnet_pelvis" / "configs"
INFERENCE = [str(PELVIS / "inference.json"), str(PELVIS / "multi_gpu_inference.json")]
TRAIN = [str(PELVIS / "train.json"), str(PELVIS / "demo.json")]
META = str(PELVIS / "metadata.json")


def refusal(overrides, files=INFERENCE) -> str:
    with pytest.raises(ConfigError) as info:
        check_ids(overrides, files, META)
    return str(info.value)


# ------------------------------------------------------------------------------------------------- check_ids
@pytest.mark.parametrize("key, files, suggestion", [
    ("num_sample", INFERENCE, "num_samples"),                          # a top-level id
    ("network_export_def::mod", INFERENCE, "network_export_def::mode"),  # a sibling in a component
    ("network_export_def#mod", INFERENCE, "network_export_def#mode"),    # in the legacy spelling the user wrote
    ("inferer::roi_size", INFERENCE, "roi_size"),                      # an expression has no ids under it
    ("optimizer::weight_decy", TRAIN, "optimizer::weight_decay"),       # a keyword of the component's target
    ("train::dataloader::pin_memry", TRAIN, "train::dataloader::pin_memory"),  # ... of its base class
])
def test_unknown_id_is_refused_with_the_closest_known_id(key, files, suggestion):
    msg = refusal({key: 3}, files)
    assert msg == f"{key}: unknown config id; did you mean {suggestion!r}?"


def test_every_unknown_id_is_named_in_one_line():
    msg = refusal({"num_samples": 2, "num_sample": 3, "seeed": 1, "zzzzqq": 0})
    assert msg.startswith("num_sample: unknown config id; did you mean 'num_samples'?"), msg
    assert "'seeed' (did you mean 'seed'?)" in msg and "'zzzzqq'" in msg and "\n" not in msg


def test_an_id_close_to_nothing_names_the_config_files():
    assert refusal({"zzzzqq": 0}) == ("zzzzqq: unknown config id (none of inference.json, multi_gpu_inference.json "
                                      "defines it)")


@pytest.mark.parametrize("key, files", [
    ("network_export_def::mode", INFERENCE),         # a nested id
    ("network_export_def#mode", INFERENCE),          # legacy separator
    ("network_def::features", INFERENCE),            # network_def's arguments (monai.bundle.load's net_override)
    ("roi_size_3d::2", INFERENCE),                   # a list index
    ("_meta_::version", INFERENCE),                  # metadata
    ("bundle_root", INFERENCE),                      # set at run time, by every bundle command
    ("dist_backend", INFERENCE),                     # from the second file
    ("optimizer::weight_decay", TRAIN),              # a keyword torch.optim.Adam takes, left at its default
    ("train::dataloader::pin_memory", TRAIN),        # MONAI's DataLoader passes it to torch's
    ("optimizer::_disabled_", TRAIN),                # MONAI's reserved keys of a component
    ("validate#evaluator#postprocessing", TRAIN),
])
def test_known_ids_are_accepted(key, files):
    check_ids({key: 1}, files, META)


def test_ids_of_an_earlier_override_value_are_known_to_a_later_one():
    check_ids({"network_export_def": {"_target_": "dict", "extra": 1}, "network_export_def::extra": 2}, INFERENCE)
    with pytest.raises(ConfigError, match=r"^network_export_def::extra: unknown config id"):
        check_ids({"network_export_def::extra": 2}, INFERENCE)


def test_config_ids_are_nested_with_the_monai_separator():
    assert config_ids({"a": {"b": [1, {"c": 2}]}, "d": 3}) == {"a", "a::b", "a::b::0", "a::b::1", "a::b::1::c", "d"}


# --------------------------------------------------------------------------------- through MONAI's entry points
def _sets(bundle: str) -> list[list[str]]:
    """The config sets the bundle's docs and mtl-med run (a variant over train.json each)."""
    cfg = BUNDLES / bundle / "configs"
    if bundle == "sfg_highresnet_pelvis":
        sets = [["inference.json"], ["inference.json", "demo.json"], ["inference.json", "evaluate.json"],
                ["inference.json", "multi_gpu_inference.json"],
                ["inference.json", "evaluate.json", "multi_gpu_evaluate.json"],
                ["train.json"], ["train.json", "demo.json"], ["train.json", "multi_gpu_train.json"],
                ["train.json", "affinity.json"]]
    else:
        sets = [["train.json"]] + [["train.json", f] for f in
                                   ("inference.json", "evaluate.json", "multi_gpu_train.json", "affinity.json",
                                    "early_stopping.json")]
    sets += [["train.json", f"variants/{v.name}"] for v in sorted((cfg / "variants").glob("*.json"))]
    return [[str(cfg / f) for f in s] for s in sets]


CONFIG_SETS = [(b, s) for b in ("sfg_highresnet_pelvis", "vision_multitask", "dense_multitask") for s in _sets(b)]


def _initialize(files: list[str]) -> list[str]:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(files)
    return parser["initialize"]


@pytest.mark.parametrize("bundle, files", CONFIG_SETS,
                         ids=[f"{b.split('_')[0]}:{'+'.join(Path(f).stem for f in s)}" for b, s in CONFIG_SETS])
def test_every_config_set_runs_the_check_first_and_passes_it(bundle, files):
    """The merged "initialize" of each set starts with the excepthook and the check (and, for torchrun, the tie
    to the launcher); the check, run by MONAI's create_workflow as `monai.bundle run` runs it (init_id: that item
    alone), passes with the ids the commands set and refuses a misspelt one."""
    from monai.bundle.scripts import create_workflow

    init = _initialize(files)
    assert init[:3] == ["$import mtl_med.config_ids", "$mtl_med.errors.install_excepthook()",
                        "$mtl_med.config_ids.check_overrides()"], init[:4]
    assert ("$mtl_med.config_ids.end_with_launcher()" in init) == any("multi_gpu" in f for f in files)
    root = str(BUNDLES / bundle)
    kw = dict(config_file=files, meta_file=str(Path(root) / "configs" / "metadata.json"), logging_file=False,
              init_id="initialize::2", bundle_root=root, workflow_type=None)
    create_workflow(**kw)
    create_workflow(**kw, output_dir="out", seed=1)
    with pytest.raises(Exception) as info:
        create_workflow(**kw, seeed=1)
    err = user_error(info.value)
    assert isinstance(err, ConfigError) and str(err) == "seeed: unknown config id; did you mean 'seed'?", info.value


def _fire_run(*argv: str) -> None:
    """``python -m monai.bundle run ARGV`` as fire parses it, running only the check (the run and finalize ids
    name the check too)."""
    import fire
    from monai.bundle import scripts

    fire.Fire({"run": scripts.run}, command=["run", "--config_file", json.dumps(INFERENCE), "--meta_file", META,
                                             "--logging_file", "False", "--init_id", "initialize::2",
                                             "--run_id", "initialize::2", "--final_id", "initialize::2", *argv])


@pytest.mark.parametrize("argv", [("--num-samples", "3"), ("--num_samples=3",), ("--network_export_def#mode", "x"),
                                  ("--bundle_root", "."), ("--workflow_type", "infer")])
def test_fire_command_line_ids_are_accepted(argv):
    _fire_run(*argv)


@pytest.mark.parametrize("argv, bad", [(("--num-sample", "3"), "num_sample"), (("--num_sample=3",), "num_sample"),
                                       (("--network_export_def::mod", "x"), "network_export_def::mod")])
def test_fire_command_line_typos_are_refused(argv, bad):
    with pytest.raises(Exception) as info:
        _fire_run(*argv)
    err = user_error(info.value)
    assert isinstance(err, ConfigError) and err.path == bad and "did you mean" in str(err), info.value


def test_ids_from_an_args_file_are_checked(tmp_path):
    from monai.bundle.scripts import create_workflow

    args = tmp_path / "args.json"
    args.write_text(json.dumps({"config_file": INFERENCE, "meta_file": META, "num_sample": 3}))
    with pytest.raises(Exception) as info:
        create_workflow(args_file=str(args), logging_file=False, init_id="initialize::2")
    assert str(user_error(info.value)) == "num_sample: unknown config id; did you mean 'num_samples'?"


def test_a_parser_built_in_python_is_not_checked():
    """No monai.bundle run on the stack (e.g. mtl_med.inference.bundle_parser): the program chose its ids."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser["num_sample"] = 3
    parser.get_parsed_content("initialize::2")


# ------------------------------------------------------------------------------------------ torchrun workers
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux only")
@pytest.mark.parametrize("under_torchrun, expected", [(True, 15), (False, 0)])
def test_a_torchrun_worker_asks_for_sigterm_when_its_launcher_dies(under_torchrun, expected):
    code = ("import ctypes, os\n"
            "from mtl_med.config_ids import end_with_launcher\n"
            "end_with_launcher()\n"
            "sig = ctypes.c_int(-1)\n"
            "ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)\n"  # PR_GET_PDEATHSIG
            "print(sig.value)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TORCHELASTIC_RUN_ID"}
    if under_torchrun:
        env["TORCHELASTIC_RUN_ID"] = "test"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == [str(expected)], out.stderr


def test_ids_an_experiment_tracking_setting_adds_are_known():
    """`--tracking mlflow` adds ids such as experiment_name to the config; a run may set them."""
    from mtl_med.config_ids import _tracking_ids

    extra = _tracking_ids("mlflow")
    assert {"experiment_name", "run_name", "tracking_uri"} <= extra
    check_ids({"experiment_name": "x"}, INFERENCE, META, extra=extra)
    with pytest.raises(ConfigError, match="did you mean 'experiment_name'"):
        check_ids({"experiment_nam": "x"}, INFERENCE, META, extra=extra)
