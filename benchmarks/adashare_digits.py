"""AdaShare on the digits default of the vision bundle: does the search learn a policy?

Runs the bundle's own configs (bundles/vision_multitask, ``variants/adashare.json``) for each seed:
1. the policy search alone (warm-up, policy learning, best epoch by validation accuracy), which
   writes ``models/policy.json``: the select probabilities ``alpha`` (tasks x blocks) and the
   sampled policy;
2. re-training from scratch, with early stopping, under the learned policy and under random
   policies as the paper's ablation (Tables 5, 6): "Random #1" skips as many blocks in total as
   the learned policy, anywhere; "Random #2" skips as many blocks per task as the learned policy.
   Every re-training of a seed starts from the same initial weights; only the policy differs.
3. evaluation of the best validation checkpoint on the test split.

Prints, per seed, alpha's spread between tasks (per block: max - min over tasks; does the policy
differ between tasks?), the learned policy, and the test accuracy of every policy; then a table
of the mean and sample std over seeds (random policies: the mean over draws and the best draw,
the paper reports the best of eight). A benchmark prints; it never asserts.

    OMP_NUM_THREADS=1 python benchmarks/adashare_digits.py --json /tmp/adashare_digits.json
    python benchmarks/adashare_digits.py --seeds 0 --random 1 --policy_epochs 4 --max_epochs 3   # smoke run

The identical-task null control (``--identical-tasks``): the same search on ten copies of one task
(``digit_<d>``, ``--identical_digit``). Copies cannot differ in what they need, so any spread of alpha
between them is the search's own noise; task-specific policies need the distinct tasks' spread to
exceed it, paired by seed. ``--record`` writes one record per search under ``results/adashare_null/``:

    for s in 0 1 2; do for c in "" --identical-tasks; do
      OMP_NUM_THREADS=1 python benchmarks/adashare_digits.py --search_only $c --seeds $s --warmup_epochs 1 --policy_epochs 10 \
          --policy_lr 0.1 --tau_final 0.01 --image_size 8 --record
    done; done
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from records import write_record
from vision_digits import run_bundle

VARIANT = ["train.json", "variants/adashare.json"]


def random_policy(like: np.ndarray, per_task: bool, rng: np.random.Generator) -> np.ndarray:
    """Random #2 (``per_task``): each task skips as many blocks as in ``like``, at random places;
    Random #1: as many skipped blocks in total, anywhere (section 4.1, "Comparison with Random Policy")."""
    out = np.ones_like(like, dtype=bool)
    if per_task:
        for k, row in enumerate(like):
            out[k, rng.choice(like.shape[1], int((~row).sum()), replace=False)] = False
    else:
        flat = out.reshape(-1)
        flat[rng.choice(flat.size, int((~like).sum()), replace=False)] = False
    return out


def retrain(run_dir: Path, policy: np.ndarray, seed: int, common: dict, train: dict) -> dict:
    """Train the network of a fixed policy from scratch (early stopping), then test it under both
    batch-norm protocols; returns the test accuracies and the epochs."""
    fixed = {"network_def#policy": policy.astype(int).tolist()}
    done = run_dir / "models" / "model_final.pt"
    out = {"epochs": None, "best_epoch": None}
    if not done.is_file():  # a finished re-training in --workdir is reused
        out = run_bundle(VARIANT + ["early_stopping.json"], run_dir, seed=seed, run=["$@train#trainer.run()"], **fixed, **train)
    for bn in ("batch", "population"):
        run_bundle(VARIANT + ["evaluate.json"], run_dir, seed=seed, bn_inference=bn, **fixed, **common)
        out[f"accuracy_{bn}"] = json.loads((run_dir / "eval" / "summary.json").read_text())["mean_accuracy"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--random", type=int, default=3, help="random policies of each kind per seed (the paper: 8, best reported)")
    p.add_argument("--warmup_epochs", type=int, default=None, help="default: the variant's")
    p.add_argument("--policy_epochs", type=int, default=None, help="default: the variant's")
    p.add_argument("--curriculum_speed", type=int, default=None, help="default: the variant's")
    p.add_argument("--lambda_sparsity", type=float, default=None)
    p.add_argument("--lambda_sharing", type=float, default=None)
    p.add_argument("--tau_final", type=float, default=None)
    p.add_argument("--policy_lr", type=float, default=None)
    p.add_argument("--search_batch_size", type=int, default=None, help="batch size of the search (default: --batch_size)")
    p.add_argument("--max_epochs", type=int, default=100, help="cap on each re-training")
    p.add_argument("--patience", type=int, default=15)
    p.add_argument("--image_size", type=int, default=16)
    p.add_argument("--width", type=float, default=0.125, help="ResNet-18 width multiplier")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--search_only", action="store_true", help="run the searches and print alpha, no re-training")
    p.add_argument("--workdir", default=None)
    p.add_argument("--identical-tasks", dest="identical_tasks", action="store_true",
                   help="the null control: ten identical copies of one digit task instead of the ten digits")
    p.add_argument("--identical_digit", type=int, default=0, help="the digit whose task --identical-tasks copies")
    p.add_argument("--record", action="store_true", help="write one record per search to results/adashare_null/ (with --search_only)")
    p.add_argument("--record_tag", default="", help="prefix of the records' names (the schedule, e.g. 'short')")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="print the table of earlier --json files and exit")
    args = p.parse_args()
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        print_table({int(s): r for run in runs for s, r in run["results"].items()})
        return
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="adashare_digits_"))
    common = dict(image_size=args.image_size, batch_size=args.batch_size, width=args.width)
    search = {k: v for k, v in dict(warmup_epochs=args.warmup_epochs, policy_epochs=args.policy_epochs, curriculum_speed=args.curriculum_speed,
                                    lambda_sparsity=args.lambda_sparsity, lambda_sharing=args.lambda_sharing,
                                    adashare_tau_final=args.tau_final, policy_lr=args.policy_lr,
                                    adashare_batch_size=args.search_batch_size).items() if v is not None}
    if args.identical_tasks:
        register_identical_digits(args.identical_digit)
        common["dataset"] = IDENTICAL
    train = dict(common, max_epochs=args.max_epochs, patience=args.patience)
    results: dict[int, dict] = {}
    for seed in args.seeds:
        rng = np.random.default_rng(1000 + seed)
        run_dir = root / f"search_seed{seed}"
        cpu0 = time.process_time()
        wf_out = run_search(run_dir, seed, common, search)
        cpu = time.process_time() - cpu0
        record = json.loads((run_dir / "models" / "policy.json").read_text())
        alpha, learned = np.array(record["select_probability"]), np.array(record["policy"], dtype=bool)
        spread = alpha.max(0) - alpha.min(0)
        res = {"alpha": alpha.tolist(), "policy": learned.astype(int).tolist(), "alpha_task_spread": spread.tolist(),
               "search_cpu_s": cpu, **wf_out}
        print(f"seed {seed}: search {cpu:.0f} CPU-s, best epoch {wf_out['best']}; alpha in [{alpha.min():.3f}, {alpha.max():.3f}], "
              f"spread between tasks per block {np.array2string(spread, precision=3)}; blocks executed per task {learned.sum(1).tolist()}", flush=True)
        print("alpha (tasks x blocks):\n" + np.array2string(alpha, precision=2), flush=True)
        if args.record:
            condition = f"identical_digit{args.identical_digit}" if args.identical_tasks else "distinct"
            config = {k: v for k, v in vars(args).items() if k not in ("seeds", "json", "merge", "workdir", "record", "record_tag")}
            config.update(condition=condition, search_overrides=search)
            write_record("adashare_null", f"{args.record_tag + '_' if args.record_tag else ''}{condition}_seed{seed}", config=config, seed=seed,
                         metrics={"mean_alpha_task_spread": float(spread.mean()), "alpha_task_spread": spread.tolist(),
                                  "alpha": alpha.tolist(), "policy": learned.astype(int).tolist(), "best_epoch": wf_out.get("best")},
                         timings={"search_cpu_s": cpu})
        if not args.search_only:
            policies = {"learned": learned}
            for i in range(args.random):
                policies[f"random1_{i}"] = random_policy(learned, False, rng)
                policies[f"random2_{i}"] = random_policy(learned, True, rng)
            res["retrain"] = {}
            for name, pol in policies.items():
                out = retrain(root / f"{name}_seed{seed}", pol, seed, common, train)
                res["retrain"][name] = {**out, "policy": pol.astype(int).tolist()}
                print(f"  {name:10s} test accuracy {100 * out['accuracy_batch']:.2f} % (test-batch BN) / {100 * out['accuracy_population']:.2f} % "
                      f"(running BN); {out['epochs']} epochs (best {out['best_epoch']})", flush=True)
        results[seed] = res
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    if not args.search_only:
        print_table(results)


IDENTICAL = "digits_identical"


def register_identical_digits(digit: int, copies: int = 10) -> None:
    """Make the data set ``digits_identical`` known to the bundle's reader in this process: the
    digits with ``copies`` identical one-vs-all tasks of ``digit`` (``digit_<d>``, ``digit_<d>_2``, ...)."""
    from mtl_med.data import vision

    def load(split: str = "train", seed: int = 0, transform=None, **kwargs):
        ds = vision.load_digits_tasks(split, seed, transform=None, digits=[digit], **kwargs)
        name = f"digit_{digit}"
        y = ds.targets[name].numpy()
        targets = {name if k == 0 else f"{name}_{k + 1}": y.copy() for k in range(copies)}
        return vision.MultiTaskImageDataset(ds.images, targets, dict.fromkeys(targets, "binary"), transform)

    vision.VISION_DATASETS[IDENTICAL] = (load, False, {})


def run_search(run_dir: Path, seed: int, common: dict, search: dict) -> dict:
    """The variant's search alone (no re-training); returns its best epoch and history (a finished
    search in ``run_dir`` is reused)."""
    from monai.bundle import ConfigWorkflow

    saved = run_dir / "search.json"
    if saved.is_file() or (run_dir / "models" / "policy.json").is_file():
        return json.loads(saved.read_text()) if saved.is_file() else {"best": None, "history": []}

    from vision_digits import BUNDLE

    wf = ConfigWorkflow(config_file=[str(BUNDLE / "configs" / c) for c in VARIANT], meta_file=str(BUNDLE / "configs" / "metadata.json"),
                        logging_file=False, workflow_type=None, bundle_root=str(run_dir), seed=seed,
                        run=["$@adashare#search.run()"], **common, **search)
    wf.initialize()
    try:
        wf.run()
        s = wf.parser.get_parsed_content("adashare#search")
        out = {"best": s.best, "history": s.history}
        saved.write_text(json.dumps(out))
        return out
    finally:
        wf.finalize()


def print_table(results: dict[int, dict]) -> None:
    seeds = sorted(results)
    print(f"\nAdaShare on digits (10 one-vs-all tasks, ResNet-18): learned policy vs random policies; seeds {seeds}")
    spread = np.array([np.mean(results[s]["alpha_task_spread"]) for s in seeds])
    print(f"alpha spread between tasks (mean over blocks of max - min over tasks): {spread.mean():.3f} ± {spread.std(ddof=1) if len(spread) > 1 else 0:.3f}")
    print("| policy | test accuracy, test-batch BN | test accuracy, running BN |")
    print("| --- | --- | --- |")

    def row(name, values):
        a = np.array(values)
        cells = [f"{100 * a[:, j].mean():.2f} ± {100 * (a[:, j].std(ddof=1) if len(a) > 1 else 0):.2f} %" for j in range(2)]
        print(f"| {name} | {cells[0]} | {cells[1]} |")

    key = ("accuracy_batch", "accuracy_population")
    row("learned", [[results[s]["retrain"]["learned"][k] for k in key] for s in seeds])
    for kind, label in (("random1", "Random #1 (same total)"), ("random2", "Random #2 (same per task)")):
        per_seed = [[r for n, r in results[s]["retrain"].items() if n.startswith(kind)] for s in seeds]
        row(f"{label}, mean of draws", [[np.mean([r[k] for r in runs]) for k in key] for runs in per_seed])
        row(f"{label}, best draw", [[max(r[k] for r in runs) for k in key] for runs in per_seed])
    wins = [np.mean([results[s]["retrain"]["learned"]["accuracy_batch"] > r["accuracy_batch"]
                     for n, r in results[s]["retrain"].items() if n.startswith("random")]) for s in seeds]
    print(f"learned beats a random policy (test-batch BN) in {100 * np.mean(wins):.0f} % of the comparisons")


if __name__ == "__main__":
    main()
