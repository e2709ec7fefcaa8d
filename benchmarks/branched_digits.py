"""Branched multi-task networks on the digits default of the vision bundle: affinity, trees under three
budgets, and their test accuracy against hard sharing, single-task networks and random trees.

Runs the bundle's own configs (bundles/vision_multitask): ``affinity.json`` once (ten single-task
networks of seed 0, RSA affinity at VGG-11's four blocks), the paper's beam search for the tree at
each ``--fractions`` of the way from hard sharing to single-task networks, then for each seed the
``branched`` variant on that tree, on a random tree with the same branches per block (so the same
parameter count), and hard sharing, each with early stopping on the validation mean accuracy and
tested on the test split. Single-task networks are the ten encoders themselves, each tested on its
own task. Prints the affinity per block (mean over task pairs: does it fall with depth, as fig. 2a?),
the trees, and a table of accuracy (mean ± std over seeds) and parameters; the time of the affinity
stage relative to one single-task training. A benchmark prints; it never asserts.

    python benchmarks/branched_digits.py                      # the settings of the bundle README
    python benchmarks/branched_digits.py --seeds 0 --max_epochs 2 --fractions 0.5
    python benchmarks/branched_digits.py --merge a.json b.json        # runs of other seeds on copies of one workdir
    python benchmarks/branched_digits.py --same-task-control --seeds 0 1 2 3 4 5 --record --record_tag digits

``--same-task-control`` runs only the affinity stage, once per seed of ``--seeds``, and measures the
noise ceiling of the affinity: the seeds are paired in order ((0, 1), (2, 3), ...) and each task's
single-task network of one seed of a pair is compared with the same task's network of the other seed,
at every block, with exactly the measure of the distinct-task affinities (one call of
``BranchedSearch.affinity_of`` for every network of every seed, on the K held-out images of the
seed-0 stage). Records (``results/branched_affinity/``): per seed the distinct-task affinity tensor,
per seed pair the same-task affinities and the distinct-task affinities across the two seeds;
``benchmarks/report.py`` renders the comparison (table ``branched_affinity``).
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

from records import add_record_arguments, code_revision, machine, run_config, tagged, write_record
from vision_digits import BUNDLE, check_data, data_overrides, describe, run_bundle

from mtl_med.sharing.branched import canonical_tree, load_affinity, load_tree_json, save_tree_json, search_beam, tree_params
from mtl_med.sharing.branched.trees import budget_from_fraction


def random_tree(like: list[list[int]], rng: np.random.Generator) -> list[list[int]]:
    """A random chain of refining partitions with the branch count of ``like`` at every block."""
    counts = [len(set(row)) for row in like]
    groups, out = [list(range(len(like[0])))], []
    for b in counts:
        groups = [list(g) for g in groups]
        while len(groups) < b:  # split a random splittable group in two random non-empty parts
            g = groups.pop(int(rng.choice([i for i, g in enumerate(groups) if len(g) > 1])))
            perm = list(rng.permutation(g))
            cut = int(rng.integers(1, len(g)))
            groups += [sorted(perm[:cut]), sorted(perm[cut:])]
        row = [0] * len(like[0])
        for label, g in enumerate(groups):
            for t in g:
                row[t] = label
        out.append(row)
    return canonical_tree(out)


def test_accuracy(run_dir: Path, configs: list[str], **overrides) -> dict:
    run_bundle(configs + ["evaluate.json"], run_dir, **overrides)
    return json.loads((run_dir / "eval" / "summary.json").read_text())


def table(args: argparse.Namespace, single: dict, results: dict, n_tasks: int, hard_params: int) -> None:
    """Accuracy per model (mean ± std over seeds) and each searched tree against the random trees of the same
    seeds and against hard sharing, paired by seed (mean difference, seeds won, paired t-test)."""
    from scipy.stats import ttest_rel

    seeds = sorted({int(s) for by_seed in results.values() for s in by_seed})
    print(f"\n{describe(args)}; VGG-11 (BN) width x{args.width}, {args.image_size}x{args.image_size}; early stopping "
          f"(patience {args.patience}, cap {args.max_epochs}); seeds {seeds}; single-task networks: seed 0 only")
    print("| model | mean accuracy (mean ± std) | parameters |")
    print("| --- | --- | --- |")
    print(f"| single-task networks | {100 * np.mean(list(single.values())):.2f} % (seed 0) | {n_tasks} x {hard_params} |")
    for name, by_seed in results.items():
        acc = np.array([r["accuracy"] for r in by_seed.values()])
        sd = acc.std(ddof=1) if len(acc) > 1 else 0.0
        print(f"| {name} | {100 * acc.mean():.2f} ± {100 * sd:.2f} % | {next(iter(by_seed.values()))['params']} |")
    print("\n| searched tree | against | mean difference (points) | seeds won | paired t-test p |")
    print("| --- | --- | --- | --- | --- |")
    for name in [n for n in results if n.startswith("searched")]:
        for other in (name.replace("searched", "random"), "hard sharing"):
            common = sorted(set(results[name]) & set(results.get(other, {})), key=int)
            if len(common) < 2:
                continue
            a = np.array([results[name][s]["accuracy"] for s in common])
            b = np.array([results[other][s]["accuracy"] for s in common])
            p = ttest_rel(a, b).pvalue if np.ptp(a - b) > 0 else float("nan")
            print(f"| {name} | {other} | {100 * (a - b).mean():+.2f} | {int((a > b).sum())} of {len(common)} | {p:.2f} |")


def affinity_record(a) -> dict:
    """The affinity stage's matrices and names, as kept in the JSON for the figure."""
    return {"affinity": a.affinity.tolist(), "task_names": list(a.task_names), "location_names": list(a.location_names)}


def figure(path: str, affinity: dict | None, trees: dict, results: dict) -> None:
    """Two panels: the affinity of every task pair against depth (fig. 2a, one line per pair), and per
    budget the searched tree's accuracy minus the random tree's of the same seed (one dot per seed, the
    mean with its 95 % confidence interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import t as student

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [1.2, 1]})
    ax = axes[0]
    if affinity:
        A, names, blocks = np.array(affinity["affinity"]), affinity["task_names"], affinity["location_names"]
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                ax.plot(range(1, len(blocks) + 1), A[:, i, j], marker="o", label=f"{names[i]} / {names[j]}")
        ax.set_xticks(range(1, len(blocks) + 1), blocks)
        ax.legend(fontsize=6, ncol=2)
    ax.set_ylabel("RSA task affinity")
    ax.set_title("affinity falls with depth (fig. 2a)", fontsize=9)
    ax = axes[1]
    rng = np.random.default_rng(0)  # horizontal jitter only
    for k, f in enumerate(trees):
        name, other = f"searched tree @{float(f)}", f"random tree @{float(f)}"
        common = sorted(set(results.get(name, {})) & set(results.get(other, {})), key=int)
        if len(common) < 2:
            continue
        d = 100 * np.array([results[name][s]["accuracy"] - results[other][s]["accuracy"] for s in common])
        half = student.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        ax.scatter(k + rng.uniform(-0.15, 0.15, len(d)), d, s=10, alpha=0.6)
        ax.errorbar(k + 0.3, d.mean(), yerr=half, fmt="ks", capsize=4)
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(trees)), [f"{float(f)} of the budget" for f in trees])
    ax.set_xlim(-0.5, len(trees) - 0.4)
    ax.set_ylabel("searched minus random (points)")
    ax.set_title("searched vs random trees, paired by seed\n(dots: seeds; square: mean, 95 % CI)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"figure: {path}")


#: the seed of the benchmark's affinity stage, whose held-out images the same-task control measures on
AFFINITY_SEED = 0
#: arguments of the tree and accuracy runs, not of the control's records
CONTROL_DROP = ("seeds", "json", "merge", "workdir", "record", "record_tag", "figure", "fractions", "max_epochs", "patience")


def stage_overrides(args: argparse.Namespace, common: dict) -> dict:
    """The affinity stage's bundle overrides (``train.json`` + ``affinity.json``) apart from the seed."""
    return dict(affinity_images=args.affinity_images, max_epochs=args.encoder_epochs,
                encoder_config=[str(BUNDLE / "configs" / "train.json")], **common)


def branched_search(stage_dir: Path, seed: int, overrides: dict):
    """The bundle's ``branched_search`` of the affinity stage in ``stage_dir`` at ``seed`` (as the stage
    builds it), for measuring the affinity of other checkpoints with the stage's protocol."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[str(BUNDLE / "configs" / c) for c in ("train.json", "affinity.json")],
                        meta_file=str(BUNDLE / "configs" / "metadata.json"), logging_file=False, workflow_type=None,
                        bundle_root=str(stage_dir), seed=seed, **overrides)
    wf.initialize()
    return wf, wf.parser.get_parsed_content("branched_search")


def network_name(task: str, seed: int) -> str:
    return f"{task}@seed{seed}"


def control_metrics(A: np.ndarray, tasks: list[str], names: list[str], seed: int, other: int | None = None) -> dict:
    """From the affinity ``A`` (D, M, M) of every network (rows ``names``, see :func:`network_name`): with
    ``other`` None, the distinct-task affinity of ``seed`` (the (D, N, N) block of its networks and its
    mean over the N (N - 1) / 2 task pairs per block); else the same-task affinity of ``seed`` against
    ``other`` (task t of one seed with task t of the other, (D, N), and its mean over tasks) and the
    distinct-task affinity across the two seeds ((D, N, N), rows ``seed``, columns ``other``; its mean over
    the N (N - 1) ordered pairs of different tasks)."""
    row = [names.index(network_name(t, seed)) for t in tasks]
    n = len(tasks)
    off = ~np.eye(n, dtype=bool)
    if other is None:
        block = A[:, row][:, :, row]
        upper = np.triu_indices(n, 1)
        return {"affinity": block, "mean_over_pairs": block[:, upper[0], upper[1]].mean(axis=1)}
    col = [names.index(network_name(t, other)) for t in tasks]
    cross = A[:, row][:, :, col]
    same = np.stack([np.diag(c) for c in cross])
    return {"same_task": same, "mean_same_task": same.mean(axis=1), "distinct_other_seed": cross,
            "mean_distinct_other_seed": np.stack([c[off].mean() for c in cross])}


def same_task_control(p: argparse.ArgumentParser, args: argparse.Namespace, root: Path, common: dict) -> None:
    """The affinity stage at every seed of ``--seeds``, then every network's affinity with every other on
    the seed-0 stage's held-out images: distinct tasks within a seed against the same task across the two
    seeds of a pair. Writes one record per seed and one per pair with ``--record``; prints the table."""
    seeds = list(args.seeds)
    if len(seeds) < 2 or len(seeds) % 2 or len(set(seeds)) != len(seeds):
        p.error(f"--same-task-control pairs the seeds in order, (s0, s1), (s2, s3), ...: give an even number of distinct seeds, got {seeds}")
    pairs = list(zip(seeds[0::2], seeds[1::2]))
    over = stage_overrides(args, common)
    stage: dict[int, dict] = {}
    for s in seeds:  # the affinity stage as the benchmark runs it, at each seed
        d = root / f"affinity_stage_seed{s}"
        reused = sorted(c.parent.name for c in (d / "affinity" / "single_task").glob("*/model_final.pt"))
        cpu0 = time.process_time()
        run_bundle(["train.json", "affinity.json"], d, seed=s, **over)
        stage[s] = {"dir": d, "cpu_s": time.process_time() - cpu0, "encoders_reused": reused}
        print(f"affinity stage, seed {s}: {stage[s]['cpu_s']:.0f} CPU-s" + (f" (encoders reused: {reused})" if reused else ""), flush=True)
    tasks = list(load_tree_json(stage[seeds[0]]["dir"] / "affinity" / "tree.json")["task_names"])
    checkpoints = {network_name(t, s): stage[s]["dir"] / "affinity" / "single_task" / t / "model_final.pt" for s in seeds for t in tasks}
    cpu0 = time.process_time()
    wf, search = branched_search(root / f"affinity_stage_seed{seeds[0]}", AFFINITY_SEED, over)
    try:
        result = search.affinity_of(checkpoints)
    finally:
        wf.finalize()
    measure_cpu = time.process_time() - cpu0
    A, names = np.asarray(result.affinity), list(result.task_names)
    cfg = dict(tasks=tasks, seeds=seeds, pairs=[list(q) for q in pairs], image_seed=AFFINITY_SEED, num_images=result.num_images,
               location_names=list(result.location_names), center_features=result.center_features)
    records = []
    for s in seeds:
        m = control_metrics(A, tasks, names, s)
        own = load_affinity(stage[s]["dir"] / "affinity" / "affinity.npz")  # the stage's own measurement (images drawn with seed s)
        m["stage_affinity"] = own.affinity
        records.append(("distinct", s, None, m, {"stage_cpu_s": stage[s]["cpu_s"], "encoders_reused": stage[s]["encoders_reused"]}))
    for s, o in pairs:
        records.append(("same_task", s, o, control_metrics(A, tasks, names, s, o), {"affinity_cpu_s": measure_cpu}))
    out = []
    for kind, s, o, m, timing in records:
        name = f"{kind}_seed{s}" + (f"_seed{o}" if o is not None else "")
        config = run_config(args, drop=CONTROL_DROP, kind=kind, other_seed=o, **cfg)
        rec = {"benchmark": "branched_affinity", "name": tagged(args, name), "seed": s, "config": config, "metrics": m, "timings": timing,
               "code": code_revision(), "machine": machine()}
        out.append(json.loads(json.dumps(rec, default=lambda x: x.tolist())))
        if args.record:
            write_record("branched_affinity", tagged(args, name), config=config, seed=s, metrics=m, timings=timing)
    print(f"\n{describe(args)}; VGG-11 (BN) width x{args.width}, {args.image_size}x{args.image_size}; single-task networks of "
          f"{args.encoder_epochs} epochs; seeds {seeds} (pairs {pairs}); RSA on {result.num_images} held-out images (drawn with seed "
          f"{AFFINITY_SEED}); affinity of {len(checkpoints)} networks {measure_cpu:.0f} CPU-s\n")
    from report import branched_affinity_table

    print(branched_affinity_table(out), end="")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    p.add_argument("--max_epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=8)
    p.add_argument("--encoder_epochs", type=int, default=20, help="epochs of each single-task network")
    p.add_argument("--dataset", default="digits", choices=["digits", "placed_digits"],
                   help="placed_digits: the digits at a random place of a 16x16 canvas, with --tasks mixing where and what")
    p.add_argument("--tasks", nargs="+", default=None, help="placed_digits' tasks (binary ones: left top odd large)")
    p.add_argument("--image_size", type=int, default=16)
    p.add_argument("--width", type=float, default=0.15625)
    p.add_argument("--affinity_images", type=int, default=250, help="K held-out images (the validation split has 270)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None, help="where runs are written; with --merge, where the affinity stage is read for --figure")
    add_record_arguments(p)
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="print the table of earlier --json files (e.g. one process per group of seeds, on copies of one affinity stage) and exit")
    p.add_argument("--figure", default=None, help="also draw the affinity against depth and the searched-minus-random differences to this PNG")
    p.add_argument("--same-task-control", dest="same_task_control", action="store_true",
                   help="only the affinity stage, at each of --seeds (paired in order), and each task's affinity with itself trained with "
                        "the other seed of its pair against the distinct-task affinities; records go to results/branched_affinity/")
    args = p.parse_args()
    if args.merge:
        runs = []
        for f in args.merge:
            try:
                runs.append(json.loads(Path(f).read_text()))
            except (OSError, ValueError) as e:
                p.error(f"--merge: cannot read {f}: {e}")
        if any(r["trees"] != runs[0]["trees"] for r in runs):
            p.error("--merge: the files come from different trees (different affinity stages or settings)")
        results: dict[str, dict] = {}
        for r in runs:
            for name, by_seed in r["results"].items():
                results.setdefault(name, {}).update(by_seed)
        aff = next((r["affinity"] for r in runs if r.get("affinity")), None)
        if args.figure and aff is None and args.workdir:  # files written before the affinity was kept in them
            npz = Path(args.workdir) / "affinity_stage" / "affinity" / "affinity.npz"
            try:
                aff = affinity_record(load_affinity(npz))
            except (OSError, ValueError) as e:
                p.error(f"--figure: cannot read the affinity {npz}: {e}")
        first = runs[0]
        table(argparse.Namespace(**first["args"]), first["single"], results, len(first["single"]),
              next(iter(results["hard sharing"].values()))["params"])
        if args.figure:
            figure(args.figure, aff, first["trees"], results)
        return
    check_data(p, args)
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="branched_digits_"))
    common = dict(image_size=args.image_size, width=args.width, batch_size=64, **data_overrides(args))
    if args.same_task_control:
        same_task_control(p, args, root, common)
        return
    train = dict(common, max_epochs=args.max_epochs, patience=args.patience)

    # stage 1: one single-task network per task (seed 0), affinity, the tree at the middle budget
    aff_root = root / "affinity_stage"
    cpu0 = time.process_time()
    # encoders train for a fixed number of epochs: the validation score averages every task's head,
    # and only one is trained, so it cannot pick a single-task network's best epoch
    run_bundle(["train.json", "affinity.json"], aff_root, seed=AFFINITY_SEED, **stage_overrides(args, common))
    stage_cpu = time.process_time() - cpu0
    cpu0 = time.process_time()  # again, the encoders reused: the affinity and the search alone
    run_bundle(["train.json", "affinity.json"], aff_root, seed=AFFINITY_SEED, **stage_overrides(args, common))
    search_cpu = time.process_time() - cpu0
    record = load_tree_json(aff_root / "affinity" / "tree.json")
    encoder_cpu = (stage_cpu - search_cpu) / len(record["task_names"])
    a = load_affinity(aff_root / "affinity" / "affinity.npz")
    tasks = list(record["task_names"])
    off = ~np.eye(len(tasks), dtype=bool)
    print("affinity per block (mean / min / max over task pairs): " + "; ".join(
        f"{name} {A[off].mean():.3f} / {A[off].min():.3f} / {A[off].max():.3f}" for name, A in zip(a.location_names, a.affinity)), flush=True)

    # single-task networks: each encoder on its own task; the time of one training
    single = {}
    for t in tasks:
        enc = aff_root / "affinity" / "single_task" / t
        s = test_accuracy(enc, ["train.json"], ckpt_file=str(enc / "model_final.pt"), seed=0, **common)
        single[t] = s["tasks"][t]["accuracy"]["mean"]
    print(f"single-task networks (seed 0, {args.encoder_epochs} epochs): mean accuracy {np.mean(list(single.values())):.4f}; one single-task "
          f"training {encoder_cpu:.0f} CPU-s; affinity ({args.affinity_images} images) and search {search_cpu:.0f} CPU-s "
          f"({search_cpu / encoder_cpu:.2f}x one single-task training)", flush=True)

    # trees under each budget
    dis, block, fixed = 1.0 - a.affinity, record["block_params"], record["fixed_params"]
    trees = {}
    for f in args.fractions:
        budget = budget_from_fraction(f, block, len(tasks), fixed, first_shared=1)
        found = search_beam(dis, block, budget, fixed_params=fixed, first_shared=1)
        trees[f] = found["config"]
        print(f"budget fraction {f}: {budget} parameters -> tree {found['config']} (cost {found['cost']:.3f}, {found['params']} parameters)", flush=True)

    results: dict[str, dict] = {}

    def record_run(name, seed, summary, params):
        results.setdefault(name, {})[seed] = {"accuracy": summary["mean_accuracy"], "params": params}
        if args.record:
            write_record("branched_digits", tagged(args, f"{name}_seed{seed}"), config=run_config(args, model=name, trees=trees), seed=seed,
                         metrics={"accuracy": summary["mean_accuracy"], "params": params, "summary": summary,
                                  "random_tree": random_trees.get(seed)})
        print(f"{name:22s} seed {seed}: accuracy {summary['mean_accuracy']:.4f}  {params} parameters", flush=True)

    random_trees: dict[int, dict] = {}

    def save():  # after every seed, so that a stopped run keeps the seeds it finished
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "single": single, "trees": {str(k): v for k, v in trees.items()},
                                                   "random_trees": random_trees, "results": results, "encoder_cpu_s": encoder_cpu,
                                                   "affinity_search_cpu_s": search_cpu, "affinity": affinity_record(a)}, indent=2))

    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        run_dir = root / f"hard_seed{seed}"
        run_bundle(["train.json", "early_stopping.json"], run_dir, seed=seed, sharing="hard_sharing", **train)
        record_run("hard sharing", seed, test_accuracy(run_dir, ["train.json"], seed=seed, sharing="hard_sharing", **common),
                   tree_params([[0] * len(tasks)] * len(block), block, fixed))
        for f, tree in trees.items():
            random_trees.setdefault(seed, {})[str(f)] = shuffled = random_tree(tree, rng)
            for kind, cfg in (("searched", tree), ("random", shuffled)):
                run_dir = root / f"{kind}_{f}_seed{seed}"
                tree_file = run_dir / "tree.json"
                run_dir.mkdir(parents=True, exist_ok=True)
                save_tree_json(tree_file, cfg, tasks)
                configs = ["train.json", "variants/branched.json"]
                run_bundle(configs + ["early_stopping.json"], run_dir, seed=seed, tree_file=str(tree_file), **train)
                record_run(f"{kind} tree @{f}", seed, test_accuracy(run_dir, configs, seed=seed, tree_file=str(tree_file), **common),
                           tree_params(cfg, block, fixed))
        save()

    table(args, single, results, len(tasks), tree_params([[0] * len(tasks)] * len(block), block, fixed))
    if args.figure:
        figure(args.figure, affinity_record(a), {str(k): v for k, v in trees.items()}, results)


if __name__ == "__main__":
    main()
