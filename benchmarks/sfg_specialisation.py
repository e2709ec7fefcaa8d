"""Does SFG learn the architectures of the SFG paper? Fig. 6, appendix E and section 5.4 on a CPU.

SFG-VGG11 (the vision bundle's ``sfg`` variant) on the placed-digits pair
(``mtl_med.data.vision.load_placed_digits``: 8x8 digits pasted at a random place of a 16x16 image).
Like the paper's age + gender, the pair is a regression and a classification that share low-level
features (strokes, edges) but need different deep ones: *where* the digit is (``column``, translation
equivariant) and *what* it is (``odd``, translation invariant). Three experiments, each through the
bundle's own train.json + variants/sfg.json:

- ``unrelated`` (fig. 6): ``column`` + ``odd``; the paper finds every first-layer kernel shared and
  task-specific groups growing with depth.
- ``duplicate`` (appendix E): ``odd`` + a copy of it; the paper finds the last layer balanced
  (kernels near ``p = [1/3, 1/3, 1/3]``), unlike two distinct tasks.
- ``init`` (section 5.4): the unrelated pair from the four starts of ``p``: dominantly shared
  ``[0.2, 0.6, 0.2]``, dominantly task-specific ``[0.45, 0.1, 0.45]``, Dirichlet(1, 1, 1) and the
  constant mask; the paper finds the first three converge to similar groupings, the fourth slower.

Per run it prints each SFG layer's proportions of kernels by most probable group ``[task 1, shared,
task 2]`` (argmax counts: the bars of fig. 6), the mean entropy of ``p`` and the validation score, then a
summary over seeds (sample std) that also gives section 5.3's measure, the class-wise probabilities summed
per group (``SFG.group_probability_sums``); the two differ whenever ``p`` is not confident. ``--figure``
draws fig. 6-style bars; ``--record`` writes one record per run to ``results/sfg_specialisation/``. A
benchmark prints; it never asserts.

The paper trains 200k iterations at Adam 1e-3 for every parameter (A.1). A CPU run of a few thousand
iterations needs a larger rate on the grouping logits (``--grouping_lr_scale``, the bundle's
``grouping_lr_scale``) and a faster temperature decay (``--tau_rate``); both are printed with the
paper's values.

    python benchmarks/sfg_specialisation.py --figure /tmp/sfg_fig6.png
    python benchmarks/sfg_specialisation.py --experiments unrelated --seeds 0 --max_epochs 5   # a smoke run
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
from scipy.stats import spearmanr

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "vision_multitask"
PAIRS = {"unrelated": ["column", "odd"], "duplicate": ["odd", "odd_2"]}
#: section 5.4's four starts of p -> the bundle's shared_init
INITS = {"shared": 0.6, "task_specific": 0.1, "dirichlet": "dirichlet", "constant_mask": "constant_mask"}
PAPER = {"grouping_lr_scale": 1.0, "tau_rate": 1e-5, "sfg_lambda2": 1e-5, "iterations": 200_000}


def train(tasks: list[str], init, seed: int, run_dir: Path, args: argparse.Namespace) -> dict:
    """One SFG training through the bundle; returns the learned grouping and the validation score."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / c) for c in ("train.json", "variants/sfg.json")],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        bundle_root=str(run_dir),
        dataset="placed_digits",
        dataset_kwargs={"tasks": tasks},
        image_size=16,
        width=args.width,
        batch_size=args.batch_size,
        seed=seed,
        max_epochs=args.max_epochs,
        shared_init=init,
        grouping_lr_scale=args.grouping_lr_scale,
        tau_rate=args.tau_rate,
        sfg_lambda2=args.lambda2,
        val_interval=args.max_epochs,
    )
    wf.initialize()
    cpu0 = time.process_time()
    try:
        wf.run()
        net = wf.parser.get_parsed_content("network_def")
        trainer, evaluator = (wf.parser.get_parsed_content(k) for k in ("train#trainer", "validate#evaluator"))
        groups = net.architecture()
        result = {
            "tasks": tasks,
            "init": init,
            "seed": seed,
            "iterations": trainer.state.iteration,
            "tau": net.temperature,
            "val_score": evaluator.state.best_metric,  # the binary tasks' mean accuracy
            "val_metrics": {k: float(v) for k, v in evaluator.state.metrics.items() if "/" in k and np.isscalar(v)},
            "cpu_s": time.process_time() - cpu0,
            # fig. 6's bars: [task 1, shared, task 2] (the project stores groups as [task 1, task 2, shared])
            "proportions": [[L["proportions"][g] for g in (groups["groups"][0], "shared", groups["groups"][1])] for L in groups["layers"]],
            # section 5.3's measure: the kernels' class-wise probabilities summed per group, over the kernels
            "probability_sums": [[net.group_probability_sums()[L["layer"]][k] for k in (0, 2, 1)] for L in groups["layers"]],
            "entropy": [L["mean_entropy"] for L in groups["layers"]],
            "mean_p": [net.grouping_probabilities()[L["layer"]].mean(0)[[0, 2, 1]].tolist() for L in groups["layers"]],
        }
    finally:
        wf.finalize()
    result["history"] = history(run_dir, tasks)  # after finalize: the curves' last events are on disk
    return result


def history(run_dir: Path, tasks: list[str], points: int = 10) -> dict[str, list]:
    """Iteration -> per-layer [task 1, shared, task 2] proportions at ``points`` evenly spaced moments of
    training, read back from the run's TensorBoard curves (the bundle's GroupingHandler)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(run_dir.rglob("events.out.tfevents*"))
    if not files:
        return {}
    ea = EventAccumulator(str(files[-1].parent), size_guidance={"scalars": 0})
    ea.Reload()
    layers = sorted({t.split("/")[1] for t in ea.Tags()["scalars"] if t.startswith("sfg/sfg.")}, key=lambda n: int(n.split(".")[-1]))
    if not layers:
        return {}
    curves = {(layer, g): {e.step: e.value for e in ea.Scalars(f"sfg/{layer}/{g}")} for layer in layers for g in (tasks[0], "shared", tasks[1])}
    steps = sorted(curves[(layers[0], "shared")])
    picked = sorted({steps[round(i * (len(steps) - 1) / (points - 1))] for i in range(points)})
    return {str(it): [[curves[(layer, g)][it] for g in (tasks[0], "shared", tasks[1])] for layer in layers] for it in picked}


def fmt(rows) -> str:
    return "  ".join("[" + " ".join(f"{v:.2f}" for v in r) + "]" for r in rows)


def _sd(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """Sample std over runs (ddof 1); nan for one run."""
    return a.std(axis, ddof=1) if a.shape[axis] > 1 else np.full(np.delete(a.shape, axis), np.nan)


def summary(results: list[dict], args: argparse.Namespace) -> None:
    print(f"\nSFG-VGG11 width x{args.width}, placed digits 16x16, {args.max_epochs} epochs "
          f"({results[0]['iterations']} iterations; paper {PAPER['iterations']}), grouping_lr_scale {args.grouping_lr_scale} "
          f"(paper {PAPER['grouping_lr_scale']}), tau_rate {args.tau_rate} (paper {PAPER['tau_rate']}), "
          f"lambda2 {args.lambda2} (paper {PAPER['sfg_lambda2']})")
    print("Proportions are argmax counts (each kernel's most probable group); section 5.3's measure, the class-wise "
          "probabilities summed per group, is the 'probability sum' column. ± is the sample std over runs (ddof 1).")
    print("| experiment | seeds | shared proportion per SFG layer, argmax counts (mean ± std) | shared probability sum per SFG layer (section 5.3) | task-specific per layer | last layer [t1, s, t2] proportions | last-layer |t1 - t2| | last-layer mean p [t1, s, t2] | last-layer entropy (nats; max 1.10) | shared vs depth (Spearman rho) | validation score |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    by = {}
    for r in results:
        by.setdefault((r["experiment"], str(r["init"])), []).append(r)
    for (exp, init), rs in by.items():
        P = np.array([r["proportions"] for r in rs])  # (runs, layers, 3)
        sh = P[..., 1]
        ts = P[..., 0] + P[..., 2]
        H = np.array([r["entropy"][-1] for r in rs])
        mp = np.mean([r["mean_p"][-1] for r in rs], 0)
        v = np.array([r["val_score"] for r in rs])
        # fig. 6: the shared proportion falls with depth (rho near -1); a run with one value everywhere has none
        rho = np.array([spearmanr(np.arange(sh.shape[1]), row).statistic if np.ptp(row) > 0 else 0.0 for row in sh])
        name = exp if exp != "init" else f"init {init}"
        S = np.array([r["probability_sums"] for r in rs]) if all("probability_sums" in r for r in rs) else None
        sums = " ".join(f"{a:.2f}±{b:.2f}" for a, b in zip(S[..., 1].mean(0), _sd(S[..., 1]))) if S is not None else "not recorded"
        print(f"| {name} | {len(rs)} | " + " ".join(f"{a:.2f}±{b:.2f}" for a, b in zip(sh.mean(0), _sd(sh)))
              + f" | {sums} | " + " ".join(f"{a:.2f}" for a in ts.mean(0)) + " | [" + " ".join(f"{a:.2f}" for a in P[:, -1].mean(0))
              + f"] | {np.abs(P[:, -1, 0] - P[:, -1, 2]).mean():.2f} ± {_sd(np.abs(P[:, -1, 0] - P[:, -1, 2])):.2f}"
              + f" | [{mp[0]:.2f} {mp[1]:.2f} {mp[2]:.2f}] | {H.mean():.2f} ± {_sd(H):.2f} | {rho.mean():+.2f} ± {_sd(rho):.2f} | {v.mean():.3f} ± {_sd(v):.3f} |")
    inits = {k[1]: np.mean([r["proportions"] for r in v], 0) for k, v in by.items() if k[0] == "init"}
    seeds = {r["seed"] for r in results if r["experiment"] == "init"}
    if "shared" not in inits and seeds:  # A.1's start is the unrelated experiment's run of the same seeds
        same = [r["proportions"] for r in results if r["experiment"] == "unrelated" and r["seed"] in seeds]
        if same:
            inits = {"shared": np.mean(same, 0), **inits}
    if len(inits) > 1:
        names = list(inits)
        print("\nSection 5.4: largest per-layer difference of the group proportions between starts")
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                print(f"  {a} vs {b}: {np.abs(inits[a] - inits[b]).max():.2f}")
        # does the gap close as training goes on? the same measure at moments of training (seed-0 runs with a history)
        hist = {}
        for r in results:
            name = r["init"] if r["experiment"] == "init" else "shared" if r["experiment"] == "unrelated" else None
            if name and r.get("history") and r["seed"] == min(seeds) and name not in hist:
                hist[name] = {int(k): np.array(v) for k, v in r["history"].items()}
        if len(hist) > 1:
            names = list(hist)
            its = sorted(set.intersection(*(set(h) for h in hist.values())))
            print(f"\nThe same over training (seed {min(seeds)}), at iterations {' '.join(map(str, its))}")
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    print(f"  {a} vs {b}: " + " ".join(f"{np.abs(hist[a][it] - hist[b][it]).max():.2f}" for it in its))


def _rho(values: np.ndarray) -> float:
    """Spearman rho of one run's per-layer values against depth (0 where the values do not vary)."""
    return float(spearmanr(np.arange(values.size), values).statistic) if np.ptp(values) > 0 else 0.0


def render(results: Path, tag: str) -> str:
    """The fig. 6 / appendix E table of ``docs/reproduction.md`` from the records ``results/sfg_specialisation/
    {tag}_*.json`` (``--record --record_tag tag``): per experiment and SFG layer, the shared share by section 5.3's
    measure (class-wise probabilities summed per group) with the argmax counts beside it, over seeds; then the
    unrelated pair against its null control, the duplicate pair, paired by seed (``paired_comparison``)."""
    from report import load, machine_line, revisions

    from mtl_med.metrics.stats import format_mean_std, format_p, paired_comparison

    recs = [r for r in load(results, "sfg_specialisation") if r["name"].startswith(f"{tag}_")]
    if not recs:
        raise FileNotFoundError(f"no sfg_specialisation records named {tag}_*")
    protocol = ("max_epochs", "width", "batch_size", "grouping_lr_scale", "tau_rate", "lambda2")
    cfg = recs[0]["config"]
    for r in recs:
        differ = [k for k in protocol if r["config"].get(k) != cfg.get(k)]
        if differ:
            raise ValueError(f"sfg_specialisation {tag}: {r['name']} differs from {recs[0]['name']} in {differ}")
    by: dict[str, dict[int, dict]] = {}
    for r in recs:
        if r["config"]["experiment"] in PAIRS:
            by.setdefault(r["config"]["experiment"], {})[r["seed"]] = r["metrics"]
    if "unrelated" not in by:
        raise ValueError(f"sfg_specialisation {tag}: no 'unrelated' records")
    layers = len(next(iter(by["unrelated"].values()))["probability_sums"])
    head = " | ".join(f"layer {k + 1}" for k in range(layers))
    lines = [f"| experiment (tasks) | seeds | measure | {head} | shared vs depth (Spearman rho) | last-layer task 1 / task 2 | validation score |",
             "| --- | --- | --- | " + " | ".join("---" for _ in range(layers)) + " | --- | --- | --- |"]
    shared = {}
    for exp in [e for e in PAIRS if e in by]:
        runs = by[exp]
        seeds = sorted(runs)
        for measure, key in (("shared, probability sum (5.3)", "probability_sums"), ("shared, argmax count", "proportions")):
            P = np.array([runs[s][key] for s in seeds])  # (seeds, layers, [t1, s, t2])
            shared[(exp, key)] = {s: P[i, :, 1] for i, s in enumerate(seeds)}
            cells = " | ".join(format_mean_std(P[:, k, 1]) for k in range(layers))
            rho = format_mean_std([_rho(P[i, :, 1]) for i in range(len(seeds))])
            last = f"{format_mean_std(P[:, -1, 0])} / {format_mean_std(P[:, -1, 2])}"
            val = format_mean_std([runs[s]["val_score"] for s in seeds], digits=3) if key == "probability_sums" else ""
            tasks = " + ".join(f"`{t}`" for t in PAIRS[exp])
            lines.append(f"| {exp} ({tasks}) | {', '.join(map(str, seeds))} | {measure} | {cells} | {rho} | {last} | {val} |")
    if "duplicate" in by:
        lines += ["", "| unrelated - duplicate (the null control), paired by seed | seeds | " + head + " | shared vs depth (rho) |",
                  "| --- | --- | " + " | ".join("---" for _ in range(layers)) + " | --- |"]
        for measure, key in (("probability sum (5.3)", "probability_sums"), ("argmax count", "proportions")):
            u, d = shared[("unrelated", key)], shared[("duplicate", key)]
            seeds = sorted(set(u) & set(d))
            cells = []
            for k in range(layers):
                t = paired_comparison([u[s][k] for s in seeds], [d[s][k] for s in seeds])
                cells.append(f"{t.mean_diff:+.2f} (p {format_p(t.t_p)})")
            t = paired_comparison([_rho(u[s]) for s in seeds], [_rho(d[s]) for s in seeds])
            lines.append(f"| shared, {measure} | {', '.join(map(str, seeds))} | " + " | ".join(cells) + f" | {t.mean_diff:+.2f} (p {format_p(t.t_p)}) |")
    its = sorted({r["metrics"]["iterations"] for r in recs})
    lines += ["", f"SFG-VGG11 width x{cfg['width']}, placed digits 16 x 16, batch {cfg['batch_size']}, {cfg['max_epochs']} epochs "
              f"({', '.join(map(str, its))} iterations; A.1: {PAPER['iterations']}), grouping_lr_scale {cfg['grouping_lr_scale']:g} "
              f"(A.1: {PAPER['grouping_lr_scale']}), tau decay {cfg['tau_rate']:g} per iteration (A.1: {PAPER['tau_rate']:g}), lambda2 "
              f"{cfg['lambda2']:g}, start p = [0.2, 0.6, 0.2]. Mean ± sample std over seeds; differences: paired t-test p. "
              f"Records: `results/sfg_specialisation/{tag}_*.json`; one torch thread, {machine_line(recs)}; code {revisions(recs)}."]
    return "\n".join(lines) + "\n"


def figure(results: list[dict], path: str) -> None:
    """Fig. 6-style stacked bars: per SFG layer the proportions of task-1, shared and task-2 kernels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {}
    for r in results:
        by.setdefault(r["experiment"] if r["experiment"] != "init" else f"init: {r['init']}", []).append(r["proportions"])
    fig, axes = plt.subplots(1, len(by), figsize=(3.2 * len(by), 3.2), squeeze=False, sharey=True)
    for ax, (name, props) in zip(axes[0], by.items()):
        P = np.mean(props, 0)
        x = np.arange(1, len(P) + 1)
        bottom = np.zeros(len(P))
        for k, (label, colour) in enumerate((("task 1", "tab:blue"), ("shared", "tab:green"), ("task 2", "tab:pink"))):
            ax.bar(x, P[:, k], bottom=bottom, color=colour, label=label)
            bottom += P[:, k]
        ax.set_title(f"{name} ({len(props)} runs)", fontsize=9)
        ax.set_xlabel("SFG layer (depth)")
        ax.set_xticks(x)
    axes[0][0].set_ylabel("proportion of kernels")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"figure: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiments", nargs="+", default=["unrelated", "duplicate", "init"], choices=["unrelated", "duplicate", "init"])
    p.add_argument("--inits", nargs="+", default=list(INITS), choices=list(INITS), help="the starts of p for the 'init' experiment")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--init_seeds", nargs="+", type=int, default=[0], help="seeds of the 'init' experiment")
    p.add_argument("--max_epochs", type=int, default=60)
    p.add_argument("--width", type=float, default=0.25, help="VGG width multiplier (0.25: 16 first-layer kernels)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--grouping_lr_scale", type=float, default=100.0, help="100 x 2,400 iterations moves the logits as far as A.1's 1 x 200k")
    p.add_argument("--tau_rate", type=float, default=1e-3)
    p.add_argument("--lambda2", type=float, default=1e-5, help="entropy weight of eq. 5")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None)
    p.add_argument("--record", action="store_true", help="write one record per run to results/sfg_specialisation/")
    p.add_argument("--record_tag", default="", help="prefix of the records' names (the schedule)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="summarise earlier --json files and exit")
    p.add_argument("--figure", default=None, help="write fig. 6-style bars to this PNG")
    args = p.parse_args()
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        results = [r for run in runs for r in run["results"]]
        summary(results, argparse.Namespace(**runs[0]["args"]))
        if args.figure:
            figure(results, args.figure)
        return
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="sfg_specialisation_"))
    jobs = []
    for exp in args.experiments:
        if exp == "init":
            jobs += [(exp, PAIRS["unrelated"], i, s) for i in args.inits for s in args.init_seeds]
        else:
            jobs += [(exp, PAIRS[exp], "shared", s) for s in args.seeds]
    results = []
    for exp, tasks, init, seed in jobs:
        r = train(tasks, INITS[init], seed, root / f"{exp}_{init}_seed{seed}", args)
        r.update(experiment=exp, init=init)
        results.append(r)
        print(f"{exp:9s} {init:13s} seed {seed}: shared {' '.join(f'{q[1]:.2f}' for q in r['proportions'])}  "
              f"groups {fmt(r['proportions'])}  H_last {r['entropy'][-1]:.2f}  val {r['val_score']:.3f}  "
              f"{r['iterations']} it, tau {r['tau']:.2f}, {r['cpu_s']:.0f} CPU-s", flush=True)
        if args.record:
            from records import write_record

            config = {k: v for k, v in vars(args).items() if k not in ("seeds", "init_seeds", "json", "merge", "workdir", "record", "record_tag", "figure")}
            config.update(experiment=exp, init=init, tasks=tasks)
            write_record("sfg_specialisation", f"{args.record_tag + '_' if args.record_tag else ''}{exp}_{init}_seed{seed}", config=config,
                         seed=seed, metrics={k: v for k, v in r.items() if k not in ("cpu_s",)}, timings={"cpu_s": r["cpu_s"]})
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    summary(results, args)
    if args.figure:
        figure(results, args.figure)


if __name__ == "__main__":
    main()
