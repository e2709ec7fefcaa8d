"""Every variant of the dense bundle to convergence (early stopping on the validation score), over seeds: per-task
metrics of the best checkpoint, delta-m against the single-task networks of the same seed, parameters and training
time relative to hard sharing. A benchmark, not a test.

CPU, synthetic scenes (render them first; the test scenes are a second rendering with another seed, whose ``val``
split is the test set: early stopping and checkpoint selection see only the first set's ``val``)::

    python -m data_prep.synthetic_scenes --out scenes --n 200 --val 50 --size 32 32
    python -m data_prep.synthetic_scenes --out test_scenes --n 1 --val 100 --size 32 32 --seed 1
    python benchmarks/dense_scenes.py --data-root scenes --test-root test_scenes --out runs/dense_bench --seeds 0 1 2

A run that reaches ``--max-epochs`` while still improving (early stopping has not fired) can be continued to a
higher cap without starting again: ``--extend`` with the same arguments and the new ``--max-epochs`` picks up each such
run from its final checkpoint (weights, Adam state, epoch, early-stopping count and best validation score)::

    python benchmarks/dense_scenes.py --data-root scenes --test-root test_scenes --out runs/dense_bench --max-epochs 100 --extend

GPU, AdaShare's NYU v2 3-task set-up (section 4 and appendix A: ResNet-34, 321 x 321 crops, 20,000 iterations,
Table 7's weights and learning rate) on a local copy of AdaShare's ``nyu_v2_3task.json`` layout::

    python benchmarks/dense_scenes.py --gpu --data-root /data/nyu_v2 --out runs/nyu_bench

Our ResNet has no atrous stages (DeepLab-ResNet's output stride 8), and the mtan-style metrics are used unless
``--adashare-compat``; compare with AdaShare's Tables 1 and 3 with that in mind.

Batch-norm at test, one protocol for every row: the best checkpoint of every run is evaluated twice, with the
running (population) statistics and with each test batch's own statistics (the SFG, Task Routing and AdaShare
code bases test the second way). The mode is an inference setting (the evaluator's ``bn_inference``), so one
training serves both. Each mode has its own table, and delta-m in a mode is against the same seed's single-task
networks evaluated in that mode. Early stopping and checkpoint selection still validate in each variant's own
``bn_inference`` (test-batch statistics for Task Routing, SFG and SFG's reference, running statistics for the
rest); each record names it (``selection_bn``). In the test-batch mode a split's last, smaller batch (100 test
scenes in batches of ``val_batch_size`` 32 leave 4) is normalised with its own statistics too.

delta-m is eq. 1 as AdaShare and MTAN use it: per task, the mean signed relative difference of that task's metrics
against the single-task networks (lower-is-better ones negated), then the mean over tasks, so every task weighs
the same however many metrics it reports (``mtl_med.metrics.dense.dense_delta_m``). Each task's term counts every
metric its meter reports: seg mIoU and pixel accuracy; depth abs / rel error, RMSE and delta < 1.25, 1.25^2,
1.25^3; normals mean / median angle and within 11.25, 22.5, 30 degrees.

SFG's grouping rate differs from the bundle's on purpose. The bundle keeps the paper's (A.1: the grouping logits at
the weights' learning rate, ``grouping_lr_scale`` 1), made for 200k iterations (the paper decays the temperature at
1e-5 per iteration, the bundle's ``variants/sfg.json`` at 3e-3). These runs have a few hundred to a couple of
thousand iterations (13 per epoch on 200 scenes), in which p hardly leaves its start at the paper's rate (the
vision benchmark's finding in docs/reproduction.md), so the argmax evaluation would test an all-shared network
trained with random masks. The benchmark trains SFG with the logits at 100 times the weights' rate and the
temperature decaying at 1e-3 per iteration, the setting under which the vision benchmark's groupings formed on CPU
budgets (``--sfg-grouping-lr-scale 1 --sfg-tau-rate 1e-5`` restores the paper's rates, ``--sfg-grouping-lr-scale 1
--sfg-tau-rate 3e-3`` the bundle's). Each SFG record holds how far p moved: the mean and largest ``|p - p_start|``
over every kernel and group of the evaluated checkpoint, and each layer's shared probability sum and argmax-shared
fraction at the start and in that checkpoint.

``--record`` writes one record per run to ``results/dense_scenes/`` (``benchmarks/records.py``), with both modes'
metrics; :func:`render` draws the tables from those records (``benchmarks/report.py``'s ``dense_scenes``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "dense_multitask"
#: hard_sharing_highresnet: SFG's reference, hard sharing on SFG's backbone, width and batch-norm mode
VARIANTS = ("hard_sharing", "single_task", "cross_stitch", "task_routing", "sfg", "hard_sharing_highresnet", "adashare", "branched",
            "selective_sharing")
#: batch-norm statistics at test, every run evaluated in both: running averages, then each test batch's own
BN_MODES = ("population", "batch")
#: SFG's grouping-logit learning rate (x the weights') and temperature decay per iteration in this benchmark (see
#: the module docstring); the bundle's own: 1 (the paper's) and 3e-3 (variants/sfg.json; the paper's 1e-5)
SFG_GROUPING_LR_SCALE, SFG_TAU_RATE = 100.0, 1e-3


def run(configs, root, before_run=None, **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[str(BUNDLE / "configs" / c) for c in configs], meta_file=str(BUNDLE / "configs" / "metadata.json"),
                        logging_file=False, workflow_type=None, bundle_root=str(root), **overrides)
    wf.initialize()
    if before_run is not None:
        before_run(wf)
    wf.run()
    wf.finalize()
    return wf


def settings(args) -> dict:
    if not args.gpu:
        return dict(data_root=args.data_root, max_epochs=args.max_epochs, patience=args.patience, width=args.width,
                    head_hidden=args.head_hidden, batch_size=args.batch_size, warmup_epochs=args.warmup_epochs,
                    policy_epochs=args.policy_epochs)
    # AdaShare NYU v2 3-task: ResNet-34 (16 blocks), 321 x 321 crops, 20,000 iterations, lr 0.001, Table 7 weights
    # AdaShare selects and reports on the test split (its code has no other held-out NYU v2 split)
    return dict(data_root=args.data_root, dataset="adashare_nyuv2", val_split="test", eval_split="test", backbone="resnet34", width=1.0,
                head_hidden=256, crop_size=[321, 321], batch_size=16, val_batch_size=8, epoch_length=1000, max_epochs=20,
                patience=args.patience, search_iterations=20000, adashare_compat=args.adashare_compat,
                **{"network_def#conv1_t_size": 7, "network_def#conv1_t_stride": 2, "network_def#no_max_pool": False})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--test-root", default=None, help="data root whose val split is the test set (default: --data-root's val)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max-epochs", type=int, default=40)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--head-hidden", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup-epochs", type=int, default=5)
    p.add_argument("--policy-epochs", type=int, default=15)
    p.add_argument("--budget-fraction", type=float, default=0.5, help="Branched MTN's budget between hard sharing (0) and single-task (1)")
    p.add_argument("--sfg-grouping-lr-scale", type=float, default=SFG_GROUPING_LR_SCALE,
                   help="SFG's learning rate on the grouping logits over the weights' (the paper's and the bundle's: 1)")
    p.add_argument("--sfg-tau-rate", type=float, default=SFG_TAU_RATE,
                   help="SFG's Gumbel-Softmax temperature decay per iteration (the bundle's: 3e-3; the paper's: 1e-5)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--set", nargs="+", default=[], metavar="ID=JSON", help="bundle config overrides after the mode's own, "
                   "e.g. --set epoch_length=1 batch_size=2 (a value that is not JSON is a string)")
    p.add_argument("--extend", action="store_true", help="continue the runs in --out that reached their epoch cap "
                   "still improving, up to --max-epochs, instead of training new ones")
    p.add_argument("--gpu", action="store_true", help="AdaShare's NYU v2 3-task set-up on a local copy")
    p.add_argument("--adashare-compat", action="store_true", help="AdaShare's metric variants")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from records import add_record_arguments

    add_record_arguments(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = list(args.variants)
    if "single_task" in variants:  # the delta-m baseline first
        variants.remove("single_task")
        variants.insert(0, "single_task")
    base = {**settings(args), **overrides(args.set)}
    results = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").is_file() else {}
    for seed in args.seeds:
        for v in variants:
            key = f"{v}/seed{seed}"
            root = args.out / v / f"seed{seed}"
            if args.extend:  # re-read: another process may have extended this run meanwhile
                results = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").is_file() else {}
                if key in results and capped(results[key], args):
                    evaluate_and_save(args, base, key, root, v, seed, extend(root, results[key], base, variant_settings(args, v)))
                continue
            if key in results:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            if v == "branched":  # stage 1: single-task encoders (same recipe, early stopping), affinity, the tree
                run(["train.json", "affinity.json"], root, seed=seed, budget_fraction=args.budget_fraction,
                    encoder_config=[str(BUNDLE / "configs" / c) for c in ("train.json", "early_stopping.json")],
                    **{"branched_search#overrides#patience": args.patience}, **base)
            wf = run(["train.json", f"variants/{v}.json", "early_stopping.json"], root, seed=seed, **base, **variant_settings(args, v))
            evaluate_and_save(args, base, key, root, v, seed, {"train_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                                                               **progress(wf, base)})
    results = json.loads((args.out / "results.json").read_text())
    (args.out / "table.md").write_text(table(results) + "\n")
    print(table(results))
    return 0


def variant_settings(args, v: str) -> dict:
    """The benchmark's own settings of variant ``v`` over the bundle's: SFG's grouping rate and temperature decay."""
    if v == "sfg":
        return {"grouping_lr_scale": float(args.sfg_grouping_lr_scale), "tau_rate": float(args.sfg_tau_rate)}
    return {}


def selection_bn(v: str, base: dict) -> str:
    """The batch-norm mode the training-time validation (early stopping, the best checkpoint) of ``v`` uses."""
    if "bn_inference" in base:
        return base["bn_inference"]
    for name in (f"variants/{v}.json", "train.json"):
        cfg = json.loads((BUNDLE / "configs" / name).read_text())
        if "bn_inference" in cfg:
            return cfg["bn_inference"]
    return "population"


def progress(wf, base) -> dict:
    """What a later --extend needs: epochs run, the cap, the best validation score and its epoch."""
    get = wf.parser.get_parsed_content
    trainer, evaluator = get("train#trainer"), get("validate#evaluator")
    return {"epochs": int(trainer.state.epoch), "max_epochs": int(base["max_epochs"]), "iterations": int(trainer.state.iteration),
            "best_val": float(evaluator.state.best_metric), "best_epoch": int(evaluator.state.best_metric_epoch)}


def capped(record: dict, args) -> bool:
    """The run hit its epoch cap while early stopping had not fired, and the new cap is higher."""
    if record["epochs"] < record["max_epochs"] or record["epochs"] >= args.max_epochs:
        return False
    if "best_epoch" not in record:
        raise SystemExit(f"--extend: {record['variant']}/seed{record['seed']} has no best_val/best_epoch in results.json")
    return record["epochs"] - record["best_epoch"] < args.patience


def extend(root: Path, record: dict, base: dict, settings: dict | None = None) -> dict:
    """Continue a capped run as if its cap had been higher: the final checkpoint's weights and Adam state (the learning
    rate is constant), the trainer's epoch, early stopping's best score and count, the evaluator's best and the best
    checkpoint's score all carry over, so only a better validation score replaces ``model.pt``. The data order and the
    sampling draws after the restart differ from an uninterrupted run's (the loader's generator restarts at the seed)."""
    from monai.handlers import CheckpointSaver

    final = root / "models" / "model_final.pt"
    if not final.is_file():
        raise SystemExit(f"--extend: {final} is missing; {record['variant']}/seed{record['seed']} cannot be continued")
    settings = dict(settings or {})
    trained = {k: record.get("grouping", {}).get(k) for k in settings}
    if any(v is not None and v != settings[k] for k, v in trained.items()):
        raise SystemExit(f"--extend: {record['variant']}/seed{record['seed']} was trained with {trained}, not {settings}")

    def restore(wf):
        get = wf.parser.get_parsed_content
        trainer, evaluator = get("train#trainer"), get("validate#evaluator")
        state = torch.load(final, map_location=trainer.state.device, weights_only=True)
        get("network").load_state_dict(state["model"])
        get("optimizer").load_state_dict(state["optimizer"])
        trainer.state.epoch = record["epochs"]
        trainer.state.iteration = record["epochs"] * trainer.state.epoch_length
        evaluator.state.best_metric, evaluator.state.best_metric_epoch = record["best_val"], record["best_epoch"]
        stop = get("early_stop")._handler
        stop.best_score, stop.counter = record["best_val"], record["epochs"] - record["best_epoch"]
        best = [h for h in get("validate#handlers") if isinstance(h, CheckpointSaver) and h._key_metric_checkpoint is not None]
        best[0].load_state_dict({"_saved": [(record["best_val"], "model.pt")]})

    print(f"{record['variant']}/seed{record['seed']}: continuing from epoch {record['epochs']} (best {record['best_val']:.4f} "
          f"at {record['best_epoch']}) up to {base['max_epochs']}", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    # AdaShare's policy (and its fixed mode) is in the checkpoint: re-train only, no second search
    again = {"run": ["$@train#trainer.run()"]} if record["variant"] == "adashare" else {}
    wf = run(["train.json", f"variants/{record['variant']}.json", "early_stopping.json"], root, before_run=restore,
             seed=record["seed"], **base, **settings, **again)
    out = {"train_s": record["train_s"] + time.perf_counter() - t0, "continued_from": record["epochs"], **progress(wf, base)}
    if "cpu_s" in record:
        out["cpu_s"] = record["cpu_s"] + time.process_time() - c0
    return out


def evaluate_and_save(args, base, key, root, v, seed, progress_record) -> None:
    """Test-set metrics of the best checkpoint in every batch-norm mode of :data:`BN_MODES` (``eval/<mode>/metrics.json``;
    delta-m against the same seed's single-task networks in the same mode), and for SFG how far p moved; saved."""
    modes, grouping = {}, {}
    for mode in BN_MODES:
        baseline = args.out / "single_task" / f"seed{seed}" / "eval" / mode / "metrics.json"
        out_dir = root / "eval" / mode
        wf = run(["train.json", f"variants/{v}.json", "evaluate.json"], root, before_run=None if grouping else grouping_start(grouping),
                 seed=seed, baseline_file=str(baseline) if baseline.is_file() and v != "single_task" else None,
                 **{**base, **variant_settings(args, v), "data_root": args.test_root or base["data_root"], "bn_inference": mode,
                    "output_dir": str(out_dir)})
        if "start" in grouping:
            grouping_end(grouping, wf.parser.get_parsed_content("network"))
        m = json.loads((out_dir / "metrics.json").read_text())
        modes[mode] = {k: m.get(k) for k in ("tasks", "delta_m", "delta_m_excluded", "score")}
    record = {"variant": v, "seed": seed, **progress_record, "parameters": m["parameters"], "selection_bn": selection_bn(v, base),
              "modes": modes}
    if grouping:
        record["grouping"] = {**variant_settings(args, v), **grouping["summary"]}
    save(args.out, key, record)
    if getattr(args, "record", False):
        from records import run_config, tagged, write_record

        write_record("dense_scenes", tagged(args, key), config=run_config(args, drop=("seeds", "record", "record_tag"), variant=v), seed=seed,
                     metrics={k: record[k] for k in ("parameters", "modes", "epochs", "max_epochs", "iterations", "best_epoch",
                                                     "continued_from", "selection_bn", "grouping") if k in record},
                     timings={k: x for k, x in record.items() if k.endswith("_s")})
    dm = ", ".join(f"{mode} {m['delta_m']}" for mode, m in modes.items())
    print(f"{key}: {record['train_s']:.0f} s, {record['epochs']} epochs, delta_m {dm}", flush=True)


def grouping_start(grouping: dict):
    """``before_run`` of an evaluation: an SFG network's p as built (the training's start, before the checkpoint
    loads) into ``grouping["start"]``; other networks leave ``grouping`` empty."""

    def hook(wf):
        net = wf.parser.get_parsed_content("network")
        if callable(getattr(net, "grouping_probabilities", None)):
            grouping["start"] = net.grouping_probabilities()
            grouping["start_sums"], grouping["start_argmax"] = net.group_probability_sums(), net.group_proportions()

    return hook


def grouping_end(grouping: dict, net) -> None:
    """How far the evaluated checkpoint's p is from its start: the mean and largest ``|p - p_start|`` over every
    kernel and group, and per layer the shared probability sum and the fraction of kernels whose most probable
    group is the shared one, at the start and now (the shared group is the last)."""
    start, end = grouping["start"], net.grouping_probabilities()
    diff = torch.cat([(end[k] - start[k]).abs().flatten() for k in start])
    sums, argmax = net.group_probability_sums(), net.group_proportions()
    grouping["summary"] = {
        "layers": list(start), "mean_abs_dp": float(diff.mean()), "max_abs_dp": float(diff.max()),
        "shared_sum_start": [grouping["start_sums"][k][-1] for k in start], "shared_sum_end": [sums[k][-1] for k in start],
        "shared_argmax_start": [grouping["start_argmax"][k][-1] for k in start], "shared_argmax_end": [argmax[k][-1] for k in start]}


def overrides(pairs) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set needs ID=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def save(out: Path, key: str, record: dict) -> None:
    """Add one run to ``out/results.json`` under a lock, re-read first: one process per seed can share ``out``."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    with open(out / ".results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        results = json.loads(path.read_text()) if path.is_file() else {}
        results[key] = record
        tmp = out / f".results.{os.getpid()}.json"
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        os.replace(tmp, path)


COLUMNS = (("seg", "miou"), ("seg", "pixel_acc"), ("depth", "abs_err"), ("depth", "rel_err"), ("depth", "delta1"),
           ("normal", "mean_error"), ("normal", "median_error"), ("normal", "within_11.25"), ("normal", "within_22.5"),
           ("normal", "within_30"))
PERCENT = ("miou", "pixel_acc", "delta1", "within_11.25", "within_22.5", "within_30")
MODE_TITLES = {"population": "batch-norm at test: running (population) statistics",
               "batch": "batch-norm at test: each test batch's own statistics"}


def _ms(vals, scale=1.0, nd=2) -> str:
    vals = [v * scale for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return "-"
    return f"{np.mean(vals):.{nd}f} ± {np.std(vals, ddof=1):.{nd}f}" if len(vals) > 1 else f"{vals[0]:.{nd}f}"


def table(results: dict) -> str:
    """One table per batch-norm mode of :data:`BN_MODES` (every row in each; delta-m against the single-task networks
    in the same mode, as each run's evaluation computed it), then how far SFG's p moved. ``results``: run -> record
    as ``results.json`` holds them."""
    runs = list(results.values())
    by = {}
    for r in runs:
        by.setdefault(r["variant"], []).append(r)
    hard = by.get("hard_sharing")
    ref_p = hard[0]["parameters"] if hard else None
    ref_t = float(np.mean([r["train_s"] for r in hard])) if hard else None
    head = ("| variant | seeds | params (x hard) | time (x hard) | epochs | selection BN | "
            + " | ".join(f"{t} {m}" for t, m in COLUMNS) + " | delta-m % |")
    out = []
    for mode in BN_MODES:
        lines = [f"{MODE_TITLES[mode]} (`{mode}`); delta-m against the single-task networks in this mode", "", head,
                 "|" + "---|" * (head.count("|") - 1)]
        for v in VARIANTS:
            rs = [r for r in by.get(v, []) if mode in r.get("modes", {})]
            if not rs:
                continue
            sel = "/".join(sorted({r.get("selection_bn", "?") for r in rs}))
            row = [v, str(len(rs)), f"{rs[0]['parameters'] / ref_p:.2f}" if ref_p else "-",
                   f"{np.mean([r['train_s'] for r in rs]) / ref_t:.2f}" if ref_t else "-", _ms([r["epochs"] for r in rs], nd=1), sel]
            for t, m in COLUMNS:
                row.append(_ms([r["modes"][mode]["tasks"].get(t, {}).get(m) for r in rs], 100.0 if m in PERCENT else 1.0,
                               3 if m in ("abs_err", "rel_err") else 2))
            row.append(_ms([r["modes"][mode]["delta_m"] for r in rs], 100.0))
            lines.append("| " + " | ".join(row) + " |")
        out.append("\n".join(lines))
        out.append(paired_delta_m(by, mode))
    sfg = [r for r in by.get("sfg", []) if "grouping" in r]
    if sfg:
        g = [r["grouping"] for r in sfg]
        rates = "; ".join(sorted({f"grouping lr x{x['grouping_lr_scale']:g}, tau decay {x['tau_rate']:g}/iteration"
                                  for x in g if "tau_rate" in x}))
        layers = len(g[0]["layers"])

        def per_layer(name):
            return " ".join(_ms([x[name][i] for x in g if len(x[name]) == layers]) for i in range(layers))

        out.append(f"SFG grouping of the evaluated checkpoints ({len(sfg)} runs; {rates}): mean |p - p_start| "
                   f"{_ms([x['mean_abs_dp'] for x in g], nd=3)}, largest {_ms([x['max_abs_dp'] for x in g], nd=3)}; shared probability "
                   f"sum per SFG layer, start {per_layer('shared_sum_start')} -> end {per_layer('shared_sum_end')}; fraction of kernels "
                   f"whose most probable group is the shared one (what the argmax evaluation uses), start "
                   f"{per_layer('shared_argmax_start')} -> end {per_layer('shared_argmax_end')}")
    return "\n\n".join(out)


#: the paired comparisons of the tables: each variant against hard sharing on its backbone (SFG's is HighResNet)
REFERENCES = {v: "hard_sharing_highresnet" if v == "sfg" else "hard_sharing" for v in VARIANTS if not v.startswith("hard_sharing")}


def paired_delta_m(by: dict, mode: str) -> str:
    """delta-m (points) of each variant minus its hard-sharing reference in ``mode``, paired by seed."""
    from mtl_med.metrics.stats import format_p, paired_comparison

    lines = [f"| delta-m minus the reference, paired by seed, {mode} statistics | reference | seeds | mean difference, points (95 % CI) | "
             "seeds won / tied / lost | paired t p |", "|---|---|---|---|---|---|"]
    def dm(r):  # the single-task networks are the baseline: delta-m 0 by definition
        return 0.0 if r["variant"] == "single_task" else r["modes"][mode]["delta_m"]

    for v, ref in REFERENCES.items():
        a = {r["seed"]: dm(r) for r in by.get(v, []) if mode in r.get("modes", {}) and dm(r) is not None}
        b = {r["seed"]: dm(r) for r in by.get(ref, []) if mode in r.get("modes", {}) and dm(r) is not None}
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        t = paired_comparison([100 * a[k] for k in seeds], [100 * b[k] for k in seeds])
        ci = f"{t.ci_low:+.1f} to {t.ci_high:+.1f}" if np.isfinite(t.ci_low) else "no CI"
        lines.append(f"| {v} | {ref} | {', '.join(map(str, seeds))} | {t.mean_diff:+.1f} ({ci}) | {t.wins} / {t.ties} / {t.losses} | "
                     f"{format_p(t.t_p)} |")
    return "\n".join(lines)


#: settings every record of one table must share (not ``max_epochs``: ``--extend`` raises the cap of some runs only)
PROTOCOL = ("data_root", "test_root", "patience", "width", "head_hidden", "batch_size", "warmup_epochs", "policy_epochs",
            "budget_fraction", "sfg_grouping_lr_scale", "sfg_tau_rate", "gpu", "adashare_compat", "set")


def render(results: Path) -> str:
    """The tables of :func:`table` from the records ``results/dense_scenes/*.json`` (``--record``), with the machines
    and code revisions; records that differ in a :data:`PROTOCOL` setting are refused."""
    from report import load, machine_line, revisions

    recs = load(results, "dense_scenes")
    cfg = recs[0]["config"]
    for r in recs:
        differ = [k for k in PROTOCOL if r["config"].get(k) != cfg.get(k)]
        if differ:
            raise ValueError(f"dense_scenes: {r['name']} differs from {recs[0]['name']} in {differ}")
    runs = {r["name"]: {"variant": r["config"]["variant"], "seed": r["seed"], **r["metrics"], **r["timings"]} for r in recs}
    cap = max(r["config"]["max_epochs"] for r in recs)
    return (table(runs) + f"\n\nTest-set metrics of the best validation checkpoint, mean ± sample std over seeds; at most "
            f"{cap} epochs, patience {cfg['patience']}. Records: `results/dense_scenes/*.json`; {machine_line(recs)}; "
            f"code {revisions(recs)}.\n")


if __name__ == "__main__":
    sys.exit(main())
