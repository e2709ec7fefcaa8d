"""``mtl-med``: the common jobs of the pelvis bundle in one command, each a thin layer over the bundle's configs.

    mtl-med predict INPUT -o OUT [--dicom-outputs ct seg rtstruct] [--nproc 2]   # configs/inference.json
    mtl-med evaluate DATALIST -o OUT [--skip-existing]                          # + configs/evaluate.json
    mtl-med train DATALIST [--variant cross_stitch] [--demo]                    # configs/train.json
    mtl-med prepare phantoms --out demo_data --cases 8                          # python -m data_prep.phantoms
    mtl-med serve --port 11112 --ae-title MTLMED --destination PACS@host:4242 --work-dir node  # a DICOM node

Every option sets one config id (``--help`` names it); ``--set ID=VALUE`` sets any other (VALUE as JSON, else
text), exactly as ``python -m monai.bundle run ... --ID VALUE`` would. ``--print-command`` shows that command.
With ``--nproc N`` (N > 1) predict and evaluate run under torchrun with the ``multi_gpu_*.json`` config merged
in: the cases are dealt to the N processes; Ctrl-C or SIGTERM to ``mtl-med`` stops torchrun and its workers.

Mistakes are refused before anything runs, in one line: a value outside an option's choices and a ``--variant``
that is not a file of configs/variants (argparse, exit code 2, the choices listed), an id no config of the job
defines (``--set num_sample=3``: ``did you mean 'num_samples'?``, :mod:`mtl_med.config_ids`, exit code 2).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser", "bundle_command", "variants", "run_launcher"]

PREPARE_TOOLS = {
    "phantoms": "synthetic pelvic MR / CT / label phantoms and their datalist",
    "goldatlas": "convert the Gold Atlas pelvis data set to a datalist",
    "synthrad": "convert the SynthRAD2023 pelvis data set to a datalist",
    "landmarks": "learn the histogram-standardisation landmarks of a datalist",
    "synthetic_scenes": "synthetic dense scenes for the dense vision bundle",
}

#: the values of the enumerated options (mtl_med.inference.posterior.MODES; the DICOM writers of the predictor),
#: refused at parse time with these listed
INFERENCE_MODES = ("sample", "argmax", "relaxed")
DICOM_OUTPUTS = ("ct", "seg", "rtstruct")

# config id -> (option, type, help[, choices]); the option's destination is the id
PREDICT_IDS = {
    "num_samples": ("--num-samples", int, "posterior samples per slice (section 5.2: 50)"),
    "inference_mode": ("--inference-mode", str, "sample: posterior draws; argmax: one deterministic pass; relaxed: "
                       "Gumbel-Softmax draws", INFERENCE_MODES),
    "dicom_outputs": ("--dicom-outputs", None, "for a DICOM MR series: any of ct seg rtstruct", DICOM_OUTPUTS),
    "save_png": ("--save-png", "bool", "write the overview figure (true / false)"),
    "skip_existing": ("--skip-existing", "flag", "skip cases whose complete output set exists (resume)"),
    "num_workers": ("--num-workers", int, "DataLoader processes that read and preprocess the next cases"),
    "n4": ("--n4", "bool", "N4 bias-field correction (true / false)"),
    "seed": ("--seed", int, "seed of the group draws"),
}
COMMON_IDS = {
    "ckpt_path": ("--ckpt", str, "network weights (state dict)"),
    "landmarks_path": ("--landmarks", str, "histogram landmarks JSON"),
    "device": ("--device", str, "cpu, cuda, cuda:1, ..."),
}
TRAIN_IDS = {
    "max_epochs": ("--max-epochs", int, "epochs"),
    "ckpt_dir": ("--ckpt-dir", str, "where model.pt, landmarks.json and checkpoints go"),
    "resume_ckpt": ("--resume", str, "checkpoint_final.pt of an earlier run to continue"),
    "num_workers": ("--num-workers", int, "DataLoader processes"),
    "n4": ("--n4", "bool", "N4 bias-field correction (true / false)"),
    "seed": ("--seed", int, "seed"),
    "device": ("--device", str, "cpu, cuda, ..."),
}


def default_bundle() -> Path:
    """:func:`mtl_med.inference.bundle.default_bundle`; the common case (``$MTL_MED_BUNDLE`` unset, the source
    checkout's bundle beside the package) is found without importing torch, so a refusal such as a wrong
    ``--variant`` comes at once."""
    checkout = Path(__file__).resolve().parents[1] / "bundles" / "sfg_highresnet_pelvis"
    if not os.environ.get("MTL_MED_BUNDLE") and (checkout / "configs" / "inference.json").is_file():
        return checkout
    from mtl_med.inference.bundle import default_bundle as found

    return found()


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def config_defaults(*files: str) -> dict[str, Any]:
    """The bundle's own value of each top-level config id in ``files`` (of its configs folder, merged in order),
    for ``--help``: plain values only (an ``@`` reference or a ``$`` expression is shown as such)."""
    out: dict[str, Any] = {}
    env = os.environ.get("MTL_MED_BUNDLE")  # read as default_bundle would, without importing anything
    cfg = (Path(env) if env else Path(__file__).resolve().parents[1] / "bundles" / "sfg_highresnet_pelvis") / "configs"
    for name in files:
        try:
            out.update(json.loads((cfg / name).read_text()))
        except (OSError, ValueError):
            continue
    return out


def _add_ids(p: argparse.ArgumentParser, ids: dict, defaults: dict[str, Any] | None = None) -> None:
    for cid, (opt, kind, text, *choices) in ids.items():
        shown = (defaults or {}).get(cid)
        default = f" (bundle default: {json.dumps(shown)})" if shown is not None and not isinstance(shown, dict) else ""
        help_ = f"{text}{default} [config id: {cid}]".replace("%", "%%")
        more = {"choices": choices[0], "metavar": "{" + ",".join(choices[0]) + "}"} if choices else {}
        if kind == "flag":
            p.add_argument(opt, dest=cid, action="store_const", const=True, default=None, help=help_)
        elif kind == "bool":
            p.add_argument(opt, dest=cid, type=_bool, default=None, metavar="BOOL", help=help_)
        elif kind is None:
            p.add_argument(opt, dest=cid, nargs="+", default=None, help=help_, **more)
        else:
            p.add_argument(opt, dest=cid, type=kind, default=None, help=help_, **more)


def _add_common(p: argparse.ArgumentParser, ids: dict | None = None, defaults: dict[str, Any] | None = None) -> None:
    p.add_argument("--bundle", type=Path, default=None,
                   help="bundle folder (default: $MTL_MED_BUNDLE or the checkout's bundles/sfg_highresnet_pelvis) "
                        "[config id: bundle_root]")
    p.add_argument("--config", action="append", default=[], metavar="JSON",
                   help="another config merged last (e.g. a variant file); repeatable")
    p.add_argument("--set", action="append", default=[], metavar="ID=VALUE",
                   help="any other config id (VALUE as JSON, else text); repeatable")
    p.add_argument("--print-command", action="store_true",
                   help="print the equivalent python -m monai.bundle command and exit")
    _add_ids(p, ids if ids is not None else COMMON_IDS, defaults)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtl-med", description="The common jobs of the pelvis bundle, each a thin "
                                     "layer over its configs; `mtl-med <job> --help` names the config ids an option sets.")
    from mtl_med import __version__

    parser.add_argument("--version", action="version", version=f"mtl-med {__version__}")
    sub = parser.add_subparsers(dest="job", required=True, metavar="{predict,evaluate,train,prepare,serve}")
    infer, evaluate, train = (config_defaults("inference.json"), config_defaults("inference.json", "evaluate.json"),
                              config_defaults("train.json"))

    p = sub.add_parser("predict", help="synthetic CT, labels and uncertainty for MR volumes (configs/inference.json)",
                       description="Posterior inference of the bundle on a NIfTI file, a folder of NIfTI files "
                                   "and / or DICOM series folders, a DICOM MR series folder, or a datalist JSON.")
    p.add_argument("input", type=Path, help="NIfTI file, folder, DICOM series folder or datalist .json "
                                            "[config ids: input_dir / input_pattern, or datalist]")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder [config id: output_dir]")
    p.add_argument("--section", default=None, help="datalist section (default test) [config id: datalist_section]")
    p.add_argument("--nproc", type=int, default=1, help="processes under torchrun, one per GPU "
                                                        "(configs/multi_gpu_inference.json)")
    _add_ids(p, PREDICT_IDS, infer)
    _add_common(p, defaults=infer)

    e = sub.add_parser("evaluate", help="Table 2 metrics over a datalist section (configs/evaluate.json)",
                       description="Per-case metrics CSV (written as it goes) and a summary JSON.")
    e.add_argument("datalist", type=Path, help="datalist .json with ct and / or label [config id: datalist]")
    e.add_argument("-o", "--output", type=Path, required=True, help="output folder [config id: output_dir]")
    e.add_argument("--section", default=None, help="datalist section (default test) [config id: datalist_section]")
    e.add_argument("--save-outputs", dest="save_outputs", action="store_const", const=True, default=None,
                   help="also write the volumes [config id: save_outputs]")
    e.add_argument("--nproc", type=int, default=1, help="processes under torchrun (configs/multi_gpu_evaluate.json)")
    _add_ids(e, {k: v for k, v in PREDICT_IDS.items() if k not in ("dicom_outputs",)}, evaluate)
    _add_common(e, defaults=evaluate)

    t = sub.add_parser("train", help="train the network (configs/train.json)",
                       description="Training with the bundle's train.json; a variant adds configs/variants/<name>.json.")
    t.add_argument("datalist", type=Path, help="datalist .json with training and validation [config id: datalist]")
    t.add_argument("-o", "--output", type=Path, default=None, help="logs and caches [config id: output_dir]")
    t.add_argument("--variant", default=None, help="sharing variant: a file name in the bundle's configs/variants "
                                                   "without .json (a wrong name lists them)")
    t.add_argument("--demo", action="store_true", help="the demonstration settings (configs/demo.json)")
    t.add_argument("--nproc", type=int, default=1, help="processes under torchrun (configs/multi_gpu_train.json)")
    _add_common(t, TRAIN_IDS, train)

    pr = sub.add_parser("prepare", help="data tools: phantoms, converters, landmarks (python -m data_prep.<tool>)",
                        description="Runs python -m data_prep.<tool> with the remaining arguments; "
                                    "`mtl-med prepare <tool> --help` shows the tool's own options.\n\n" +
                                    "\n".join(f"  {k:17s} {v}" for k, v in PREPARE_TOOLS.items()),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("tool", choices=sorted(PREPARE_TOOLS), help="the data tool")
    pr.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    from mtl_med.serve import add_serve_parser

    add_serve_parser(sub)
    parser.job_parsers = {"predict": p, "evaluate": e, "train": t, "prepare": pr}  # for refusals after parsing
    return parser


def variants(root: Path) -> list[str]:
    """The sharing variants of a bundle: the files in its configs/variants, without .json."""
    return sorted(f.stem for f in (Path(root) / "configs" / "variants").glob("*.json"))


def _check_variant(parser: argparse.ArgumentParser, args: argparse.Namespace, root: Path) -> None:
    """``--variant`` must name a file of the bundle's configs/variants (known only once ``--bundle`` is parsed):
    refused as argparse refuses a bad choice, with the closest name and the list, before anything runs."""
    if args.job != "train" or args.variant is None:
        return
    names = variants(root)
    if args.variant in names:
        return
    close = difflib.get_close_matches(args.variant, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    parser.job_parsers["train"].error(f"argument --variant: invalid choice: {args.variant!r}{hint}; choose from "
                                      f"{', '.join(names) or '(none)'} (the files in {root / 'configs' / 'variants'})")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def overrides_of(args: argparse.Namespace, ids: Sequence[str]) -> dict[str, Any]:
    out = {cid: getattr(args, cid) for cid in ids if getattr(args, cid, None) is not None}
    if out.get("device") is not None:
        out["device"] = f"$torch.device({json.dumps(str(out['device']))})"
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"mtl-med: error: --set needs ID=VALUE, got {item!r}")
        key, _, value = item.partition("=")
        out[key.strip()] = _value(value)
    return out


def job_configs(args: argparse.Namespace, root: Path) -> tuple[list[str], dict[str, Any]]:
    """(config files, config id overrides) of a predict / evaluate / train command line."""
    cfg = root / "configs"
    job, nproc = args.job, int(getattr(args, "nproc", 1) or 1)
    if job == "predict":
        files = ["inference.json"] + (["multi_gpu_inference.json"] if nproc > 1 else [])
        ov = overrides_of(args, [*PREDICT_IDS, *COMMON_IDS])
        src = args.input.expanduser().resolve()
        if src.suffix == ".json" and src.is_file():
            ov["datalist"] = str(src)
            if args.section:
                ov["datalist_section"] = args.section
        else:  # a NIfTI file (exactly that file), a folder or a DICOM series folder
            ov["input_dir"] = str(src)
        ov["output_dir"] = str(args.output.expanduser().resolve())
    elif job == "evaluate":
        files = ["inference.json", "evaluate.json"] + (["multi_gpu_evaluate.json"] if nproc > 1 else [])
        ov = overrides_of(args, [*PREDICT_IDS, *COMMON_IDS, "save_outputs"])
        ov["datalist"] = str(args.datalist.expanduser().resolve())
        ov["output_dir"] = str(args.output.expanduser().resolve())
        if args.section:
            ov["datalist_section"] = args.section
    else:
        files = ["train.json"] + (["demo.json"] if args.demo else []) + (["multi_gpu_train.json"] if nproc > 1 else [])
        if args.variant:
            files.append(f"variants/{args.variant}.json")
        ov = overrides_of(args, list(TRAIN_IDS))
        ov["datalist"] = str(args.datalist.expanduser().resolve())
        if args.output is not None:
            ov["output_dir"] = str(args.output.expanduser().resolve())
    paths = [str(cfg / f) for f in files] + [str(Path(c).expanduser().resolve()) for c in args.config]
    for f in paths:
        if not Path(f).is_file():
            raise SystemExit(f"mtl-med: error: {f}: config file does not exist")
    return paths, ov


def _reads_back(text: str) -> Any:
    """``text`` as ``python -m monai.bundle run`` reads a value: fire parses it as a Python literal, a bare word
    staying text (``False`` is a bool, ``false`` the text 'false', ``[ct, seg]`` a list)."""
    try:
        from fire.parser import DefaultParseValue
    except ImportError:  # without fire: Python literals, as fire reads them
        import ast

        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return text
    return DefaultParseValue(text)


def _literal(value: Any) -> str:
    """A Python literal of a JSON-like value with strings in double quotes (they read well inside the single
    quotes of a shell word)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def command_value(value: Any) -> str:
    """A config value written so that ``python -m monai.bundle run`` reads it back as it is: a Python literal
    (``True``, ``None``, ``["ct", "seg"]``; JSON's ``true`` would arrive as the text 'true', which the bundle
    refuses), a string as it is unless fire would read it as something else (``"1"``, ``"None"``), then quoted."""
    if isinstance(value, str) and _reads_back(value) == value:
        return value
    text = _literal(value)
    return text if _reads_back(text) == value else repr(value)


def bundle_command(files: Sequence[str], root: Path, overrides: dict[str, Any], nproc: int = 1) -> list[str]:
    """The ``python -m monai.bundle run`` command line (under torchrun when ``nproc > 1``); each value as
    :func:`command_value` writes it."""
    # --standalone: a rendezvous on a free local port, so two runs on one machine do not meet on port 29500
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
            if nproc > 1 else [sys.executable])
    cmd = head + ["-m", "monai.bundle", "run", "--config_file", json.dumps(list(files)),
                  "--meta_file", str(root / "configs" / "metadata.json"),
                  "--logging_file", str(root / "configs" / "logging.conf"), "--bundle_root", str(root)]
    for key, value in overrides.items():
        cmd += [f"--{key}", command_value(value)]
    return cmd


def run_launcher(cmd: Sequence[str]) -> int:
    """Run torchrun (``cmd``) and stay its parent until it ends, so that stopping ``mtl-med`` stops the run.

    torchrun starts each worker in a session of its own, so a signal to ``mtl-med``'s process group never
    reaches them, and a torchrun killed outright (``subprocess.call`` kills it on Ctrl-C) leaves them running.
    Here torchrun gets a session of its own too (a Ctrl-C at the terminal reaches ``mtl-med`` only, and is
    passed on once): SIGINT, SIGTERM and SIGHUP are forwarded to it and ``mtl-med`` waits while its agent
    stops the workers (SIGTERM, then SIGKILL after its grace period). On Linux torchrun also gets SIGTERM if
    ``mtl-med`` itself dies (``prctl(PR_SET_PDEATHSIG)``), and the workers get it if torchrun dies
    (:func:`mtl_med.config_ids.end_with_launcher` in the ``multi_gpu_*`` configs). Returns torchrun's exit
    code, or 128 + the signal that stopped the run."""
    from mtl_med.config_ids import launcher_preexec

    proc = subprocess.Popen(list(cmd), start_new_session=True, preexec_fn=launcher_preexec())
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        try:
            proc.send_signal(signum)  # nothing once torchrun has ended
        except ProcessLookupError:
            pass

    sigs = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]
    previous = {s: signal.signal(s, forward) for s in sigs}
    try:
        code = proc.wait()  # resumed after each forwarded signal
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        return 128 + received[0]
    return code if code >= 0 else 128 - code


def console() -> int:
    """The ``mtl-med`` command: the OpenMP wait policy and the allocator setting (:mod:`mtl_med.runtime`) act
    only from the environment a process starts with, so it re-executes itself once with them (its child jobs
    inherit them), then runs :func:`main`."""
    from mtl_med.runtime import reexec_tuned

    reexec_tuned(["-m", "mtl_med.cli", *sys.argv[1:]])
    return main()


def main(argv: Sequence[str] | None = None) -> int:
    # libgomp reads the wait policy when torch loads it: in the environment before anything here imports torch
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.job == "prepare":
        rest = [a for a in args.args if a != "--"] if args.args[:1] == ["--"] else list(args.args)
        return subprocess.call([sys.executable, "-m", f"data_prep.{args.tool}", *rest])
    if args.job == "serve":  # a long-running DICOM node (mtl_med.serve), not one bundle run
        from mtl_med.serve import serve_main

        return serve_main(args)
    root = (args.bundle.expanduser().resolve() if args.bundle is not None else default_bundle())
    _check_variant(parser, args, root)
    files, overrides = job_configs(args, root)
    from mtl_med.config_ids import check_ids
    from mtl_med.errors import ConfigError, user_error

    meta = root / "configs" / "metadata.json"
    try:  # a misspelt id (--set num_sample=3) would be added and change nothing: refused before anything runs
        check_ids(overrides, files, str(meta) if meta.is_file() else None)
    except ConfigError as err:
        sys.stderr.write(f"mtl-med: error: {err}\n")
        return 2
    nproc = int(getattr(args, "nproc", 1) or 1)
    cmd = bundle_command(files, root, overrides, nproc)
    if args.print_command:
        print(shlex.join(cmd))
        return 0
    if nproc > 1:
        return run_launcher(cmd)
    from monai.bundle import run

    log = root / "configs" / "logging.conf"
    try:
        run(config_file=files, meta_file=str(root / "configs" / "metadata.json"),
            logging_file=str(log) if log.is_file() else False, bundle_root=str(root), **overrides)
    except Exception as err:  # a user error in one line, as the bundle commands report it
        found = user_error(err)
        if found is None:
            raise
        sys.stderr.write(f"error: {found}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(console())
