"""The fig. 6 / appendix E table (``sfg_specialisation.py --record``, rendered by ``report.py``): section 5.3's
measure (probability sums) beside the argmax counts, sample std over seeds, the unrelated pair against its
duplicate-task null control paired by seed, and records of different protocols refused instead of mixed."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats


@pytest.fixture(scope="module")
def sfg(load_benchmark):
    return load_benchmark("sfg_specialisation")


def _runs(seed: int, unrelated: bool) -> dict:
    """Four layers; the unrelated pair loses shared probability with depth, the duplicate pair does not. In the
    last layer the argmax count (all kernels shared at p_s 0.45 > 0.30 each) and the sum (0.45) disagree."""
    r = np.random.default_rng(seed + (10 if unrelated else 0))
    sums = [[(1 - s) / 2, s, (1 - s) / 2] for s in ((0.8, 0.7, 0.6, 0.45) if unrelated else (0.7, 0.7, 0.7, 0.7)) + r.normal(0, 0.01, 4)]
    counts = [[0.0, 1.0, 0.0] for _ in sums]
    return {"probability_sums": sums, "proportions": counts, "val_score": 0.9 + 0.01 * seed, "iterations": 2400}


def _write(results: Path, exp: str, seed: int, metrics: dict, **config) -> None:
    folder = results / "sfg_specialisation"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"experiment": exp, "max_epochs": 60, "width": 0.25, "batch_size": 32, "grouping_lr_scale": 100.0, "tau_rate": 1e-3,
           "lambda2": 1e-5, **config}
    rec = {"name": f"t_{exp}_shared_seed{seed}", "seed": seed, "config": cfg, "metrics": metrics, "machine": {"cpu_model": "test CPU"}}
    (folder / f"t_{exp}_shared_seed{seed}.json").write_text(json.dumps(rec))


def test_the_table_uses_section_5_3s_measure_and_pairs_the_null_control_by_seed(tmp_path, sfg):
    runs = {(e, s): _runs(s, e == "unrelated") for e in ("unrelated", "duplicate") for s in (0, 1, 2)}
    for (e, s), m in runs.items():
        _write(tmp_path, e, s, m)
    text = sfg.render(tmp_path, "t")
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("| unrelated") and "probability sum" in line)
    last = [runs[("unrelated", s)]["probability_sums"][-1][1] for s in (0, 1, 2)]
    assert f"| {np.mean(last):.2f} ± {np.std(last, ddof=1):.2f} |" in row  # the sum, with the sample std
    count_row = next(line for line in lines if line.startswith("| unrelated") and "argmax" in line)
    assert "| 1.00 ± 0.00 |" in count_row  # the counts call every layer fully shared
    diff = next(line for line in lines if line.startswith("| shared, probability sum"))
    d = [runs[("unrelated", s)]["probability_sums"][-1][1] - runs[("duplicate", s)]["probability_sums"][-1][1] for s in (0, 1, 2)]
    p = stats.ttest_rel([runs[("unrelated", s)]["probability_sums"][-1][1] for s in (0, 1, 2)],
                        [runs[("duplicate", s)]["probability_sums"][-1][1] for s in (0, 1, 2)]).pvalue
    assert f"{np.mean(d):+.2f} (p {p:.2g})" in diff or f"{np.mean(d):+.2f} (p {p:.2f})" in diff, diff


def test_records_of_another_schedule_are_refused_not_mixed(tmp_path, sfg):
    for s in (0, 1):
        _write(tmp_path, "unrelated", s, _runs(s, True))
    _write(tmp_path, "duplicate", 0, _runs(0, False), grouping_lr_scale=1.0)
    with pytest.raises(ValueError, match="grouping_lr_scale"):
        sfg.render(tmp_path, "t")
