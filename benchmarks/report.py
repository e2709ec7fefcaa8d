"""Render the docs' tables from the raw records under ``results/``.

Every rendered table sits in a markdown file between two markers::

    <!-- report:adashare_null_short -->
    ...generated, do not edit by hand...
    <!-- /report:adashare_null_short -->

``python benchmarks/report.py`` rewrites the text between every pair of markers in ``docs/reproduction.md``,
``docs/performance.md`` and the bundles' docs (``bundles/*/docs/*.md``) with its rendering from the records;
``--check`` rewrites nothing and exits 1, naming each table whose committed text differs from its
rendering (or whose marker names no known table); ``--list`` prints the tables and their records.

A table is rendered from records only (``benchmarks/records.py`` writes them); the statistics, the
sample std and every paired comparison, come from :mod:`mtl_med.metrics.stats`. Numbers of earlier runs
whose raw records were not kept are not tables: the docs quote them as withdrawn prose.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mtl_med.metrics.stats import format_mean_std, format_p, mean_ci, paired_comparison  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("docs/reproduction.md", "docs/performance.md", "bundles/*/docs/*.md")
MARKER = re.compile(r"<!-- report:(?P<name>[A-Za-z0-9_.-]+) -->\n(?P<body>.*?)<!-- /report:(?P=name) -->", re.S)


def load(results: Path, benchmark: str) -> list[dict]:
    folder = results / benchmark
    if not folder.is_dir():
        raise FileNotFoundError(f"no records: {folder} does not exist")
    recs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if not p.name.startswith(".")]
    if not recs:
        raise FileNotFoundError(f"no records in {folder}")
    return recs


def machine_line(recs: list[dict]) -> str:
    """The machines of a set of records, as ``2-core AMD EPYC (avx512_bf16)``."""
    seen = []
    for r in recs:
        m = r.get("machine", {})
        model = m.get("cpu_model") or m.get("cpu") or "unknown CPU"
        flags = m.get("cpu_flags")
        cores = m.get("cpus")
        text = f"{cores}-core {model}" if cores else model
        if flags is not None:
            text += f" ({', '.join(flags) if flags else 'no bf16 / AMX flags'})"
        if text not in seen:
            seen.append(text)
    return "; ".join(seen)


def revisions(recs: list[dict]) -> str:
    revs = []
    for r in recs:
        code = r.get("code") or {}
        rev = code.get("commit") or (r.get("machine") or {}).get("revision")
        if rev:
            rev = rev[:10] + (" with local changes" if code.get("local_changes") else "")
            if rev not in revs:
                revs.append(rev)
    return ", ".join(revs) or "unknown"


# --- tables -------------------------------------------------------------------------------------


def _null_runs(results: Path, tag: str):
    """The null control's records named ``tag_*``: (records, condition -> seed -> spread, the identical
    conditions, the first distinct record's config)."""
    recs = [r for r in load(results, "adashare_null") if r["name"].startswith(f"{tag}_")]
    if not recs:
        raise FileNotFoundError(f"no adashare_null records named {tag}_*")
    by: dict[str, dict[int, float]] = {}
    for r in recs:
        by.setdefault(r["config"]["condition"], {})[r["seed"]] = r["metrics"]["mean_alpha_task_spread"]
    identical = sorted((c for c in by if c.startswith("identical")), key=lambda c: int(c.removeprefix("identical_digit")))
    if "distinct" not in by or not identical:
        raise ValueError(f"adashare_null {tag}: need records of 'distinct' and of an identical condition, got {sorted(by)}")
    cfg = next(r["config"] for r in recs if r["config"]["condition"] == "distinct")
    return recs, by, identical, cfg


def _null_tests(by: dict, identical: list[str]) -> list[tuple[str, list[int], object]]:
    """Distinct minus each identical condition, paired by the seeds both have."""
    out = []
    for c in identical:
        seeds = sorted(set(by["distinct"]) & set(by[c]))
        out.append((c, seeds, paired_comparison([by["distinct"][s] for s in seeds], [by[c][s] for s in seeds])))
    return out


def _copy(c: str) -> str:
    return f"`digit_{c.removeprefix('identical_digit')}`"


def _verdict(tests) -> tuple[bool, str]:
    shown = all(t.mean_diff > 0 and t.significant() for _, _, t in tests)
    beaten = [_copy(c) for c, _, t in tests if t.mean_diff > 0 and t.significant()]
    if shown:
        return True, "task-specificity shown at p < 0.05 (paired t-test) against every identical-task null run"
    if beaten:
        return False, (f"task-specificity not shown: distinct tasks beat the copies of {', '.join(beaten)} at p < 0.05 "
                       "(paired t-test) but not every identical-task null run")
    return False, "task-specificity not shown at p < 0.05 (paired t-test)"


def adashare_null_summary(results: Path, tag: str) -> str:
    """One sentence for the status list: the null control's paired comparisons and the verdict."""
    recs, by, identical, _ = _null_runs(results, tag)
    tests = _null_tests(by, identical)
    nulls = "; ".join(f"ten copies of {_copy(c)} {format_mean_std(list(by[c].values()), digits=3)} ({len(by[c])} seeds), "
                      f"distinct minus copies {t.summary()}" for c, _, t in tests)
    return (f"mean spread of alpha between tasks {format_mean_std(list(by['distinct'].values()), digits=3)} for ten distinct tasks "
            f"({len(by['distinct'])} seeds, sample std); {nulls}: {_verdict(tests)[1]}.\n")


def adashare_null(results: Path, tag: str) -> str:
    """Distinct tasks against identical copies of one task: alpha's spread between tasks, paired by seed."""
    recs, by, identical, cfg = _null_runs(results, tag)
    tests = _null_tests(by, identical)
    conds = ["distinct", *identical]
    seeds = sorted(set().union(*(set(by[c]) for c in conds)))
    head = ["seed", "ten distinct tasks (`digit_0` .. `digit_9`)", *(f"ten copies of {_copy(c)}" for c in identical)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join([str(s), *(f"{by[c][s]:.3f}" if s in by[c] else "-" for c in conds)]) + " |" for s in seeds]
    lines.append("| mean ± sample std (seeds) | " + " | ".join(f"{format_mean_std(list(by[c].values()), digits=3)} ({len(by[c])})" for c in conds) + " |")
    cpu = [r["timings"]["search_cpu_s"] for r in recs]
    lines += [
        "",
        f"Mean spread of alpha between tasks (per block max - min over tasks, averaged over the 8 blocks); ResNet-18 "
        f"width {cfg['width']}, {cfg['image_size']}x{cfg['image_size']} digits, {cfg['warmup_epochs']} warm-up + "
        f"{cfg['policy_epochs']} policy epochs, policy lr {cfg['policy_lr']}, tau to {cfg['tau_final']}; search only. "
        "Distinct minus identical copies, paired by seed:",
        "",
        *(f"- copies of {_copy(c)}: {t.summary()}" for c, _, t in tests),
        "",
        f"Verdict: {_verdict(tests)[1]}.",
        "",
        f"Records: `results/adashare_null/{tag}_*.json`; search {min(cpu):.0f}-{max(cpu):.0f} CPU-s each, one torch thread, "
        f"{machine_line(recs)}; code {revisions(recs)}.",
    ]
    return "\n".join(lines) + "\n"


def _heldout(results: Path, weights: str | None = None, preset: str | None = None) -> list[dict]:
    """The held-out records (``benchmarks/uncertainty.py``) of these weights and preset, if given."""
    recs = [r for r in load(results, "uncertainty") if weights in (None, r["config"]["weights"]) and preset in (None, r["config"]["preset"])]
    if not recs:
        raise FileNotFoundError(f"no uncertainty record of weights {weights} on preset {preset}")
    return recs


def uncertainty(results: Path) -> str:
    """The flagship's posterior uncertainty on held-out phantoms (the shipped weights on the medium preset, one row
    per phantom)."""
    recs = _heldout(results, "demo", "medium")
    if len(recs) != 1:
        raise ValueError(f"uncertainty: expected one record of the shipped weights on the medium preset, got {len(recs)}")
    rec = recs[0]
    lines = ["| phantom | stored | Spearman rho (std vs error) | error in lowest / highest std decile (HU) | label error AUC | label error rate |",
             "| --- | --- | --- | --- | --- | --- |"]
    rho, auc = [], []
    for seed, c in sorted(rec["cases"].items(), key=lambda kv: int(kv[0])):
        dec = c["error_by_std_decile"]
        rho.append(c["std_error_spearman"])
        auc.append(c["label_error_auc"])
        lines.append(f"| seed {seed} | {c['storage']} | {c['std_error_spearman']:.2f} | {dec[0]:.0f} / {dec[-1]:.0f} | "
                     f"{c['label_error_auc']:.3f} | {c['label_error_rate']:.3f} |")
    n = len(rho)
    r, a = mean_ci(rho), mean_ci(auc)
    lines.append(f"| mean (sample std), {n} phantoms | | {r.mean:.2f} ({r.std:.2f}) | | {a.mean:.3f} ({a.std:.3f}) | |")
    lines += ["", f"95 % t intervals over the {n} phantoms: rho {r.low:.2f} to {r.high:.2f}, AUC {a.low:.3f} to {a.high:.3f}. "
                  f"Record: `results/uncertainty/demo_weights.json`; {machine_line(recs)}, code {revisions(recs)}."]
    return "\n".join(lines) + "\n"


#: the flagship's goals on held-out phantoms: Dice per organ, PSNR overall and on bones (dB); the paper's Table 2
#: has PSNR 27.7 dB overall
HELDOUT_GOALS = {"dice": 0.90, "psnr_overall": 27.7, "psnr_bones": 25.0}
ORGANS = ("left_femoral_head", "right_femoral_head", "prostate", "bladder", "rectum")


def heldout_accuracy(results: Path) -> str:
    """Each held-out record's accuracy per phantom against the goals: Dice per organ, PSNR overall and on bones,
    MAE; the mean over phantoms with its sample std, and how many phantoms meet each goal."""
    out = []
    for rec in sorted(_heldout(results), key=lambda r: (r["config"]["weights"], r["config"]["preset"])):
        cfg, cases = rec["config"], sorted(rec["cases"].items(), key=lambda kv: int(kv[0]))
        cols = [f"dice_{o}" for o in ORGANS] + ["psnr_overall", "psnr_bones", "mae_overall"]
        head = ["Dice " + o.replace("_", " ") for o in ORGANS] + ["PSNR overall (dB)", "PSNR bones (dB)", "MAE (HU)"]
        lines = [f"**Weights {cfg['weights']}, preset {cfg['preset']}, {cfg['num_samples']} posterior samples**", "",
                 "| phantom | stored | " + " | ".join(head) + " |", "| --- | --- | " + " | ".join("---" for _ in cols) + " |"]
        for seed, c in cases:
            m = c["metrics"]
            lines.append(f"| seed {seed} | {c['storage']} | " + " | ".join(
                f"{m[k]:.3f}" if k.startswith("dice") else f"{m[k]:.1f}" for k in cols) + " |")
        vals = {k: [c["metrics"][k] for _, c in cases] for k in cols}
        lines.append(f"| mean ± std, {len(cases)} phantoms | | " + " | ".join(
            format_mean_std(vals[k], digits=3 if k.startswith("dice") else 1) for k in cols) + " |")
        goal = {k: HELDOUT_GOALS["dice"] if k.startswith("dice") else HELDOUT_GOALS.get(k) for k in cols}
        lines.append("| phantoms meeting the goal | | " + " | ".join(
            "-" if goal[k] is None else f"{sum(v >= goal[k] for v in vals[k])} of {len(cases)} (>= {goal[k]:g})" for k in cols) + " |")
        out += lines + [""]
    recs = _heldout(results)
    out.append(f"Records: `results/uncertainty/*.json`; {machine_line(recs)}, code {revisions(recs)}.")
    return "\n".join(out) + "\n"


def table2_phantoms(results: Path) -> str:
    """The paper's Table 2 rows trained and evaluated on phantoms (``benchmarks/table2_phantoms.py``)."""
    import table2_phantoms as t2

    load(results, "table2")  # raises when there are none
    return t2.render(results=results / "table2").rstrip("\n") + "\n"


def training_step(results: Path) -> str:
    """SFG's training step against a plain network of the same backbone (``benchmarks/sfg_highresnet_step.py``),
    one row per record and pair: seconds per step per precision / memory format, FLOP ratio, overhead beyond it."""
    recs = load(results, "training_step")
    lines = ["| record | pair | Adam | FLOP ratio | format | plain (s/step) | SFG (s/step) | time ratio | overhead beyond FLOPs | conv rate fp32 / bf16 (GFLOP/s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in recs:
        rate = r["metrics"]["conv_rate_gflops"]
        rates = f"{rate['fp32']:.0f} / {rate['bf16']:.0f}" if "bf16" in rate else f"{rate['fp32']:.0f} / -"
        for pair, row in r["metrics"]["pairs"].items():
            plain, sfg = sorted(row["flops"], key=row["flops"].get)  # the plain network has fewer FLOPs (keys are stored sorted)
            for fmt, over in row["overhead"].items():
                a, b = row["seconds"][plain][fmt], row["seconds"][sfg][fmt]
                lines.append(f"| {r['name']} | {pair}: {sfg} vs {plain} | {r['config'].get('adam', 'foreach')} | {row['flop_ratio']:.2f}x | {fmt} | "
                             f"{a:.3f} | {b:.3f} | {b / a:.2f}x | {over:.2f}x | {rates} |")
    lines += ["", f"Records: `results/training_step/*.json`; batch {recs[0]['config']['batch']}, {recs[0]['config']['size']}^2 pixels "
                  f"(pelvis; the vision pair 64^2), the fastest of {recs[0]['config']['steps']} steps per round, median over "
                  f"{recs[0]['config']['rounds']} rounds; {machine_line(recs)}; code {revisions(recs)}."]
    return "\n".join(lines) + "\n"


def posterior_paper(results: Path, name: str) -> str:
    """The paper job per slice-pass (``benchmarks/posterior_inference.py --paper-table``), one record."""
    path = results / "performance" / f"{name}.json"
    rec = json.loads(path.read_text())
    rows = rec["timings"]
    base = next(r for r in rows if r["engine"] == "dense" and not r["cropped"] and r["dtype"] == "float32")
    lines = ["| engine | regions | dtype | s / pass | CPU s / pass | GFLOP / pass | GFLOP/s | of 3x3 conv rate | job (min) | vs dense fp32 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {'cropped' if r['cropped'] else 'whole frame'} | {r['dtype']} | {r['seconds_per_pass']:.2f} | "
                     f"{r['cpu_seconds_per_pass']:.2f} | {r['gflop_per_pass']:.1f} | {r['gflops_achieved']:.1f} | "
                     f"{100 * r['fraction_of_conv_rate']:.0f}% | {r['job_minutes']:.1f} | {base['seconds_per_pass'] / r['seconds_per_pass']:.2f}x |")
    m, rate = rec["machine"], rec["metrics"]["conv_rate_gflops"]
    load = ", ".join(f"{v:.1f}" for v in m.get("load_average", []))
    lines += ["", f"3x3 convolution rate in the same run: {rate['float32']:.1f} GFLOP/s float32"
                  + (f", {rate['bfloat16']:.1f} GFLOP/s bfloat16" if "bfloat16" in rate else "")
                  + f". Record: `results/performance/{name}.json`; {m.get('cpus')}-core {m.get('cpu_model')} "
                  f"({', '.join(m.get('flags', []))}), {m.get('threads')} threads, load average {load}; code "
                  f"{str(rec['git'].get('revision'))[:10]}{' with local changes' if rec['git'].get('dirty') else ''}."]
    return "\n".join(lines) + "\n"


def flagship_training(results: Path) -> str:
    """The flagship weights' training curve (``benchmarks/flagship_training.py``): one row per resumed chunk with
    the bundle's own validation metrics at the chunk's validations."""
    recs = load(results, "flagship")
    if len(recs) != 1:
        raise ValueError(f"flagship: expected one record, got {len(recs)}")
    rec = recs[0]
    cfg, demo = rec["config"], rec["config"]["demo_json"]
    lines = ["| to epoch | validation Dice | validation PSNR (dB) | validation MAE (HU) | best Dice so far | wall (min) | CPU (min) |",
             "| ---: | --- | --- | --- | ---: | ---: | ---: |"]
    for c in rec["chunks"]:
        val = {k: ", ".join(f"{v:.3f}" if k == "val_dice" else f"{v:.1f}" for v in c["val"].get(k, [])) or "-"
               for k in ("val_dice", "val_psnr_hu", "val_mae_hu")}
        best = "-" if c.get("best_val_dice") is None else f"{c['best_val_dice']:.3f}"
        lines.append(f"| {c['to_epoch']} | {val['val_dice']} | {val['val_psnr_hu']} | {val['val_mae_hu']} | {best} | "
                     f"{c['wall_s'] / 60:.0f} | {c['cpu_s'] / 60:.0f} |")
    data = cfg["data"]
    status = {"plateau": "stopped at a plateau", "max_epochs": "stopped at its epoch limit"}.get(rec.get("stopped"), "still training")
    lines += ["", f"{len(rec['chunks'])} chunk(s) of {cfg['chunk_epochs']} epochs, {status}; {data['cases']} "
                  f"{'varied ' if data['varied'] else ''}{data['preset']} phantoms (data seed {data['seed']}, "
                  f"{data['val_fraction']:.0%} validation), widths {demo['features']}, patches {demo['patch_size']}, "
                  f"{demo['samples_per_volume']} patches per volume an epoch, training seed {cfg['seed']}. Record: "
                  f"`results/flagship/training.json`; {machine_line(rec['chunks'])}."]
    return "\n".join(lines) + "\n"


def branched_affinity_table(recs: list[dict]) -> str:
    """Branched MTN's task affinity per block against its noise ceiling (``branched_digits.py
    --same-task-control``): distinct tasks within a seed against the same task trained with the other seed
    of a pair, and distinct tasks across the two seeds; differences paired by seed pair."""
    distinct = {r["seed"]: r for r in recs if r["config"]["kind"] == "distinct"}
    same = sorted((r for r in recs if r["config"]["kind"] == "same_task"), key=lambda r: r["seed"])
    if not distinct or not same:
        raise ValueError(f"branched_affinity: need 'distinct' and 'same_task' records, got {sorted({r['config']['kind'] for r in recs})}")
    protocol = ("tasks", "num_images", "image_seed", "width", "image_size", "encoder_epochs", "dataset", "location_names")
    cfg = same[0]["config"]
    for r in recs:
        differ = [k for k in protocol if r["config"].get(k) != cfg.get(k)]
        if differ:
            raise ValueError(f"branched_affinity: {r['name']} differs from {same[0]['name']} in {differ}")
    pairs = [(r["seed"], r["config"]["other_seed"]) for r in same]
    missing = sorted({s for q in pairs for s in q} - set(distinct))
    if missing:
        raise ValueError(f"branched_affinity: no 'distinct' record of seed(s) {missing}")
    seeds = sorted({s for q in pairs for s in q})
    if len(seeds) != 2 * len(pairs):
        raise ValueError(f"branched_affinity: the seed pairs {pairs} share a seed; they must be disjoint")
    blocks, tasks, n = cfg["location_names"], cfg["tasks"], len(same)
    dist = {s: distinct[s]["metrics"]["mean_over_pairs"] for s in seeds}
    lines = [f"| block | distinct tasks, same seed ({len(seeds)} seeds) | same task, other seed ({n} pairs) | "
             f"distinct minus same task, paired (95 % CI) | t p | distinct tasks, other seed ({n} pairs) | "
             "distinct (other seed) minus same task (95 % CI) | t p |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for b, block in enumerate(blocks):
        d = [(dist[s][b] + dist[o][b]) / 2 for s, o in pairs]
        t = [r["metrics"]["mean_same_task"][b] for r in same]
        x = [r["metrics"]["mean_distinct_other_seed"][b] for r in same]
        a, c = paired_comparison(d, t), paired_comparison(x, t)
        lines.append(f"| {block} | {format_mean_std([dist[s][b] for s in seeds], digits=3)} | {format_mean_std(t, digits=3)} | "
                     f"{a.mean_diff:+.3f} ({a.ci_low:+.3f} to {a.ci_high:+.3f}) | {format_p(a.t_p)} | {format_mean_std(x, digits=3)} | "
                     f"{c.mean_diff:+.3f} ({c.ci_low:+.3f} to {c.ci_high:+.3f}) | {format_p(c.t_p)} |")
    per_task = np.array([r["metrics"]["same_task"] for r in same])  # (pairs, D, N)
    low, high = per_task.mean(axis=0).min(axis=1), per_task.mean(axis=0).max(axis=1)
    own = max(float(np.abs(np.array(distinct[s]["metrics"]["stage_affinity"]) - np.array(distinct[s]["metrics"]["affinity"])).max())
              for s in seeds if s == cfg["image_seed"]) if cfg["image_seed"] in seeds else float("nan")
    stage = [distinct[s]["timings"]["stage_cpu_s"] for s in seeds]
    lines += [
        "",
        f"RSA task affinity at the end of each of VGG-11 (BN)'s blocks (width x{cfg['width']}, {cfg['image_size']}x{cfg['image_size']} "
        f"{cfg.get('dataset', 'digits')}, {len(tasks)} tasks {', '.join(f'`{x}`' for x in tasks)}); one single-task network per task "
        f"and seed, {cfg['encoder_epochs']} epochs, as the benchmark's affinity stage; seeds {', '.join(map(str, seeds))}, paired "
        f"{', '.join(f'({s}, {o})' for s, o in pairs)}. Every network is measured on the same {cfg['num_images']} held-out "
        f"validation images (drawn with seed {cfg['image_seed']}): RDM of 1 - Pearson between images, Spearman between "
        "upper triangles. Distinct tasks, same seed: mean over the "
        f"{len(tasks) * (len(tasks) - 1) // 2} task pairs of one seed (mean ± sample std over seeds); same task, other seed: "
        "each task's network against the same task's of the other seed of its pair, mean over tasks (± over pairs); "
        "distinct tasks, other seed: the task pairs across the two seeds of a pair. Differences per seed pair (the "
        f"same-seed value: the mean of its two seeds), paired t-test and its 95 % CI over the {n} pairs "
        "(`mtl_med.metrics.stats.paired_comparison`). Same-task affinity of single tasks, mean over pairs, ranges "
        + "; ".join(f"{bl} {lo:.2f}-{hi:.2f}" for bl, lo, hi in zip(blocks, low, high)) + ".",
        "",
        f"Records: `results/branched_affinity/*.json`; the seed-{cfg['image_seed']} stage's own affinity file agrees with its "
        f"rows here to {own:.1e}; affinity stage {min(stage):.0f}-{max(stage):.0f} CPU-s a seed "
        f"({len(tasks)} networks), one torch thread, {machine_line(recs)}; code {revisions(recs)}.",
    ]
    return "\n".join(lines) + "\n"


def branched_affinity(results: Path) -> str:
    return branched_affinity_table(load(results, "branched_affinity"))


def selective(results: Path) -> str:
    import selective_digits

    return selective_digits.render(results)


def sfg_specialisation(results: Path, tag: str) -> str:
    import sfg_specialisation as sfg

    return sfg.render(results, tag)


def adashare_tables(results: Path) -> str:
    import adashare_digits

    return adashare_digits.render(results)


def dense_scenes(results: Path) -> str:
    import dense_scenes as ds

    return ds.render(results)


def pelvis_training(results: Path, table: str) -> str:
    """The pelvis bundle's short training runs (``benchmarks/pelvis_training.py``): fp32 against bf16 autocast,
    and one epoch's time waiting on the data loader."""
    import pelvis_training as pt

    return pt.render_accuracy(results) if table == "amp_accuracy" else pt.render_loading(results)


TABLES: dict[str, tuple[Callable[[Path], str], str]] = {
    "posterior_paper": (lambda res: posterior_paper(res, "posterior_paper_20261207T200955Z"),
                        "results/performance/posterior_paper_20261207T200955Z.json"),
    "table2_phantoms": (table2_phantoms, "results/table2/*.json"),
    "training_step": (training_step, "results/training_step/*.json"),
    "adashare_null_short": (lambda res: adashare_null(res, "short"), "results/adashare_null/short_*.json"),
    "adashare_null_short_summary": (lambda res: adashare_null_summary(res, "short"), "results/adashare_null/short_*.json"),
    "adashare_null_variant": (lambda res: adashare_null(res, "variant"), "results/adashare_null/variant_*.json"),
    "uncertainty": (uncertainty, "results/uncertainty/*.json"),
    "heldout_accuracy": (heldout_accuracy, "results/uncertainty/*.json"),
    "branched_affinity": (branched_affinity, "results/branched_affinity/*.json"),
    "data_loading": (lambda res: pelvis_training(res, "data_loading"), "results/performance/data_loading*.json"),
    "amp_accuracy": (lambda res: pelvis_training(res, "amp_accuracy"), "results/performance/amp_accuracy_seed*.json"),
    "flagship_training": (flagship_training, "results/flagship/*.json"),
    "selective": (selective, "results/selective/*.json"),
    "sfg_fig6_cpu100": (lambda res: sfg_specialisation(res, "cpu100"), "results/sfg_specialisation/cpu100_*.json"),
    "dense_scenes": (dense_scenes, "results/dense_scenes/*.json"),
    "adashare_tables": (adashare_tables, "results/adashare_tables/*.json"),
}


# --- files --------------------------------------------------------------------------------------


def doc_files(root: Path) -> list[Path]:
    return sorted({p for pattern in DOCS for p in root.glob(pattern) if p.is_file()})


def render_text(text: str, results: Path, where: str) -> tuple[str, list[str], list[str]]:
    """``text`` with every marked table rendered; returns it, the tables that changed and the problems."""
    changed, problems = [], []

    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            problems.append(f"{where}: unknown table {name!r}")
            return m.group(0)
        try:
            body = TABLES[name][0](results)
        except (FileNotFoundError, ValueError, KeyError) as e:
            problems.append(f"{where}: table {name!r} cannot be rendered: {e}")
            return m.group(0)
        if body != m.group("body"):
            changed.append(f"{where}: {name}")
        return f"<!-- report:{name} -->\n{body}<!-- /report:{name} -->"

    return MARKER.sub(sub, text), changed, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 when a committed table differs from its rendering")
    p.add_argument("--root", default=str(ROOT), help="repository root (its docs and, unless --results, its results/)")
    p.add_argument("--results", default=None, help="the records' folder (default: <root>/results)")
    p.add_argument("--list", action="store_true", help="print the tables and the records each is rendered from")
    args = p.parse_args(argv)
    root = Path(args.root)
    results = Path(args.results) if args.results else root / "results"
    if args.list:
        for name, (_, source) in TABLES.items():
            print(f"{name}: {source}")
        return 0
    changed, problems, used = [], [], set()
    for path in doc_files(root):
        text = path.read_text()
        where = str(path.relative_to(root))
        used.update(m.group("name") for m in MARKER.finditer(text))
        new, ch, pr = render_text(text, results, where)
        changed += ch
        problems += pr
        if not args.check and new != text:
            path.write_text(new)
    for msg in problems:
        print(f"error: {msg}", file=sys.stderr)
    if args.check:
        for msg in changed:
            print(f"differs from its rendering: {msg}", file=sys.stderr)
        if not changed and not problems:
            print(f"{len(used)} tables match their records")
        return 1 if changed or problems else 0
    for msg in changed:
        print(f"rendered: {msg}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
