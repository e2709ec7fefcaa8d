"""Sharing methods on the digits default of the vision bundle: test accuracy and training cost.

Trains every method to convergence through the bundle's own configs (bundles/vision_multitask:
train.json + the variant + early_stopping.json, then evaluate.json on the test split) for several
seeds. Training stops when the validation mean accuracy has not improved for ``--patience`` epochs
(or at ``--max_epochs``) and the best validation checkpoint is tested. Every method runs under each
test-time batch-norm protocol of ``--bn_protocols`` (``population``: running averages, ``batch``:
the test batch's statistics, as the SFG, Task Routing and AdaShare code bases test), the protocol
used for validation too, so one protocol holds for all methods in a table. Two single-task
baselines: ``single_task`` (the SFG paper's: one network whose kernels are split among the tasks,
equal total width) and ``single_task_full`` (the Task Routing and AdaShare papers': one full
network per task). AdaShare needs residual blocks, so it runs on ResNet-18 and
``hard_sharing_resnet18`` is its same-backbone reference. Prints, per method, the mean
test accuracy over the ten one-vs-all tasks (mean and sample std over seeds), delta-m against the
single-task baseline of the same seed (Vandenhende et al., eq. 1), the epochs run and the epoch of
the best validation score, and the training time (CPU seconds of this process, so other load on
the machine does not distort it) relative to hard sharing. A benchmark prints; it never asserts.

    python benchmarks/vision_digits.py                     # the settings the bundle README reports
    python benchmarks/vision_digits.py --seeds 0 --max_epochs 2 --methods hard_sharing tr_sigma0.4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "vision_multitask"
METHODS = ("single_task", "single_task_full", "hard_sharing", "cross_stitch", "tr_sigma0.2", "tr_sigma0.4", "tr_sigma0.8",
           "tr_knockout0.5", "sfg", "adashare", "hard_sharing_resnet18")
#: methods that are a plain sharing method on a backbone rather than a variant file: (backbone, sharing)
PLAIN = {"single_task_full": ("vgg11_bn", "single_task"), "hard_sharing_resnet18": ("resnet18", "hard_sharing")}
#: any sharing ratio of Task Routing: ``tr_sigma<s>`` (the paper's text: a fraction ``s`` of the units shared)
#: and ``tr_knockout<s>`` (the authors' code: each task knocks out a fraction ``s`` of its own draw)
TR_SWEEP = re.compile(r"^tr_(sigma|knockout)(\d*\.?\d+)$")


def method(name: str) -> str:
    if name in METHODS or TR_SWEEP.match(name):
        if TR_SWEEP.match(name) and not 0 <= float(TR_SWEEP.match(name).group(2)) <= 1:
            raise argparse.ArgumentTypeError(f"{name}: sigma must be in [0, 1]")
        return name
    raise argparse.ArgumentTypeError(f"unknown method {name!r}; expected one of {METHODS} or tr_sigma<s> / tr_knockout<s> with s in [0, 1]")


def run_bundle(configs: list[str], bundle_root: str | os.PathLike, **overrides) -> dict:
    """One ``monai.bundle`` workflow in this process (as ``python -m monai.bundle run`` would);
    returns the epochs the trainer ran and the epoch of its best validation score."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / c) for c in configs],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        bundle_root=str(bundle_root),
        **overrides,
    )
    wf.initialize()
    try:
        wf.run()
        if "evaluate.json" in configs:
            return {}
        trainer, evaluator = (wf.parser.get_parsed_content(k) for k in ("train#trainer", "validate#evaluator"))
        return {"epochs": trainer.state.epoch, "best_epoch": evaluator.state.best_metric_epoch}
    finally:
        wf.finalize()


def main() -> None:
    from records import add_record_arguments, run_config, tagged, write_record

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), type=method, help=f"of {METHODS}, or any tr_sigma<s> / tr_knockout<s> (the sigma curve)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max_epochs", type=int, default=300, help="cap on the epochs of the all-task methods (and of AdaShare's re-training)")
    p.add_argument("--patience", type=int, default=20, help="stop after this many epochs without a better validation mean accuracy")
    p.add_argument("--tr_epoch_factor", type=int, default=5, help="TR trains one task per mini-batch (alg. 1): cap and patience are this many times larger")
    p.add_argument("--warmup_epochs", type=int, default=None, help="AdaShare warm-up epochs (default: the variant's)")
    p.add_argument("--policy_epochs", type=int, default=None, help="AdaShare policy epochs (default: the variant's)")
    p.add_argument("--dataset", default="digits", choices=["digits", "placed_digits"],
                   help="placed_digits: the digits at a random place of a 16x16 canvas, with --tasks mixing where and what")
    p.add_argument("--tasks", nargs="+", default=None, help="placed_digits' tasks (binary ones: left top odd large)")
    p.add_argument("--image_size", type=int, default=16)
    p.add_argument("--width", type=float, default=0.15625, help="VGG width multiplier (10 first-layer kernels: one per task for single-task)")
    p.add_argument("--adashare_width", type=float, default=0.125)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--bn_protocols", nargs="+", default=["population", "batch"], choices=["population", "batch"],
                   help="test-time batch-norm statistics, each a full set of runs (validation uses it too)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable CPU-time measurements)")
    p.add_argument("--workdir", default=None, help="where runs are written (default: a temporary folder)")
    add_record_arguments(p)
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="print the table of earlier --json files (e.g. one process per seed) and exit")
    p.add_argument("--figure", default=None, help="with --merge: draw the Task Routing sigma curve of both conventions to this PNG")
    args = p.parse_args()
    check_data(p, args)
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        results: dict[str, dict] = {}
        for r in runs:
            for m, by_seed in r["results"].items():
                results.setdefault(m, {}).update(by_seed)
        print_table(results, argparse.Namespace(**{**runs[0]["args"], "seeds": sorted({s for r in runs for s in r["args"]["seeds"]})}))
        if args.figure:
            sigma_figure(results, args.figure, describe(argparse.Namespace(**runs[0]["args"])))
        return
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)  # the bundle logs every iteration; keep the table readable
    root = Path(args.workdir or tempfile.mkdtemp(prefix="vision_digits_"))
    methods = list(args.methods)
    if "single_task" not in methods:
        methods.insert(0, "single_task")  # delta-m needs the baseline

    results: dict[str, dict] = {}
    for bn in args.bn_protocols:
        for seed in args.seeds:
            for m in methods:
                r = results.setdefault(f"{m} [{bn}]", {})[seed] = train_and_test(m, seed, bn, root / bn, args)
                if args.record:
                    write_record("vision_digits", tagged(args, f"{m}_{bn}_seed{seed}"), config=run_config(args, method=m, bn_inference=bn),
                                 seed=seed, metrics={k: v for k, v in r.items() if k not in ("cpu_s", "wall_s")},
                                 timings={k: r[k] for k in ("cpu_s", "wall_s") if k in r})
    print_table(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


def data_overrides(args: argparse.Namespace) -> dict:
    """The bundle's ``dataset`` and ``dataset_kwargs`` for ``--dataset`` / ``--tasks``."""
    if getattr(args, "dataset", "digits") == "digits":
        return {}
    return {"dataset": args.dataset, "dataset_kwargs": {"tasks": args.tasks} if args.tasks else {}}


def check_data(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One line, before anything runs, for ``--tasks`` the data does not have."""
    if args.tasks and args.dataset == "digits":
        p.error("--tasks picks placed_digits' tasks: add --dataset placed_digits")
    if args.dataset == "placed_digits" and not getattr(args, "merge", None):
        from mtl_med.data.vision import load_placed_digits

        try:
            load_placed_digits("val", tasks=args.tasks or ("column", "odd"))
        except ValueError as e:
            p.error(str(e))


def describe(args: argparse.Namespace) -> str:
    if getattr(args, "dataset", "digits") == "digits":
        return "Digits, 10 one-vs-all tasks"
    return f"Placed digits, tasks {' '.join(args.tasks or ['column', 'odd'])}"


def train_and_test(m: str, seed: int, bn: str, root: Path, args: argparse.Namespace) -> dict:
    """One method and seed under one batch-norm protocol: train with early stopping, test the best checkpoint."""
    run_dir = root / f"{m}_seed{seed}"
    configs = ["train.json"] if m in PLAIN else ["train.json", f"variants/{m}.json"]
    common = dict(seed=seed, image_size=args.image_size, batch_size=args.batch_size, bn_inference=bn, **data_overrides(args))
    sweep = TR_SWEEP.match(m)
    if sweep:  # the shipped variant of the convention, at this sigma
        configs[1] = "variants/" + ("tr_sigma0.4.json" if sweep.group(1) == "sigma" else "tr_knockout0.5.json")
        common.update(sigma=float(sweep.group(2)), variant=m)
    if m in PLAIN:
        common.update(backbone=PLAIN[m][0], sharing=PLAIN[m][1], variant=m)
    common["width"] = args.adashare_width if m in ("adashare", "hard_sharing_resnet18") else args.width
    factor = args.tr_epoch_factor if m.startswith("tr_") else 1
    train = dict(common, max_epochs=args.max_epochs * factor, patience=args.patience * factor)
    if m == "adashare":
        train.update({k: v for k, v in (("warmup_epochs", args.warmup_epochs), ("policy_epochs", args.policy_epochs)) if v is not None})
    cpu0, wall0 = time.process_time(), time.perf_counter()
    epochs = run_bundle(configs + ["early_stopping.json"], run_dir, **train)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    baseline = root / f"single_task_seed{seed}" / "eval" / "summary.json"
    run_bundle(configs + ["evaluate.json"], run_dir, baseline_file=str(baseline) if m != "single_task" else None, **common)
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    dm = (summary.get("delta_m") or {}).get("of_mean", 0.0) if m != "single_task" else 0.0
    print(f"{m:14s} [{bn}] seed {seed}: accuracy {summary['mean_accuracy']:.4f}  delta_m {100 * dm:+.2f}%  "
          f"{epochs['epochs']} epochs (best {epochs['best_epoch']})  {cpu:.1f} CPU-s ({wall:.1f} s wall)", flush=True)
    return {"accuracy": summary["mean_accuracy"], "delta_m": dm, "cpu_s": cpu, "wall_s": wall, **epochs}


def sigma_figure(results: dict[str, dict], path: str, title: str = "digits") -> None:
    """Accuracy against sigma for the paper's convention (a fraction sigma of the units shared, the rest
    split among the tasks) and 1 - sigma for the authors' knockout convention, so that 1 is every unit
    shared (hard sharing trained one task per mini-batch) in both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for kind, label in (("sigma", "paper's text: fraction sigma shared"), ("knockout", "authors' code: each task knocks out sigma")):
        pts = []
        for name, by_seed in results.items():
            m = TR_SWEEP.match(name.split(" ")[0])
            if m and m.group(1) == kind:
                acc = 100 * np.array([r["accuracy"] for r in by_seed.values()])
                pts.append((float(m.group(2)), acc.mean(), acc.std(ddof=1) if len(acc) > 1 else 0.0))
        if pts:
            x, y, e = map(np.array, zip(*sorted(pts)))
            ax.errorbar(x if kind == "sigma" else 1 - x, y, yerr=e, marker="o", capsize=3, label=label)
    ax.set_xlabel("sigma (paper) / 1 - sigma (knockout): 1 = every unit shared")
    ax.set_ylabel("mean test accuracy (%)")
    ax.set_title(f"Task Routing: {title}\n(mean ± std over seeds)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"figure: {path}")


def print_table(results: dict[str, dict], args: argparse.Namespace) -> None:
    """The Markdown table of the bundle README: one row per method, statistics over seeds."""
    refs = [r["cpu_s"] for k, v in results.items() if k.startswith("hard_sharing [") for r in v.values()]
    ref = np.mean(refs) if refs else float("nan")
    print(f"\n{describe(args)}; {len(args.seeds)} seeds; image {args.image_size}x{args.image_size}; VGG-11 width x{args.width}, "
          f"ResNet-18 width x{args.adashare_width}; early stopping: patience {args.patience} epochs, cap {args.max_epochs} "
          f"(TR x{args.tr_epoch_factor}; AdaShare {args.warmup_epochs or 'default'} warm-up + {args.policy_epochs or 'default'} policy epochs before re-training); {args.threads} thread(s)")
    print(f"| {'method':14s} | mean accuracy (mean ± std) | delta-m vs single-task | epochs run (best) | training CPU time vs hard sharing |")
    print(f"| {'-' * 14} | --- | --- | --- | --- |")
    for m in results:
        acc = np.array([r["accuracy"] for r in results[m].values()])
        dm = np.array([r["delta_m"] for r in results[m].values()])
        cpu = np.mean([r["cpu_s"] for r in results[m].values()])
        sd = acc.std(ddof=1) if len(acc) > 1 else 0.0
        dsd = dm.std(ddof=1) if len(dm) > 1 else 0.0
        ep = "/".join(str(r["epochs"]) for r in results[m].values())
        best = "/".join(str(r["best_epoch"]) for r in results[m].values())
        ratio = f"{cpu / ref:.2f}x " if refs else ""  # no hard sharing run: absolute time only
        print(f"| {m:14s} | {100 * acc.mean():.2f} ± {100 * sd:.2f} % | {100 * dm.mean():+.2f} ± {100 * dsd:.2f} % | {ep} ({best}) | {ratio}({cpu:.0f} CPU-s) |")


if __name__ == "__main__":
    main()
