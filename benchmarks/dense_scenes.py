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
                    evaluate_and_save(args, base, key, root, v, seed, extend(root, results[key], base))
                continue
            if key in results:
                continue
            t0 = time.perf_counter()
            if v == "branched":  # stage 1: single-task encoders (same recipe, early stopping), affinity, the tree
                run(["train.json", "affinity.json"], root, seed=seed, budget_fraction=args.budget_fraction,
                    encoder_config=[str(BUNDLE / "configs" / c) for c in ("train.json", "early_stopping.json")],
                    **{"branched_search#overrides#patience": args.patience}, **base)
            wf = run(["train.json", f"variants/{v}.json", "early_stopping.json"], root, seed=seed, **base)
            evaluate_and_save(args, base, key, root, v, seed, {"train_s": time.perf_counter() - t0, **progress(wf, base)})
    results = json.loads((args.out / "results.json").read_text())
    (args.out / "table.md").write_text(table(results) + "\n")
    print(table(results))
    return 0


def progress(wf, base) -> dict:
    """What a later --extend needs: epochs run, the cap, the best validation score and its epoch."""
    get = wf.parser.get_parsed_content
    trainer, evaluator = get("train#trainer"), get("validate#evaluator")
    return {"epochs": int(trainer.state.epoch), "max_epochs": int(base["max_epochs"]),
            "best_val": float(evaluator.state.best_metric), "best_epoch": int(evaluator.state.best_metric_epoch)}


def capped(record: dict, args) -> bool:
    """The run hit its epoch cap while early stopping had not fired, and the new cap is higher."""
    if record["epochs"] < record["max_epochs"] or record["epochs"] >= args.max_epochs:
        return False
    if "best_epoch" not in record:
        raise SystemExit(f"--extend: {record['variant']}/seed{record['seed']} has no best_val/best_epoch in results.json")
    return record["epochs"] - record["best_epoch"] < args.patience


def extend(root: Path, record: dict, base: dict) -> dict:
    """Continue a capped run as if its cap had been higher: the final checkpoint's weights and Adam state (the learning
    rate is constant), the trainer's epoch, early stopping's best score and count, the evaluator's best and the best
    checkpoint's score all carry over, so only a better validation score replaces ``model.pt``. The data order and the
    sampling draws after the restart differ from an uninterrupted run's (the loader's generator restarts at the seed)."""
    from monai.handlers import CheckpointSaver

    final = root / "models" / "model_final.pt"
    if not final.is_file():
        raise SystemExit(f"--extend: {final} is missing; {record['variant']}/seed{record['seed']} cannot be continued")

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
    t0 = time.perf_counter()
    # AdaShare's policy (and its fixed mode) is in the checkpoint: re-train only, no second search
    again = {"run": ["$@train#trainer.run()"]} if record["variant"] == "adashare" else {}
    wf = run(["train.json", f"variants/{record['variant']}.json", "early_stopping.json"], root, before_run=restore,
             seed=record["seed"], **base, **again)
    return {"train_s": record["train_s"] + time.perf_counter() - t0, "continued_from": record["epochs"], **progress(wf, base)}


def evaluate_and_save(args, base, key, root, v, seed, progress_record) -> None:
    """Test-set metrics of the best checkpoint (delta-m against the same seed's single-task networks), saved."""
    baseline = args.out / "single_task" / f"seed{seed}" / "eval" / "metrics.json"
    run(["train.json", f"variants/{v}.json", "evaluate.json"], root, seed=seed,
        baseline_file=str(baseline) if baseline.is_file() and v != "single_task" else None,
        **{**base, "data_root": args.test_root or base["data_root"]})
    m = json.loads((root / "eval" / "metrics.json").read_text())
    record = {"variant": v, "seed": seed, **progress_record, "parameters": m["parameters"], "tasks": m["tasks"],
              "delta_m": m["delta_m"], "score": m["score"]}
    save(args.out, key, record)
    if getattr(args, "record", False):
        from records import run_config, tagged, write_record

        write_record("dense_scenes", tagged(args, key), config=run_config(args, drop=("seeds", "record", "record_tag"), variant=v), seed=seed,
                     metrics={k: record[k] for k in ("parameters", "tasks", "delta_m", "score", "epochs") if k in record},
                     timings={k: v for k, v in record.items() if k.endswith("_s")})
    print(f"{key}: {record['train_s']:.0f} s, {record['epochs']} epochs, score {m['score']:.4f}, delta_m {m['delta_m']}", flush=True)


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


def table(results: dict) -> str:
    cols = [("seg", "miou"), ("seg", "pixel_acc"), ("depth", "abs_err"), ("depth", "rel_err"), ("depth", "delta1"),
            ("normal", "mean_error"), ("normal", "median_error"), ("normal", "within_11.25"), ("normal", "within_22.5"), ("normal", "within_30")]
    by = {}
    for r in results.values():
        by.setdefault(r["variant"], []).append(r)
    hard = by.get("hard_sharing")
    ref_p = hard[0]["parameters"] if hard else None
    ref_t = float(np.mean([r["train_s"] for r in hard])) if hard else None
    head = "| variant | seeds | params (x hard) | time (x hard) | epochs | " + " | ".join(f"{t} {m}" for t, m in cols) + " | delta-m % |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def ms(vals, scale=1.0, nd=2):
        vals = [v * scale for v in vals if v is not None and math.isfinite(v)]
        if not vals:
            return "-"
        return f"{np.mean(vals):.{nd}f} ± {np.std(vals, ddof=1):.{nd}f}" if len(vals) > 1 else f"{vals[0]:.{nd}f}"

    for v in VARIANTS:
        rs = by.get(v)
        if not rs:
            continue
        row = [v, str(len(rs)), f"{rs[0]['parameters'] / ref_p:.2f}" if ref_p else "-",
               f"{np.mean([r['train_s'] for r in rs]) / ref_t:.2f}" if ref_t else "-", ms([r["epochs"] for r in rs], nd=1)]
        for t, m in cols:
            scale = 100.0 if m in ("miou", "pixel_acc", "delta1", "within_11.25", "within_22.5", "within_30") else 1.0
            row.append(ms([r["tasks"].get(t, {}).get(m) for r in rs], scale, 3 if m in ("abs_err", "rel_err") else 2))
        row.append(ms([r["delta_m"] for r in rs], 100.0))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
