"""AdaShare on the digits default of the vision bundle: does the search learn a policy?

Runs the bundle's own configs (bundles/vision_multitask, ``variants/adashare.json``) for each seed:
1. the policy search alone (warm-up, policy learning, best epoch by validation accuracy), which
   writes ``models/policy.json``: the select probabilities ``alpha`` (tasks x blocks) and the
   sampled policy;
2. re-training from scratch, with early stopping, under the learned policy, under hard sharing
   (the all-ones policy: every task runs every block, the "Multi-Task" row of the paper's Tables 5, 6)
   and under random policies as the paper's ablation (Tables 5, 6): "Random #1" skips as many blocks
   in total as the learned policy, anywhere; "Random #2" skips as many blocks per task as the learned
   policy. Every re-training of a seed starts from the same initial weights and runs the same schedule;
   only the policy differs.
3. evaluation of the best validation checkpoint (validated with test-batch statistics, the variant's
   protocol) on the validation and the test split, under both batch-norm protocols. The best random
   draw of a kind is the one with the highest validation accuracy under that protocol (ties: the first
   draw); its test accuracy is reported, so the choice never looks at the test split.

Prints, per seed, alpha's spread between tasks (per block: max - min over tasks; does the policy
differ between tasks?), the learned policy, and the test accuracy of every policy; then a table
of the mean and sample std over seeds (random policies: the mean over draws and the best draw,
the paper reports the best of eight) with paired tests by seed. A benchmark prints; it never asserts.

    OMP_NUM_THREADS=1 python benchmarks/adashare_digits.py --json /tmp/adashare_digits.json
    python benchmarks/adashare_digits.py --seeds 0 --random 1 --policy_epochs 4 --max_epochs 3   # smoke run

With ``--record`` (and without ``--search_only``) every re-training writes one record to
``results/adashare_tables/`` named ``<kind>_seed<s>`` (``learned``, ``hard``) or ``<kind>_<draw>_seed<s>``
(``random1_<i>``, ``random2_<i>``), ``--record_tag`` prefixed: the policy, its block counts, the validation
and test accuracy under each batch-norm protocol, the epochs, the CPU seconds and the protocol.
A rerun with ``--record`` skips every re-training that already has a record of the same protocol, and a
seed whose learned policy has a record takes it from there instead of searching again; the random draws
of a seed come from one generator in a fixed order, so ``--random 8`` after ``--random 2`` adds draws
2-7. ``benchmarks/report.py`` renders the table (``adashare_tables``) from these records.

The identical-task null control (``--identical-tasks``): the same search on ten copies of one task
(``digit_<d>``, ``--identical_digit``). Copies cannot differ in what they need, so any spread of alpha
between them is the search's own noise; task-specific policies need the distinct tasks' spread to
exceed it, paired by seed. With ``--search_only``, ``--record`` writes one record per search under
``results/adashare_null/``:

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

from records import record_path, run_config, tagged, write_record
from vision_digits import run_bundle

VARIANT = ["train.json", "variants/adashare.json"]
#: the records of the re-trainings (``--record``), under ``results/``
BENCHMARK = "adashare_tables"
#: the batch-norm protocols every re-training is tested under: test-batch statistics, running averages
BN = ("batch", "population")
#: a record's protocol: records that differ in one of these do not go into one table (the number of random
#: draws is not one: a rerun adds draws)
PROTOCOL = ("condition", "image_size", "width", "batch_size", "warmup_epochs", "policy_epochs", "curriculum_speed",
            "lambda_sparsity", "lambda_sharing", "tau_final", "policy_lr", "search_batch_size", "max_epochs", "patience",
            "selection")
#: how the best random draw is chosen (part of the protocol)
SELECTION = "highest validation mean accuracy under the same batch-norm protocol, ties to the first draw"
#: the evaluation's split override: the validation split the re-training's checkpoint was chosen on
VALIDATION_SPLIT = "$mtl_med.data.vision.load_vision_tasks(@dataset, 'val', @data_root, @transform, **@dataset_kwargs)"


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


def hard_policy(like: np.ndarray) -> np.ndarray:
    """Hard sharing as a policy: every task runs every block (the paper's "Multi-Task" baseline of Tables
    5, 6, all blocks shared by all tasks), in the shape of ``like`` (tasks x blocks)."""
    return np.ones(np.shape(like), dtype=bool)


def block_counts(policy: np.ndarray) -> dict:
    """What the random baselines hold fixed and what hard sharing maximises: blocks run and skipped per
    task, skipped in total, and blocks run by every task."""
    pol = np.asarray(policy, dtype=bool)
    return {"blocks": int(pol.shape[1]), "executed_per_task": pol.sum(1).tolist(), "skipped_per_task": (~pol).sum(1).tolist(),
            "skipped_total": int((~pol).sum()), "shared_by_all": int(pol.all(0).sum())}


def seed_policies(learned: np.ndarray, draws: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The policies a seed re-trains, by run name: ``learned``, ``hard``, then ``random1_<i>`` and
    ``random2_<i>`` for draw ``i``, drawn in that order from ``rng`` (draw ``i`` is the same for any
    number of draws above ``i``)."""
    policies = {"learned": np.asarray(learned, dtype=bool), "hard": hard_policy(learned)}
    for i in range(draws):
        policies[f"random1_{i}"] = random_policy(learned, False, rng)
        policies[f"random2_{i}"] = random_policy(learned, True, rng)
    return policies


def kind_and_draw(run: str) -> tuple[str, int | None]:
    """``random2_3`` -> (``random2``, 3); ``learned`` -> (``learned``, None)."""
    kind, _, draw = run.partition("_")
    return kind, int(draw) if draw else None


def retrain(run_dir: Path, policy: np.ndarray, seed: int, common: dict, train: dict) -> dict:
    """Train the network of a fixed policy from scratch (early stopping on the validation accuracy
    under the variant's test-batch statistics), then evaluate the best checkpoint on the validation and
    the test split under both batch-norm protocols; returns the accuracies (``accuracy_<bn>`` on test,
    ``val_accuracy_<bn>`` on validation), the epochs and the CPU seconds of training and evaluation."""
    fixed = {"network_def#policy": policy.astype(int).tolist()}
    done = run_dir / "models" / "model_final.pt"
    out = {"epochs": None, "best_epoch": None, "train_cpu_s": None}
    cpu0 = time.process_time()
    if not done.is_file():  # a finished re-training in --workdir is reused (no training CPU time then)
        out.update(run_bundle(VARIANT + ["early_stopping.json"], run_dir, seed=seed, run=["$@train#trainer.run()"], **fixed, **train))
        out["train_cpu_s"] = time.process_time() - cpu0
    cpu1 = time.process_time()
    for bn in BN:
        run_bundle(VARIANT + ["evaluate.json"], run_dir, seed=seed, bn_inference=bn, **fixed, **common)
        out[f"accuracy_{bn}"] = json.loads((run_dir / "eval" / "summary.json").read_text())["mean_accuracy"]
        val_dir = run_dir / "eval_val"
        run_bundle(VARIANT + ["evaluate.json"], run_dir, seed=seed, bn_inference=bn, output_dir=str(val_dir),
                   **{"validate#dataset": VALIDATION_SPLIT}, **fixed, **common)
        out[f"val_accuracy_{bn}"] = json.loads((val_dir / "summary.json").read_text())["mean_accuracy"]
    out["eval_cpu_s"] = time.process_time() - cpu1
    return out


def table_config(args: argparse.Namespace, search: dict) -> dict:
    """A re-training record's config: the script's arguments without the per-process ones and without the
    number of draws, plus the condition, the search's overrides and the best-draw rule."""
    config = run_config(args, drop=("seeds", "json", "merge", "workdir", "record", "record_tag", "random", "threads", "search_only"))
    config.update(condition=condition_of(args), search_overrides=search, selection=SELECTION)
    return config


def condition_of(args: argparse.Namespace) -> str:
    return f"identical_digit{args.identical_digit}" if args.identical_tasks else "distinct"


def protocol_differs(a: dict, b: dict) -> list[str]:
    """The :data:`PROTOCOL` keys in which two records' configs differ."""
    return [k for k in PROTOCOL if a.get(k) != b.get(k)]


def existing_record(args: argparse.Namespace, run: str, seed: int, config: dict) -> dict | None:
    """The record of ``run`` (e.g. ``random2_3``) and ``seed`` from an earlier ``--record`` run, or None;
    one of another protocol is refused (SystemExit naming the keys), never overwritten or mixed."""
    path = record_path(BENCHMARK, tagged(args, f"{run}_seed{seed}"))
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    differ = protocol_differs(rec["config"], config)
    if differ:
        raise SystemExit(f"{path} was written under another protocol (differs in {differ}); "
                         "use another --record_tag or move it away")
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--random", type=int, default=8, help="random policies of each kind per seed (the paper: 8, best reported)")
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
    p.add_argument("--record", action="store_true",
                   help="write one record per re-training to results/adashare_tables/ and skip those already recorded "
                        "(with --search_only: one record per search to results/adashare_null/)")
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
    config = table_config(args, search)
    for seed in args.seeds:
        rng = np.random.default_rng(1000 + seed)
        prior = existing_record(args, "learned", seed, config) if args.record and not args.search_only else None
        if prior is not None:  # the seed's learned policy is recorded: no need to search again
            m = prior["metrics"]
            alpha, learned, spread = np.array(m["alpha"]), np.array(m["policy"], dtype=bool), np.array(m["alpha_task_spread"])
            res = {"alpha": alpha.tolist(), "policy": learned.astype(int).tolist(), "alpha_task_spread": spread.tolist(),
                   "search_cpu_s": prior["timings"].get("search_cpu_s"), "best": m.get("search_best_epoch")}
            print(f"seed {seed}: learned policy from {BENCHMARK} record {prior['name']}; blocks executed per task "
                  f"{learned.sum(1).tolist()}", flush=True)
        else:
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
        if args.record and args.search_only:
            condition = condition_of(args)
            null_config = {k: v for k, v in vars(args).items() if k not in ("seeds", "json", "merge", "workdir", "record", "record_tag")}
            null_config.update(condition=condition, search_overrides=search)
            write_record("adashare_null", f"{args.record_tag + '_' if args.record_tag else ''}{condition}_seed{seed}", config=null_config, seed=seed,
                         metrics={"mean_alpha_task_spread": float(spread.mean()), "alpha_task_spread": spread.tolist(),
                                  "alpha": alpha.tolist(), "policy": learned.astype(int).tolist(), "best_epoch": res.get("best")},
                         timings={"search_cpu_s": res["search_cpu_s"]})
        if not args.search_only:
            res["retrain"] = {}
            for name, pol in seed_policies(learned, args.random, rng).items():
                rec = (prior if name == "learned" else existing_record(args, name, seed, config)) if args.record else None
                if rec is not None:  # recorded by an earlier run of this protocol: skipped
                    out = {k: rec["metrics"][k] for k in ("epochs", "best_epoch", *(f"{a}accuracy_{bn}" for a in ("", "val_") for bn in BN))}
                    res["retrain"][name] = {**out, "policy": rec["metrics"]["policy"]}
                    print(f"  {name:10s} recorded ({rec['name']}): skipped", flush=True)
                    continue
                out = retrain(root / f"{name}_seed{seed}", pol, seed, common, train)
                res["retrain"][name] = {**out, "policy": pol.astype(int).tolist()}
                print(f"  {name:10s} test accuracy {100 * out['accuracy_batch']:.2f} % (test-batch BN) / {100 * out['accuracy_population']:.2f} % "
                      f"(running BN); validation {100 * out['val_accuracy_batch']:.2f} / {100 * out['val_accuracy_population']:.2f} %; "
                      f"{out['epochs']} epochs (best {out['best_epoch']})", flush=True)
                if args.record:
                    kind, draw = kind_and_draw(name)
                    metrics = {"kind": kind, "draw": draw, "policy": pol.astype(int).tolist(), "block_counts": block_counts(pol),
                               **{k: v for k, v in out.items() if not k.endswith("cpu_s")}}
                    if kind == "learned":
                        metrics.update(alpha=res["alpha"], alpha_task_spread=res["alpha_task_spread"], search_best_epoch=res.get("best"))
                    write_record(BENCHMARK, tagged(args, f"{name}_seed{seed}"), config={**config, "kind": kind, "draw": draw}, seed=seed,
                                 metrics=metrics, timings={"cpu_s": out["train_cpu_s"], "eval_cpu_s": out["eval_cpu_s"],
                                                           **({"search_cpu_s": res["search_cpu_s"]} if kind == "learned" else {})})
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


BN_LABEL = {"batch": "test-batch BN", "population": "running BN"}
#: the table's rows: (key, label); a random kind's rows are the mean of its draws and its best draw
ROWS = (("learned", "learned policy"), ("hard", "hard sharing (every task runs every block)"),
        ("random1 mean", "Random #1 (same total number of skipped blocks), mean of draws"),
        ("random1 best", "Random #1, best draw by validation"),
        ("random2 mean", "Random #2 (same number of skipped blocks per task), mean of draws"),
        ("random2 best", "Random #2, best draw by validation"))
#: the paired comparisons, a minus b by seed: Tables 5, 6's order (hard < Random #1 < Random #2 < learned)
COMPARISONS = (("learned", "hard"), ("learned", "random1 best"), ("learned", "random2 best"), ("random2 best", "random1 best"))


def best_draw(draws: list[tuple[int, dict]], bn: str) -> tuple[int, dict]:
    """The draw with the highest validation accuracy under ``bn`` (the first of equals, by draw number):
    chosen on the validation split, so the reported test accuracy is not the maximum of several test scores."""
    key = f"val_accuracy_{bn}"
    missing = [d for d, r in draws if key not in r]
    if missing:
        raise ValueError(f"draws {missing} have no {key}: the best draw is chosen by validation accuracy, "
                         "and these results were written without it")
    return max(sorted(draws, key=lambda dr: dr[0]), key=lambda dr: dr[1][key])


def row_values(runs: dict[int, dict[str, dict]]) -> dict[str, dict[str, dict[int, float]]]:
    """Test accuracy per row of :data:`ROWS`, batch-norm protocol and seed, from ``runs`` (seed -> run
    name (``learned``, ``hard``, ``random1_<i>``, ...) -> its accuracies)."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for seed, by_run in runs.items():
        for kind in ("learned", "hard"):
            if kind in by_run:
                for bn in BN:
                    out.setdefault(kind, {}).setdefault(bn, {})[seed] = by_run[kind][f"accuracy_{bn}"]
        for kind in ("random1", "random2"):
            draws = sorted((d, r) for n, r in by_run.items() for k, d in [kind_and_draw(n)] if k == kind)
            if not draws:
                continue
            for bn in BN:
                out.setdefault(f"{kind} mean", {}).setdefault(bn, {})[seed] = float(np.mean([r[f"accuracy_{bn}"] for _, r in draws]))
                out.setdefault(f"{kind} best", {}).setdefault(bn, {})[seed] = best_draw(draws, bn)[1][f"accuracy_{bn}"]
    return out


def draw_counts(runs: dict[int, dict[str, dict]]) -> str:
    """The number of random draws of each kind per seed, as a sentence part."""
    counts = {s: tuple(sum(kind_and_draw(n)[0] == k for n in by_run) for k in ("random1", "random2")) for s, by_run in runs.items()}
    if len(set(counts.values())) == 1:
        n1, n2 = next(iter(counts.values()))
        return (f"{n1} draw{'s' * (n1 != 1)} of Random #1 and {n2} of Random #2 per seed" if n1 != n2
                else f"{n1} draw{'s' * (n1 != 1)} of each random kind per seed")
    return "draws (Random #1 / #2) per seed: " + ", ".join(f"seed {s}: {n1} / {n2}" for s, (n1, n2) in sorted(counts.items()))


def table_lines(runs: dict[int, dict[str, dict]]) -> list[str]:
    """The Markdown table of the rows (mean ± sample std over seeds per batch-norm protocol) and of the
    paired comparisons by seed (``mtl_med.metrics.stats.paired_comparison``, ``seeds_needed``)."""
    from mtl_med.metrics.stats import format_mean_std, format_p, paired_comparison, seeds_needed

    values = row_values(runs)
    lines = ["| policy | seeds | " + " | ".join(f"test accuracy, {BN_LABEL[bn]} (mean ± std)" for bn in BN) + " |",
             "| --- | --- | " + " | ".join("---" for _ in BN) + " |"]
    for key, label in ROWS:
        if key in values:
            seeds = sorted(values[key][BN[0]])
            cells = [format_mean_std([values[key][bn][s] for s in seeds], 100.0, unit=" %") for bn in BN]
            lines.append(f"| {label} | {len(seeds)} | " + " | ".join(cells) + " |")
    lines += ["", "| a - b (test accuracy, points) | BN statistics | paired by seed | mean difference (95 % CI) | "
              "seeds a won / tied / lost | paired t p | Wilcoxon p | seeds for p < 0.05 at this difference and spread |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    label = dict(ROWS) | {"learned": "learned", "hard": "hard sharing", "random1 best": "Random #1 best", "random2 best": "Random #2 best"}
    for a, b in COMPARISONS:
        if a not in values or b not in values:
            continue
        for bn in BN:
            seeds = sorted(set(values[a][bn]) & set(values[b][bn]))
            if not seeds:
                continue
            t = paired_comparison([100 * values[a][bn][s] for s in seeds], [100 * values[b][bn][s] for s in seeds])
            ci = f"{t.ci_low:+.2f} to {t.ci_high:+.2f}" if np.isfinite(t.ci_low) else "no CI"
            need = (str(seeds_needed(abs(t.mean_diff), t.std_diff)) if t.mean_diff != 0 and np.isfinite(t.std_diff) and t.std_diff > 0
                    else "n/a")
            lines.append(f"| {label[a]} - {label[b]} | {BN_LABEL[bn]} | {', '.join(map(str, seeds))} | {t.mean_diff:+.2f} ({ci}) | "
                         f"{t.wins} / {t.ties} / {t.losses} | {format_p(t.t_p)} | {format_p(t.wilcoxon_p)} | {need} |")
    return lines


def print_table(results: dict[int, dict]) -> None:
    seeds = sorted(results)
    print(f"\nAdaShare on digits (10 one-vs-all tasks, ResNet-18): learned policy vs hard sharing and random policies; seeds {seeds}")
    spread = np.array([np.mean(results[s]["alpha_task_spread"]) for s in seeds])
    print(f"alpha spread between tasks (mean over blocks of max - min over tasks): {spread.mean():.3f} ± {spread.std(ddof=1) if len(spread) > 1 else 0:.3f}")
    runs = {s: results[s]["retrain"] for s in seeds}
    print(f"{draw_counts(runs)}; best draw: {SELECTION}")
    print("\n".join(table_lines(runs)))


def render(results: Path) -> str:
    """The table of ``docs/reproduction.md`` from the records ``results/adashare_tables/*.json`` (``--record``):
    per row (learned, hard sharing, each random kind's mean of draws and its best draw by validation) the test
    accuracy over seeds under each batch-norm protocol, and the paired comparisons of :data:`COMPARISONS` by seed.
    Records of different protocols (:data:`PROTOCOL`) are refused, as are two records of one run."""
    from report import load, machine_line, revisions

    recs = load(results, BENCHMARK)
    first = recs[0]
    for r in recs:
        differ = protocol_differs(r["config"], first["config"])
        if differ:
            raise ValueError(f"{BENCHMARK}: {r['name']} differs from {first['name']} in {differ}")
    runs: dict[int, dict[str, dict]] = {}
    for r in recs:
        m = r["metrics"]
        run = m["kind"] if m["draw"] is None else f"{m['kind']}_{m['draw']}"
        if run in runs.setdefault(r["seed"], {}):
            raise ValueError(f"{BENCHMARK}: two records of {run}, seed {r['seed']} ({r['name']} and another)")
        runs[r["seed"]][run] = m
    cfg = first["config"]
    learned = {s: by_run["learned"] for s, by_run in sorted(runs.items()) if "learned" in by_run}
    executed = "; ".join(f"seed {s}: {sum(m['block_counts']['executed_per_task'])}" for s, m in learned.items())
    blocks = first["metrics"]["block_counts"]
    cpu = [r["timings"]["cpu_s"] for r in recs if r["timings"].get("cpu_s") is not None]
    epochs = [r["metrics"]["epochs"] for r in recs if r["metrics"].get("epochs") is not None]
    threads = sorted({str((r.get("machine") or {}).get("torch_threads", "unknown")) for r in recs})
    search = ", ".join(f"{k} {v}" for k, v in sorted(cfg.get("search_overrides", {}).items())) or "the variant's defaults"
    lines = table_lines(runs)
    lines += ["", f"AdaShare on digits, ten one-vs-all tasks (`{cfg.get('condition', 'distinct')}`), ResNet-18 width "
              f"x{cfg['width']} ({blocks['blocks']} blocks), {cfg['image_size']}x{cfg['image_size']} images; search: {search}. "
              f"Every policy re-trained from scratch from the seed's same initial weights (early stopping on validation, patience "
              f"{cfg['patience']}, at most {cfg['max_epochs']} epochs"
              + (f"; {min(epochs)}-{max(epochs)} epochs run" if epochs else "") + "), its best validation checkpoint tested with "
              "test-batch and with running batch-norm statistics. Random #1 skips as many blocks in total as the seed's learned "
              "policy, Random #2 as many per task; hard sharing runs every block for every task. "
              f"{draw_counts(runs)} (the paper: eight); best draw: {SELECTION}. Task-blocks run by the learned policy "
              f"(of {len(blocks['executed_per_task']) * blocks['blocks']}): {executed}. Mean ± sample std over seeds; "
              "differences paired by seed (`mtl_med.metrics.stats.paired_comparison`); the last column is "
              "`seeds_needed` at the observed difference and spread.",
              "", f"Records: `results/{BENCHMARK}/*.json`; "
              + (f"re-training {np.mean(cpu):.0f} CPU-s a run on average ({min(cpu):.0f}-{max(cpu):.0f}), " if cpu else "")
              + f"torch threads {'/'.join(map(str, threads))}, {machine_line(recs)}; code {revisions(recs)}."]
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
