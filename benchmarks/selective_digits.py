"""Selective Sharing (Strezoski et al.) on the digits default of the vision bundle, against
single-task, hard-sharing and cross-stitch networks under one protocol.

Every run goes through the bundle's own configs (bundles/vision_multitask: ``train.json`` +
``variants/selective_sharing.json``, then ``evaluate.json`` on the test split) with the paper's
MNIST set-up for all methods (appendix A.1: the two-layer CNN, 28x28 input, SGD lr 0.02,
momentum 0.5, batch 64, 30 epochs, no early stopping; the validation-best checkpoint is tested):

- ``stl``: ten independent networks (``single_task`` columns of the MNIST CNN, each with its own head);
- ``hard``: the MNIST CNN shared, a head per task (hard parameter sharing of the convolutions);
- ``cross_stitch``: ten columns joined by cross-stitch units, a head per task;
- ``branches``: the paper's MTL baseline, the Selective Sharing network that never merges (shared
  FC 640, ten branches FC 100 -> 50 -> 1);

One head design for every method (section 4.2's MNIST head): the 40 x 4 x 4 = 640 features flattened
into FC 640 -> FC 100 -> FC 50 -> the task's output. ``stl``, ``hard`` and ``cross_stitch`` hold all
four layers per task (``head_hidden`` (640, 100, 50), ``head_pooled_size`` 4); ``branches`` and
Selective Sharing share the FC 640 layer, as the paper's MTL network does, and differ from ``hard``
only in that.
- ``similarity`` / ``dissimilarity`` / ``variance`` / ``random``: Selective Sharing under each
  sharing condition of appendix A.2.

Prints per method the mean test accuracy over the ten one-vs-all tasks (mean ± sample std over
seeds), the groups formed and the lock epoch per seed, active parameters at the end, and the
training CPU time relative to ``hard`` (CPU seconds of this process, so other load on the machine
does not distort it). A benchmark prints; it never asserts.

    python benchmarks/selective_digits.py                                   # 3 seeds, all methods
    python benchmarks/selective_digits.py --seeds 0 --max_epochs 3 --methods hard similarity
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

from records import add_record_arguments, run_config, tagged, write_record
from vision_digits import run_bundle

CONDITIONS = ("similarity", "dissimilarity", "variance", "random")
METHODS = ("hard", *CONDITIONS, "cross_stitch", "stl", "branches")
PLAIN = {"stl": "single_task", "hard": "hard_sharing", "cross_stitch": "cross_stitch"}
#: the plain methods' head: section 4.2's FC 640 -> 100 -> 50 on the flattened 640 features, per task
HEAD_HIDDEN, HEAD_POOLED_SIZE = (640, 100, 50), 4


def settings(method: str, seed: int, args: argparse.Namespace) -> tuple[list[str], dict]:
    """Configs and overrides of one run: the selective_sharing variant's protocol for every method."""
    common = dict(seed=seed, max_epochs=args.max_epochs, batch_size=64, learning_rate=0.02, momentum=0.5,
                  image_size=28, width=1.0, val_interval=1)
    if method in PLAIN:
        return ["train.json"], dict(
            common, backbone="mnist_cnn", sharing=PLAIN[method], variant=method,
            **{"network_def#head_hidden": list(HEAD_HIDDEN), "network_def#head_pooled_size": HEAD_POOLED_SIZE,
               "optimizer": {"_target_": "torch.optim.SGD", "params": "$@network.parameters()", "lr": "@learning_rate",
                             "momentum": 0.5, "weight_decay": "@weight_decay"}})
    condition = "similarity" if method == "branches" else method
    start = 10**6 if method == "branches" else 1  # the paper's MTL baseline: branches that never merge
    return ["train.json", "variants/selective_sharing.json"], dict(
        common, variant=method, selective_condition=condition, selective_start_epoch=start)


HEAD = "flattened 640 features -> FC 640 -> FC 100 -> FC 50 -> output (section 4.2), every method"


def plain_parameters(method: str) -> int:
    """Parameters of a plain method's network on the ten digit tasks (all of them are active)."""
    from mtl_med.build import build_network

    names = [f"digit_{d}" for d in range(10)]
    net = build_network("mnist_cnn", PLAIN[method], names, {t: 2 for t in names}, in_channels=1,
                        head_hidden=list(HEAD_HIDDEN), head_pooled_size=HEAD_POOLED_SIZE)
    return sum(p.numel() for p in net.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max_epochs", type=int, default=30, help="the paper trains 30 epochs")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable CPU-time measurements)")
    p.add_argument("--workdir", default=None, help="where runs are written (default: a temporary folder)")
    add_record_arguments(p)
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="print the table of earlier --json files and exit")
    args = p.parse_args()
    if args.merge:
        results: dict[str, dict] = {}
        for f in args.merge:
            for m, by_seed in json.loads(Path(f).read_text())["results"].items():
                results.setdefault(m, {}).update(by_seed)
        print_table(results)
        return
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="selective_digits_"))
    results: dict[str, dict] = {m: {} for m in args.methods}
    for seed in args.seeds:
        for m in args.methods:
            run_dir = root / f"{m}_seed{seed}"
            configs, over = settings(m, seed, args)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            epochs = run_bundle(configs, run_dir, **over)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            run_bundle(configs + ["evaluate.json"], run_dir, **{k: v for k, v in over.items() if k != "max_epochs"})
            summary = json.loads((run_dir / "eval" / "summary.json").read_text())
            r = {"accuracy": summary["mean_accuracy"], "cpu_s": cpu, "wall_s": wall, **epochs}
            record = run_dir / "eval" / "selective_sharing.json"
            if record.is_file():
                rec = json.loads(record.read_text())["epochs"]
                locked = [e["epoch"] for e in rec if e.get("locked")]
                r.update(groups=rec[-1]["groups"], lock_epoch=locked[0] if locked else None,
                         active_parameters=rec[-1]["active_parameters"], first_grouped=next(
                             (e["epoch"] for e in rec if any(len(g) > 1 for g in e["groups"])), None))
            else:
                r.update(active_parameters=plain_parameters(m))
            results[m][seed] = r
            if args.record:
                write_record("selective", tagged(args, f"{m}_seed{seed}"), config=run_config(args, method=m, head=HEAD), seed=seed,
                             metrics={k: v for k, v in r.items() if k not in ("cpu_s", "wall_s")}, timings={"cpu_s": cpu, "wall_s": wall})
            print(f"{m:13s} seed {seed}: accuracy {100 * r['accuracy']:.2f}%  groups {r.get('groups', '-')}  "
                  f"lock epoch {r.get('lock_epoch', '-')}  {cpu:.0f} CPU-s ({wall:.0f} s wall)", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print_table(results)


def _groups(groups: list[list[str]]) -> str:
    """``{0,3} {1,2,4}`` for the groups of two or more tasks (digit numbers when the tasks are digits)."""
    short = [sorted(t.removeprefix("digit_") for t in g) for g in groups if len(g) > 1]
    return " ".join("{" + ",".join(g) + "}" for g in short) or "none"


def print_table(results: dict[str, dict]) -> None:
    """A Markdown table: one row per method, statistics over seeds."""
    ref = np.mean([r["cpu_s"] for r in results["hard"].values()]) if results.get("hard") else float("nan")
    print("\n| method | mean accuracy (mean ± std) | groups formed (per seed) | first grouped / lock epoch | active parameters | training CPU time vs hard |")
    print("| --- | --- | --- | --- | --- | --- |")
    for m, by_seed in results.items():
        acc = np.array([r["accuracy"] for r in by_seed.values()])
        sd = acc.std(ddof=1) if len(acc) > 1 else 0.0
        groups = "; ".join(_groups(r["groups"]) for r in by_seed.values()) if all("groups" in r for r in by_seed.values()) else "-"
        lock = "; ".join(f"{r.get('first_grouped')}/{r.get('lock_epoch')}" for r in by_seed.values()) if all("groups" in r for r in by_seed.values()) else "-"
        params = "/".join(str(r.get("active_parameters")) for r in by_seed.values())
        cpu = np.mean([r["cpu_s"] for r in by_seed.values()])
        print(f"| {m} | {100 * acc.mean():.2f} ± {100 * sd:.2f} % | {groups} | {lock} | {params} | {cpu / ref:.2f}x ({cpu:.0f} CPU-s) |")


#: the comparisons the report tests, a minus b paired by seed: Table 1's claims and A.2's
COMPARISONS = (("similarity", "branches"), ("similarity", "stl"), ("similarity", "cross_stitch"), ("similarity", "hard"),
               ("stl", "branches"), ("cross_stitch", "stl"), ("branches", "hard"),
               ("similarity", "dissimilarity"), ("similarity", "variance"), ("similarity", "random"))
SHARES = {"stl": "nothing", "hard": "convolutions", "cross_stitch": "convolutions, mixed by cross-stitch units",
          "branches": "convolutions and FC 640", "similarity": "convolutions, FC 640 and the merged branches"}


def render(results: Path) -> str:
    """The table of ``docs/reproduction.md`` from the records ``results/selective/*.json`` (``--record``):
    accuracy per method over seeds, groups and lock epochs, active parameters, training CPU time, and the
    paired comparisons of :data:`COMPARISONS` (``mtl_med.metrics.stats.paired_comparison``)."""
    from report import load, machine_line, revisions

    from mtl_med.metrics.stats import format_mean_std, format_p, paired_comparison

    recs = load(results, "selective")
    by: dict[str, dict[int, dict]] = {}
    for r in recs:
        by.setdefault(r["config"]["method"], {})[r["seed"]] = r
    protocol = ("max_epochs", "head")
    cfg = recs[0]["config"]
    for r in recs:
        differ = [k for k in protocol if r["config"].get(k) != cfg.get(k)]
        if differ:
            raise ValueError(f"selective: {r['name']} differs from {recs[0]['name']} in {differ}")
    methods = [m for m in METHODS if m in by]
    acc = {m: {s: r["metrics"]["accuracy"] for s, r in by[m].items()} for m in methods}
    ref = np.mean([r["timings"]["cpu_s"] for r in by["hard"].values()]) if "hard" in by else float("nan")
    lines = ["| method | shares | seeds | mean accuracy (mean ± std) | groups formed (per seed) | first grouped / lock epoch | "
             "active parameters | training CPU time vs hard |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in methods:
        rs = [by[m][s] for s in sorted(by[m])]
        grouped = all("groups" in r["metrics"] for r in rs)
        groups = "; ".join(_groups(r["metrics"]["groups"]) for r in rs) if grouped else "-"
        lock = "; ".join(f"{r['metrics'].get('first_grouped')}/{r['metrics'].get('lock_epoch')}" for r in rs) if grouped else "-"
        params = "/".join(str(r["metrics"].get("active_parameters")) for r in rs)
        cpu = np.mean([r["timings"]["cpu_s"] for r in rs])
        shares = SHARES.get(m, SHARES["similarity"])
        lines.append(f"| {m} | {shares} | {len(rs)} | {format_mean_std([r['metrics']['accuracy'] for r in rs], 100.0, unit=' %')} | "
                     f"{groups} | {lock} | {params} | {cpu / ref:.2f}x ({cpu:.0f} CPU-s) |")
    lines += ["", "| a - b (accuracy, points) | paired by seed | mean difference (95 % CI) | seeds a won / tied / lost | paired t p |",
              "| --- | --- | --- | --- | --- |"]
    for a, b in COMPARISONS:
        if a in acc and b in acc:
            seeds = sorted(set(acc[a]) & set(acc[b]))
            t = paired_comparison([100 * acc[a][s] for s in seeds], [100 * acc[b][s] for s in seeds])
            ci = f"{t.ci_low:+.2f} to {t.ci_high:+.2f}" if np.isfinite(t.ci_low) else "no CI"
            lines.append(f"| {a} - {b} | {', '.join(map(str, seeds))} | {t.mean_diff:+.2f} ({ci}) | {t.wins} / {t.ties} / {t.losses} | {format_p(t.t_p)} |")
    lines += ["", f"Digits, ten one-vs-all tasks, appendix A.1's optimiser (SGD lr 0.02, momentum 0.5, batch 64), "
              f"{cfg['max_epochs']} epochs, the validation-best checkpoint tested; head: {cfg.get('head', 'unknown')}. "
              f"Mean ± sample std over seeds. Records: `results/selective/*.json`; one torch thread, {machine_line(recs)}; "
              f"code {revisions(recs)}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
