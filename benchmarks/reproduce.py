"""Reproduce the papers' findings: runs the benchmark behind each finding of docs/reproduction.md.

Each finding is one benchmark script of this folder, run as one process per seed (``--jobs`` at a
time, one torch thread each), then merged into the table the report quotes. ``--full`` uses
longer schedules instead of the CPU-sized ones: the papers' where a script can express them, but for
AdaShare the vision variant's own 10 warm-up + 40 policy epochs with eight random draws, which is not
the paper's schedule (hours on a CPU; the bundles train on the first CUDA device when there is one). Everything a run writes lands in ``--out``: per finding the raw JSON
of every seed, the merged table (``<finding>.md``) and, for SFG, the fig. 6-style figure.

    python benchmarks/reproduce.py --findings sfg tr --out /tmp/reproduce      # CPU schedules
    python benchmarks/reproduce.py --full --jobs 4 --out /tmp/reproduce_full    # longer schedules (see above)
    python benchmarks/reproduce.py --list                                       # the commands, not run
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
TR_CURVE = [f"tr_sigma{s}" for s in ("0", "0.2", "0.4", "0.6", "0.8", "1")] + [f"tr_knockout{s}" for s in ("0.2", "0.5", "0.8")]
#: tasks that compete: two "where" and two "what" questions about a digit placed on a 16x16 canvas
WHERE_WHAT = ["--dataset", "placed_digits", "--tasks", "left", "top", "odd", "large", "--width", "0.25"]
TR_CURVE_WW = [f"tr_sigma{s}" for s in ("0", "0.25", "0.5", "0.75", "1")] + [f"tr_knockout{s}" for s in ("0.25", "0.5", "0.75")]

#: finding -> (script, seeds, CPU-sized arguments, the papers' schedules for --full)
FINDINGS = {
    # SFG fig. 6, appendix E, section 5.4 (the other starts of p run seed 0; A.1's start is the unrelated seed-0 run)
    "sfg": ("sfg_specialisation.py", [0, 1, 2], ["--max_epochs", "60", "--record", "--record_tag", "cpu100"],
            ["--max_epochs", "5000", "--grouping_lr_scale", "1", "--tau_rate", "1e-5"]),
    # fig. 6 and appendix E at a grouping rate 10x the weights' (not 100x) for 20,000 iterations, a tenth of A.1's schedule
    "sfg_slow": ("sfg_specialisation.py", [0, 1, 2],
                 ["--experiments", "unrelated", "duplicate", "--grouping_lr_scale", "10", "--tau_rate", "1e-4", "--max_epochs", "500"],
                 ["--experiments", "unrelated", "duplicate", "--max_epochs", "5000", "--grouping_lr_scale", "1", "--tau_rate", "1e-5"]),
    # section 5.4 under two changes that could let the starts agree: a larger entropy weight (which the paper
    # suggests for the constant mask), and a grouping rate 10x the paper's instead of 100x (20,000 iterations)
    "sfg_init_entropy": ("sfg_specialisation.py", None,
                         ["--experiments", "init", "--inits", "shared", "task_specific", "dirichlet", "constant_mask", "--lambda2", "1e-3"],
                         ["--experiments", "init", "--inits", "shared", "task_specific", "dirichlet", "constant_mask", "--lambda2", "1e-3",
                          "--max_epochs", "5000", "--grouping_lr_scale", "1", "--tau_rate", "1e-5"]),
    "sfg_init_slow": ("sfg_specialisation.py", None,
                      ["--experiments", "init", "--inits", "shared", "task_specific", "--grouping_lr_scale", "10", "--tau_rate", "1e-4",
                       "--max_epochs", "500"],
                      ["--experiments", "init", "--inits", "shared", "task_specific", "--max_epochs", "5000", "--grouping_lr_scale", "1",
                       "--tau_rate", "1e-5"]),
    # section 5.4 at A.1's own rates (grouping logits at the weights' rate, tau decay 1e-5) for 110,000 of its 200,000 iterations
    "sfg_init_paper_rates": ("sfg_specialisation.py", None,
                             ["--experiments", "init", "--inits", "shared", "task_specific", "--grouping_lr_scale", "1", "--tau_rate", "1e-5",
                              "--max_epochs", "2750"],
                             ["--experiments", "init", "--inits", "shared", "task_specific", "--max_epochs", "5000", "--grouping_lr_scale", "1",
                              "--tau_rate", "1e-5"]),
    # Task Routing: the sigma curve in both conventions (the paper's text and the authors' code)
    "tr": ("vision_digits.py", [0, 1, 2], ["--methods", *TR_CURVE, "--bn_protocols", "batch", "--image_size", "8", "--max_epochs", "20", "--patience", "5"],
           ["--methods", *TR_CURVE, "--bn_protocols", "batch"]),
    # the same two findings on tasks that compete (where and what), to test the ceiling explanation
    "tr_where_what": ("vision_digits.py", [0, 1, 2],
                      [*WHERE_WHAT, "--methods", *TR_CURVE_WW, "--bn_protocols", "batch", "--max_epochs", "30", "--patience", "6",
                       "--tr_epoch_factor", "4"],
                      [*WHERE_WHAT, "--methods", *TR_CURVE_WW, "--bn_protocols", "batch", "--tr_epoch_factor", "4"]),
    "branched_where_what": ("branched_digits.py", None, [*WHERE_WHAT, "--max_epochs", "30", "--patience", "6", "--fractions", "0.25", "0.5",
                                                   "--seeds", *map(str, range(12))],
                            [*WHERE_WHAT, "--max_epochs", "100", "--patience", "15"]),
    # the quarter budget again on 28 further seeds: what a 0.6-point gain needs at the spread of seeds 0-11
    "branched_where_what_quarter": ("branched_digits.py", None, [*WHERE_WHAT, "--max_epochs", "30", "--patience", "6", "--fractions", "0.25",
                                                           "--seeds", *map(str, range(12, 40))],
                                    [*WHERE_WHAT, "--max_epochs", "100", "--patience", "15", "--fractions", "0.25",
                                     "--seeds", *map(str, range(12, 40))]),
    # AdaShare: learned policy against Random #1 / #2 (Tables 5/6)
    "adashare": ("adashare_digits.py", [0, 1, 2],
                 ["--random", "8", "--policy_lr", "0.1", "--tau_final", "0.01", "--image_size", "8", "--max_epochs", "100",
                  "--patience", "15", "--record"],
                 ["--random", "8", "--max_epochs", "100", "--patience", "15", "--record"]),
    # AdaShare's identical-task null control: the search on ten distinct tasks and on ten copies of one task, each
    # of three digits (how far copies spread depends on the task copied), each writing one record per seed to
    # results/adashare_null/ (a short schedule; --full: the variant's 10 + 40)
    **{name: ("adashare_digits.py", None,
              [*extra, "--search_only", "--record", "--record_tag", "short", "--seeds", *map(str, range(10)), "--warmup_epochs", "1",
               "--policy_epochs", "10", "--policy_lr", "0.1", "--tau_final", "0.01", "--image_size", "8"],
              [*extra, "--search_only", "--record", "--record_tag", "variant", "--seeds", "0", "1", "2", "--warmup_epochs", "10",
               "--policy_epochs", "40", "--policy_lr", "0.1", "--tau_final", "0.01", "--image_size", "8"])
       for name, extra in (("adashare_null", []),
                           *((f"adashare_null_identical{d}", ["--identical-tasks", "--identical_digit", d]) for d in ("0", "3", "8")))},
    # Branched MTN: affinity falls with depth (fig. 2a); searched vs random trees
    "branched": ("branched_digits.py", None, [], ["--max_epochs", "100", "--patience", "15"]),
    # Selective Sharing: groups form; Table 1 ordering
    "selective": ("selective_digits.py", [0, 1, 2], ["--max_epochs", "20", "--record"], ["--max_epochs", "30", "--record"]),
    # one protocol: every method under both batch-norm protocols, two single-task baselines
    "protocol": ("vision_digits.py", [0, 1, 2],
                 ["--methods", "single_task", "single_task_full", "hard_sharing", "cross_stitch", "tr_sigma0.8", "sfg",
                  "adashare", "hard_sharing_resnet18", "--image_size", "8", "--max_epochs", "20", "--patience", "5",
                  "--warmup_epochs", "3", "--policy_epochs", "12"],
                 ["--methods", "single_task", "single_task_full", "hard_sharing", "cross_stitch", "tr_sigma0.8", "tr_knockout0.5", "sfg",
                  "adashare", "hard_sharing_resnet18"]),
}


def commands(name: str, full: bool, out: Path) -> tuple[list[list[str]], list[str] | None]:
    """The per-seed commands of a finding and the command that merges their JSON (``None``: one run)."""
    script, seeds, cpu, paper = FINDINGS[name]
    base = [sys.executable, str(HERE / script), *(paper if full else cpu)]
    if seeds is None:
        figure = ["--figure", str(out / f"{name}.png")] if script == "branched_digits.py" else []
        return [base + figure + ["--json", str(out / f"{name}.json")]], None
    runs = [base + ["--seeds", str(s), "--json", str(out / f"{name}_seed{s}.json")] for s in seeds]
    if name == "sfg":  # the initialisation experiment once (seed 0), the others per seed
        runs = [r[:-4] + ["--experiments", "unrelated", "duplicate"] + r[-4:] for r in runs]
        runs.append(base + ["--experiments", "init", "--inits", "task_specific", "dirichlet", "constant_mask", "--json", str(out / "sfg_init.json")])
    merge = [sys.executable, str(HERE / script), "--merge", *(r[-1] for r in runs)]
    if name in ("sfg", "sfg_slow", "tr", "tr_where_what"):
        merge += ["--figure", str(out / {"sfg": "sfg_groupings.png", "sfg_slow": "sfg_groupings_slow.png", "tr": "tr_sigma_curve.png"}.get(name, f"{name}.png"))]
    return runs, merge


def run(cmd: list[str], log: Path) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--findings", nargs="+", default=list(FINDINGS), choices=list(FINDINGS))
    p.add_argument("--full", action="store_true", help="longer schedules: the papers' where a script can express them, the AdaShare "
                   "variant's 10 + 40 epochs (not the paper's) for AdaShare (hours on a CPU; the bundles use CUDA when present)")
    p.add_argument("--jobs", type=int, default=2, help="processes at a time (one per seed)")
    p.add_argument("--out", default="reproduce_out")
    p.add_argument("--list", action="store_true", help="print the commands and exit")
    args = p.parse_args()
    out = Path(args.out)
    plan = {n: commands(n, args.full, out) for n in args.findings}
    if args.list:
        for n, (runs, merge) in plan.items():
            print(f"# {n}")
            for c in runs + ([merge] if merge else []):
                print(shlex.join(c))
        return
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for n, (runs, merge) in plan.items():
        t0 = time.perf_counter()
        print(f"{n}: {len(runs)} process(es), {args.jobs} at a time; logs in {out}/{n}_*.log", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            codes = list(pool.map(lambda ic: run(ic[1], out / f"{n}_{ic[0]}.log"), enumerate(runs)))
        if any(codes):
            failed.append(n)
            print(f"{n}: {sum(c != 0 for c in codes)} run(s) failed; see the logs", flush=True)
            continue
        if merge:
            table = subprocess.run(merge, capture_output=True, text=True)
            (out / f"{n}.md").write_text(table.stdout)
            print(table.stdout, flush=True)
        else:
            print((out / f"{n}_0.log").read_text().split("\n\n")[-1], flush=True)
        print(f"{n}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
