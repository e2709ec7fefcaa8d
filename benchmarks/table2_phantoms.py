"""The SFG paper's Table 2 on phantoms: six rows trained under one protocol, evaluated on held-out phantoms.

Rows (paper, Table 2): single-task HighResNet, multi-task hard sharing, MT constant mask, MT constant
p = [1/3, 1/3, 1/3], cross-stitch and SFG. Each row is the pelvis bundle's own ``configs/train.json`` with
that row's ``configs/variants/<row>.json`` merged over it, run through MONAI's bundle runner with the protocol's
overrides (the same varied training phantoms, widths, patch size, epochs and schedule rule for every row); the
trained ``checkpoint_final.pt`` is then evaluated by ``inference.json`` + ``evaluate.json`` + the same variant
(the paper's metrics: PSNR overall / bones / organs / prostate / bladder / rectum and Dice per organ, from
``num_samples`` posterior samples) on held-out phantoms of new seeds: RAS, stored LPS, oblique 15 degrees, ...

    nice -n 15 python benchmarks/table2_phantoms.py                                # the documented protocol
    python benchmarks/table2_phantoms.py --tiny --work /tmp/t2 --results /tmp/t2/records   # end-to-end check
    python benchmarks/table2_phantoms.py --render                                  # the markdown table

One JSON record per (row, seed) in ``--results`` (default ``results/table2``), written atomically when the row's
evaluation is done: protocol, row, variant, seed, git revision, machine, per-phantom metrics, training and
evaluation wall time. A rerun skips the (row, seed) pairs that have a record for the same protocol; an unfinished
training resumes from its last checkpoint (the bundle's ``resume_ckpt``), an evaluation from its metrics rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "sfg_highresnet_pelvis"
CONFIGS = BUNDLE / "configs"
RESULTS = REPO / "results" / "table2"

# (variant file in configs/variants, the paper's row name), in the paper's order
ROWS: list[tuple[str, str]] = [
    ("single_task", "HighResNet (single task)"),
    ("hard_sharing", "MT hard sharing"),
    ("constant_mask", "MT constant mask"),
    ("constant_p", "MT constant p = [1/3, 1/3, 1/3]"),
    ("cross_stitch", "cross-stitch"),
    ("sfg", "SFG"),
]
REFERENCE = "sfg"

PSNR_COLUMNS = [("psnr_overall", "overall"), ("psnr_bones", "bones"), ("psnr_organs", "organs"),
                ("psnr_prostate", "prostate"), ("psnr_bladder", "bladder"), ("psnr_rectum", "rectum")]
DICE_COLUMNS = [("dice_left_femoral_head", "left femoral head"), ("dice_right_femoral_head", "right femoral head"),
                ("dice_prostate", "prostate"), ("dice_bladder", "bladder"), ("dice_rectum", "rectum")]
TESTED = ["psnr_overall", "psnr_bones", "psnr_organs", "dice_mean"]

# The protocol this CPU affords (docs/reproduction.md, "Table 2 on phantoms"): a reduced budget, not A.3's.
# Every value but the phantom / seed ones is a config id of the bundle's train.json or evaluate.json.
PROTOCOL: dict = {
    "preset": "small",
    "train_cases": 10,  # varied cohort (data seed 100): 8 training, 2 validation
    "val_cases": 2,
    "data_seed": 100,
    "test_seeds": [9001, 9002, 9003, 9004],  # held out: RAS, stored LPS, oblique 15 deg, RAS
    "seeds": [0, 1, 2],
    "train": {
        "features": [8, 16, 16],
        "patch_size": [48, 48],
        "padded_size": [56, 56],
        "batch_size": 10,
        "samples_per_volume": 10,
        "max_epochs": 50,  # 8 iterations an epoch (8 training cases x 10 patches / batch 10): 400 iterations
        "val_interval": 10,
        "grouping_interval": 40,
        "log_interval": 20,
        "n4_shrink_factor": 4,
    },
    "num_samples": 50,
    # batch-norm statistics at test: the bundle's default (population running averages) and A.4's (each test
    # batch's own); every row is evaluated both ways from the same weights
    "bn_inference": ["population", "batch"],
    "threads": 1,
}
TINY: dict = {
    "preset": "tiny",
    "shape": [32, 32, 8],
    "train_cases": 3,
    "val_cases": 1,
    "data_seed": 100,
    "test_seeds": [9001, 9002],
    "seeds": [0],
    "train": {
        "features": [4, 8, 8],
        "patch_size": [24, 24],
        "padded_size": [32, 32],
        "batch_size": 2,
        "samples_per_volume": 1,
        "max_epochs": 1,
        "val_interval": 1,
        "grouping_interval": 1,
        "log_interval": 1,
        "n4_shrink_factor": 2,
    },
    "num_samples": 2,
    "bn_inference": ["population", "batch"],
    "threads": 1,
}
EVAL_KEYS = ("num_samples", "bn_inference")  # evaluation only: a change re-evaluates, the trained weights stay
BN_TITLES = {"population": "population statistics (running averages; the bundle's default)",
             "batch": "test-batch statistics (A.4: each slice batch normalised by its own statistics)"}


TAU_MIN = 0.1  # train.json's tau_min


def schedule(protocol: dict) -> dict:
    """The schedule rule, the same for every row: the SFG temperature decays exponentially from 1 to ``tau_min``
    over the run's iterations (``tau_rate = ln(1 / tau_min) / iterations``, train.json's ExponentialTemperature);
    the rows without a temperature ignore it. Returns the protocol with ``iterations`` and ``tau_rate`` filled in."""
    t = protocol["train"]
    per_epoch = math.ceil((protocol["train_cases"] - protocol["val_cases"]) * t["samples_per_volume"] / t["batch_size"])
    protocol["iterations"] = per_epoch * t["max_epochs"]
    t["tau_min"] = TAU_MIN
    t["tau_rate"] = round(math.log(1 / TAU_MIN) / protocol["iterations"], 8)
    return protocol


# ------------------------------------------------------------------ data
def test_storage(index: int) -> dict:
    """How held-out phantom ``index`` is stored: RAS, stored LPS, oblique 15 degrees, then RAS again."""
    return {1: {"orientation": "LPS"}, 2: {"oblique_deg": 15.0}}.get(index, {})


def make_data(protocol: dict, work: Path) -> tuple[Path, Path]:
    """The varied training cohort and the held-out test phantoms (made once; reused when present)."""
    from mtl_med.pelvis.phantoms import PRESETS, generate_dataset, generate_phantom, write_phantom
    from mtl_med.io import atomic_write_json

    shape = tuple(protocol.get("shape") or PRESETS[protocol["preset"]])
    train_dl = work / "data" / "train" / "datalist.json"
    if not train_dl.is_file():
        n = protocol["train_cases"]
        _, failed = generate_dataset(train_dl.parent, n, protocol["data_seed"], shape=shape, varied=True,
                                     val_fraction=protocol["val_cases"] / n, test_fraction=0.0)
        if failed:
            raise RuntimeError(f"phantoms failed: {failed}")
    test_dl = work / "data" / "test" / "datalist.json"
    if not test_dl.is_file():
        items, storage = [], {}
        for i, seed in enumerate(protocol["test_seeds"]):
            kw = test_storage(i)
            name = f"seed{seed}"
            write_phantom(generate_phantom(seed, shape=shape, **kw), test_dl.parent / name)
            items.append({k: f"{name}/{k}.nii.gz" for k in ("mr", "ct", "label", "bone", "body")})
            storage[name] = kw or {"orientation": "RAS"}
        atomic_write_json({"name": "table2 held-out phantoms", "test": items, "storage": storage}, test_dl)
    return train_dl, test_dl


# ------------------------------------------------------------------ one (row, seed)
def _revision() -> str:
    if os.environ.get("TABLE2_REVISION"):  # a run from a snapshot of the working tree says which one
        return os.environ["TABLE2_REVISION"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return ""


def machine() -> dict:
    import torch

    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": bool(torch.cuda.is_available())}


def record_path(results: Path, row: str, seed: int) -> Path:
    return results / f"{row}_seed{seed}.json"


def _bundle_run(files: list[Path], **overrides) -> None:
    from monai.bundle import run as bundle_run

    bundle_run(config_file=[str(f) for f in files], logging_file=str(CONFIGS / "logging.conf"), **overrides)


def _last_checkpoint(models: Path) -> Path | None:
    found = [p for p in models.glob("checkpoint*.pt") if p.name != "checkpoint_final.pt"]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _final_epoch(models: Path) -> int | None:
    import torch

    final = models / "checkpoint_final.pt"
    if not final.is_file():
        return None
    state = torch.load(final, map_location="cpu", weights_only=False)["trainer"]  # ignite: iteration, epoch_length
    return int(state["iteration"]) // max(1, int(state["epoch_length"]))


def train_row(protocol: dict, row: str, seed: int, train_dl: Path, run_dir: Path) -> dict:
    """Train one row with the bundle's train.json + the row's variant; resumes an unfinished run."""
    variant = CONFIGS / "variants" / f"{row}.json"
    models = run_dir / "models"
    timing = run_dir / "train_time.json"
    spent = json.loads(timing.read_text()) if timing.is_file() else {"seconds": 0.0, "cpu_seconds": 0.0, "segments": 0}
    if _final_epoch(models) == protocol["train"]["max_epochs"]:
        return spent
    overrides = {**protocol["train"], "bundle_root": str(run_dir), "datalist": str(train_dl), "seed": seed,
                 "n4_cache_dir": str(run_dir.parent.parent / "n4_cache"), "cache": "memory"}
    resume = _last_checkpoint(models) if models.is_dir() else None
    if resume is not None:
        overrides["resume_ckpt"] = str(resume)
    t0, c0 = time.perf_counter(), time.process_time()
    _bundle_run([CONFIGS / "train.json", variant], **overrides)
    spent = {"seconds": spent["seconds"] + time.perf_counter() - t0,
             "cpu_seconds": spent.get("cpu_seconds", 0.0) + time.process_time() - c0, "segments": spent["segments"] + 1,
             "resumed_from": str(resume.name) if resume else spent.get("resumed_from")}
    from mtl_med.io import atomic_write_json

    atomic_write_json(spent, timing)
    return spent


def evaluate_row(protocol: dict, row: str, test_dl: Path, run_dir: Path,
                 bn: str = "population") -> tuple[list[dict], float, float]:
    """The bundle's evaluation of the trained row on the held-out phantoms with batch-norm statistics ``bn``
    (evaluate.json's ``bn_inference``); rows of metrics.csv, wall and CPU seconds."""
    variant = CONFIGS / "variants" / f"{row}.json"
    out = run_dir / ("eval" if bn == "population" else f"eval_{bn}")
    n = int(protocol["num_samples"])
    t0, c0 = time.perf_counter(), time.process_time()
    _bundle_run([CONFIGS / "inference.json", CONFIGS / "evaluate.json", variant],
                bundle_root=str(run_dir), ckpt_path=str(run_dir / "models" / "checkpoint_final.pt"),
                datalist=str(test_dl), datalist_section="test", output_dir=str(out),
                features=protocol["train"]["features"], n4_shrink_factor=protocol["train"]["n4_shrink_factor"],
                n4_cache_dir=str(run_dir.parent.parent / "n4_cache"), num_samples=n, max_samples=n,
                min_samples=min(n, 10), compute_dtype="float32", truth_geometry="resample", save_png=False, progress=False,
                skip_existing=True, bn_inference=bn)
    return _read_rows(out / "metrics.csv"), time.perf_counter() - t0, time.process_time() - c0


def _read_rows(path: Path) -> list[dict]:
    import csv

    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                try:
                    row[k] = float(v)
                except (TypeError, ValueError):
                    row[k] = v
            rows.append(row)
    return rows


def run_one(protocol: dict, row: str, seed: int, work: Path, results: Path, train_dl: Path, test_dl: Path) -> dict:
    from mtl_med.io import atomic_write_json, json_finite

    run_dir = work / "runs" / row / f"seed{seed}"
    stamp = run_dir / "protocol.json"  # a work folder holds one training protocol's runs (checkpoints, metrics rows)
    training = {k: v for k, v in protocol.items() if k not in EVAL_KEYS}
    if stamp.is_file() and {k: v for k, v in json.loads(stamp.read_text()).items() if k not in EVAL_KEYS} != training:
        raise SystemExit(f"{run_dir} holds a run of another protocol; pass another --work")
    atomic_write_json(training, stamp)
    spent = train_row(protocol, row, seed, train_dl, run_dir)
    storage = json.loads(test_dl.read_text()).get("storage", {})
    by_bn, timings = {}, {}
    for bn in protocol.get("bn_inference", ["population"]):
        cases, eval_s, eval_cpu = evaluate_row(protocol, row, test_dl, run_dir, bn)
        by_bn[bn] = {str(c["case"]): {"storage": storage.get(str(c["case"]), {}),
                                      "metrics": {k: v for k, v in c.items() if k != "case" and isinstance(v, float)}}
                     for c in cases}
        timings[bn] = {"wall_s": round(eval_s, 1), "cpu_s": round(eval_cpu, 1)}
    record = {
        "benchmark": "table2_phantoms",
        "protocol": protocol,
        "row": row,
        "row_name": dict(ROWS)[row],
        "variant": f"bundles/sfg_highresnet_pelvis/configs/variants/{row}.json",
        "variant_config": json.loads((CONFIGS / "variants" / f"{row}.json").read_text()),
        "seed": seed,
        "revision": _revision(),
        "machine": machine(),
        "train_wall_s": round(spent["seconds"], 1),
        "train_cpu_s": round(spent.get("cpu_seconds", float("nan")), 1),
        "train_segments": spent["segments"],
        "eval_wall_s": round(sum(t["wall_s"] for t in timings.values()), 1),
        "eval_cpu_s": round(sum(t["cpu_s"] for t in timings.values()), 1),
        "eval_by_bn": timings,
        "phantoms": next(iter(by_bn.values())),  # the first mode's (population): what older readers expect
        "phantoms_by_bn": by_bn,
    }
    atomic_write_json(json_finite(record), record_path(results, row, seed))
    return record


# ------------------------------------------------------------------ rendering
def load_records(results: Path = RESULTS, protocol: dict | None = None) -> list[dict]:
    out = []
    for p in sorted(Path(results).glob("*_seed*.json")):
        r = json.loads(p.read_text())
        if r.get("benchmark") == "table2_phantoms" and (protocol is None or r.get("protocol") == protocol):
            out.append(r)
    return out


def _phantoms(record: dict, bn: str) -> dict:
    if "phantoms_by_bn" in record:
        return record["phantoms_by_bn"].get(bn, {})
    return record["phantoms"] if bn == "population" else {}


def bn_modes(records: list[dict]) -> list[str]:
    return [bn for bn in BN_TITLES if any(_phantoms(r, bn) for r in records)]


def _values(records: list[dict], row: str, metric: str, bn: str = "population") -> dict[tuple[int, str], float]:
    """(seed, phantom) -> value of ``metric`` for ``row`` under batch-norm statistics ``bn`` (finite values only)."""
    out = {}
    for r in records:
        if r["row"] != row:
            continue
        for case, c in _phantoms(r, bn).items():
            v = c["metrics"].get(metric)
            if v is not None and math.isfinite(v):
                out[(r["seed"], case)] = v
    return out


def _cell(vals, digits: int) -> str:
    from mtl_med.metrics.stats import format_mean_std

    vals = list(vals)
    return format_mean_std(vals, digits=digits) if vals else "-"


def paired_tests(records: list[dict], metric: str, baseline: str, reference: str = REFERENCE,
                 bn: str = "population") -> dict:
    """SFG against ``baseline`` over the (seed, phantom) pairs both have (``mtl_med.metrics.stats.paired_comparison``:
    mean difference with its 95 % t interval, paired t-test and Wilcoxon signed-rank p, pairs won / tied / lost)."""
    from mtl_med.metrics.stats import paired_comparison

    a, b = _values(records, reference, metric, bn), _values(records, baseline, metric, bn)
    keys = sorted(set(a) & set(b))
    if not keys:
        return {"n": 0, "mean_diff": float("nan"), "t_p": float("nan"), "wilcoxon_p": float("nan"), "wins": 0,
                "ties": 0, "losses": 0}
    return paired_comparison([a[k] for k in keys], [b[k] for k in keys]).as_dict()


def _p(v: float) -> str:
    return "-" if not math.isfinite(v) else (f"{v:.3f}" if v >= 0.001 else f"{v:.1e}")


def render(records: list[dict] | None = None, results: Path = RESULTS, bn: str | None = None) -> str:
    """Markdown: per batch-norm mode (``bn``, default every mode the records have) the table (mean ± sample std
    over test phantoms and seeds), the paired tests SFG vs each baseline, and the reading."""
    records = load_records(results) if records is None else records
    if not records:
        return "No Table 2 records yet."
    modes = [bn] if bn else bn_modes(records)
    seeds = sorted({r["seed"] for r in records})
    n_ph = sorted({len(r["phantoms"]) for r in records})
    lines = [f"{len(records)} of {len(ROWS) * len(records[0]['protocol']['seeds'])} (row, seed) runs; "
             f"training seeds {seeds}; {'/'.join(map(str, n_ph))} held-out phantoms each; "
             f"{records[0]['protocol']['num_samples']} posterior samples. Mean ± sample std over phantoms and seeds."]
    for mode in modes:
        lines += ["", f"**Batch-norm at test: {BN_TITLES.get(mode, mode)}**", ""]
        lines += _render_mode(records, mode)
    return "\n".join(lines)


def _render_mode(records: list[dict], bn: str) -> list[str]:
    rows = [r for r, _ in ROWS if _values(records, r, "psnr_overall", bn) or _values(records, r, "dice_mean", bn)]
    names = dict(ROWS)
    lines = ["| Method | runs | " + " | ".join(f"PSNR {n} (dB)" for _, n in PSNR_COLUMNS) + " | "
             + " | ".join(f"Dice {n}" for _, n in DICE_COLUMNS) + " |",
             "| --- | --- |" + " --- |" * (len(PSNR_COLUMNS) + len(DICE_COLUMNS))]
    for row in rows:
        runs = sum(1 for r in records if r["row"] == row and _phantoms(r, bn))
        cells = [_cell(_values(records, row, m, bn).values(), 2) for m, _ in PSNR_COLUMNS]
        cells += [_cell(_values(records, row, m, bn).values(), 3) for m, _ in DICE_COLUMNS]
        lines.append(f"| {names[row]} | {runs} | " + " | ".join(cells) + " |")
    if REFERENCE in rows and len(rows) > 1:
        lines += ["", f"Paired tests, SFG minus each baseline over the (seed, phantom) pairs both have "
                      "(mean difference; pairs SFG won / lost; p of the paired t-test / Wilcoxon signed-rank):", "",
                  "| Baseline | pairs | " + " | ".join(TESTED) + " |", "| --- | --- |" + " --- |" * len(TESTED)]
        for row in rows:
            if row == REFERENCE:
                continue
            tests = [paired_tests(records, m, row, bn=bn) for m in TESTED]
            lines.append(f"| {names[row]} | {tests[0]['n']} | " + " | ".join(
                f"{t['mean_diff']:+.3f} ({t['wins']}/{t['losses']}; p {_p(t['t_p'])} / {_p(t['wilcoxon_p'])})"
                for t in tests) + " |")
    lines += ["", reading(records, bn)]
    return lines


def reading(records: list[dict], bn: str = "population") -> str:
    """Is SFG best on bones (the paper's finding)? Said from the means, with the paired tests' verdict."""
    means = {r: np.mean(list(_values(records, r, "psnr_bones", bn).values()))
             for r, _ in ROWS if _values(records, r, "psnr_bones", bn)}
    if REFERENCE not in means:
        return "Reading: no SFG record yet, so whether SFG is best on bones cannot be said."
    if len(means) == 1:
        return "Reading: only SFG has records yet, so whether it is best on bones cannot be said."
    best = max(means, key=means.get)
    if means[REFERENCE] >= means[best] - 1e-9:  # a tie at the top counts as best
        best = REFERENCE
    names = dict(ROWS)
    if best == REFERENCE:
        others = [r for r in means if r != REFERENCE]
        sig = [r for r in others if paired_tests(records, "psnr_bones", r, bn=bn)["t_p"] < 0.05]
        return (f"Reading: SFG has the highest mean bone PSNR ({means[REFERENCE]:.2f} dB) of the {len(means)} rows "
                f"with records; the paired t-test puts it significantly above (p < 0.05) "
                f"{len(sig)} of {len(others)} baselines" + (f" ({', '.join(names[r] for r in sig)})" if sig else "")
                + ". The paper found SFG best on bones.")
    t = paired_tests(records, "psnr_bones", best, bn=bn)
    return (f"Reading: SFG is not best on bones here: {names[best]} has the highest mean bone PSNR "
            f"({means[best]:.2f} dB against SFG's {means[REFERENCE]:.2f} dB; paired t-test p {_p(t['t_p'])}, "
            f"{t['n']} pairs). The paper found SFG best on bones.")


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=REPO / "runs" / "table2",
                   help="phantoms, runs and checkpoints go here (default runs/table2, ignored by git)")
    p.add_argument("--results", type=Path, default=RESULTS, help="one JSON record per (row, seed)")
    p.add_argument("--tiny", action="store_true", help="tiny widths, 1 epoch, 2 test phantoms, 2 samples")
    p.add_argument("--rows", nargs="+", choices=[r for r, _ in ROWS], default=[r for r, _ in ROWS])
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the protocol's)")
    p.add_argument("--num-samples", type=int, default=None, help="posterior samples (default: the protocol's, 50)")
    p.add_argument("--max-epochs", type=int, default=None, help="override the protocol's epochs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the protocol's, 1)")
    p.add_argument("--render", action="store_true", help="print the markdown table of the records and exit")
    p.add_argument("--bn", choices=sorted(BN_TITLES), default=None,
                   help="with --render: one batch-norm mode's table (default: every mode the records have)")
    args = p.parse_args(argv)

    if args.render:
        print(render(results=args.results, bn=args.bn))
        return 0
    protocol = json.loads(json.dumps(TINY if args.tiny else PROTOCOL))
    if args.seeds:
        protocol["seeds"] = args.seeds
    if args.num_samples:
        protocol["num_samples"] = args.num_samples
    if args.max_epochs:
        protocol["train"]["max_epochs"] = args.max_epochs
    if args.threads:
        protocol["threads"] = args.threads
    schedule(protocol)

    import torch

    torch.set_num_threads(int(protocol["threads"]))
    args.results.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    train_dl, test_dl = make_data(protocol, args.work)
    # seed-major order, SFG first: a stopped run has SFG and the baselines at the first seeds (what the paired
    # tests need) rather than all seeds of the first rows
    order = sorted(args.rows, key=lambda r: r != REFERENCE)
    for seed in protocol["seeds"]:
        for row in order:
            path = record_path(args.results, row, seed)
            if path.is_file() and json.loads(path.read_text()).get("protocol") == protocol:
                print(f"{row} seed {seed}: record exists, skipped", flush=True)
                continue
            t0 = time.perf_counter()
            rec = run_one(protocol, row, seed, args.work, args.results, train_dl, test_dl)
            m = [c["metrics"] for c in rec["phantoms"].values()]
            print(f"{row} seed {seed}: train {rec['train_wall_s']:.0f} s ({rec['train_cpu_s']:.0f} CPU-s), "
                  f"eval {rec['eval_wall_s']:.0f} s ({rec['eval_cpu_s']:.0f} CPU-s), "
                  f"PSNR bones {np.nanmean([x.get('psnr_bones', np.nan) for x in m]):.2f} dB, "
                  f"Dice mean {np.nanmean([x.get('dice_mean', np.nan) for x in m]):.3f} "
                  f"({time.perf_counter() - t0:.0f} s) -> {record_path(args.results, row, seed)}", flush=True)
    print(render(load_records(args.results, protocol)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
