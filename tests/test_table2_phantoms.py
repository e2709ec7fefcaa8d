"""benchmarks/table2_phantoms.py: the paper's Table 2 on phantoms, end to end at tiny size, and its rendering."""

import json

import numpy as np
import pytest
from scipy import stats


@pytest.fixture(scope="module")
def table2(load_benchmark):
    return load_benchmark("table2_phantoms", register=True)


def test_rows_are_the_bundle_variants(table2):
    # each of the paper's six rows is a variant file of the pelvis bundle, so a change there reaches the table
    assert [r for r, _ in table2.ROWS] == ["single_task", "hard_sharing", "constant_mask", "constant_p",
                                           "cross_stitch", "sfg"]
    for row, _ in table2.ROWS:
        assert (table2.CONFIGS / "variants" / f"{row}.json").is_file()
    p = table2.schedule(json.loads(json.dumps(table2.PROTOCOL)))
    assert p["iterations"] == 400 and len(p["seeds"]) >= 3 and p["num_samples"] == 50
    assert np.exp(-p["train"]["tau_rate"] * p["iterations"]) == pytest.approx(table2.TAU_MIN, rel=1e-4)


def test_tiny_run_writes_one_record_per_row_and_seed_and_resumes(table2, tmp_path, capsys):
    work, results = tmp_path / "work", tmp_path / "records"
    args = ["--tiny", "--work", str(work), "--results", str(results), "--rows", "hard_sharing", "sfg"]
    assert table2.main(args) == 0
    paths = sorted(results.glob("*.json"))
    assert [p.name for p in paths] == ["hard_sharing_seed0.json", "sfg_seed0.json"]
    rec = json.loads(paths[1].read_text())
    assert rec["row"] == "sfg" and rec["seed"] == 0 and rec["variant_config"] == {"grouping": "sfg"}
    assert rec["revision"] and rec["machine"]["cpu"] and rec["train_wall_s"] > 0 and rec["protocol"]["num_samples"] == 2
    assert list(rec["phantoms"]) == ["seed9001", "seed9002"]  # held out: RAS, then stored LPS
    assert rec["phantoms"]["seed9002"]["storage"] == {"orientation": "LPS"}
    metrics = rec["phantoms"]["seed9001"]["metrics"]
    for key in ("psnr_overall", "psnr_bones", "psnr_organs", "psnr_prostate", "psnr_bladder", "psnr_rectum",
                "dice_left_femoral_head", "dice_right_femoral_head", "dice_prostate", "dice_bladder", "dice_rectum"):
        assert np.isfinite(metrics[key]), key
    assert not list(results.glob("*.tmp*"))
    text = capsys.readouterr().out
    assert "| MT hard sharing | 1 |" in text and "| SFG | 1 |" in text and "Reading:" in text
    # a rerun skips what has a record
    stamp = [p.stat().st_mtime_ns for p in paths]
    assert table2.main(args) == 0
    assert "sfg seed 0: record exists, skipped" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in paths] == stamp


def _record(row, seed, values):
    return {"benchmark": "table2_phantoms", "protocol": {"seeds": [0, 1, 2], "num_samples": 50}, "row": row,
            "seed": seed, "phantoms": {f"p{i}": {"metrics": {"psnr_bones": v, "psnr_overall": v + 5, "dice_mean": 0.5,
                                                              "psnr_organs": v}} for i, v in enumerate(values)}}


def test_render_means_stds_paired_tests_and_reading(table2):
    rng = np.random.default_rng(0)
    base = {s: rng.normal(20, 1, 3) for s in range(3)}
    records = [_record("sfg", s, base[s] + 1.0 + rng.normal(0, 0.1, 3)) for s in range(3)]
    records += [_record("hard_sharing", s, base[s]) for s in range(3)]
    text = table2.render(records)
    sfg = np.concatenate([list(r["phantoms"][f"p{i}"]["metrics"]["psnr_bones"] for i in range(3))
                          for r in records[:3]])
    hs = np.concatenate([base[s] for s in range(3)])
    row = next(line for line in text.splitlines() if line.startswith("| SFG |"))
    assert f"{sfg.mean():.2f} ± {sfg.std(ddof=1):.2f}" in row  # mean ± sample std over phantoms and seeds
    t = table2.paired_tests(records, "psnr_bones", "hard_sharing")
    assert t["n"] == 9 and t["mean_diff"] == pytest.approx((sfg - hs).mean())
    assert t["t_p"] == pytest.approx(stats.ttest_rel(sfg, hs).pvalue)
    assert t["wilcoxon_p"] == pytest.approx(stats.wilcoxon(sfg, hs).pvalue)
    assert t["wins"] + t["ties"] + t["losses"] == 9 and "| MT hard sharing | 9 |" in text
    assert "Reading: SFG has the highest mean bone PSNR" in text and "1 of 1 baselines" in text
    # the other way round: the reading says so, naming the best row
    flipped = [_record("sfg", s, base[s]) for s in range(3)] + [_record("cross_stitch", s, base[s] + 2) for s in range(3)]
    assert "SFG is not best on bones here: cross-stitch" in table2.render(flipped)
    assert "no SFG record yet" in table2.render([_record("hard_sharing", 0, [1.0, 2.0])])
    assert "only SFG has records yet" in table2.render([_record("sfg", 0, [1.0, 2.0])])
    assert table2.render([]) == "No Table 2 records yet."


def test_unfinished_training_resumes_from_its_last_checkpoint(table2, tmp_path):
    import torch

    protocol = table2.schedule(json.loads(json.dumps(table2.TINY)))
    protocol["train"]["max_epochs"] = 2
    train_dl, _ = table2.make_data(protocol, tmp_path)
    run_dir = tmp_path / "runs" / "hard_sharing" / "seed0"
    table2.train_row(protocol, "hard_sharing", 0, train_dl, run_dir)
    models = run_dir / "models"
    (models / "checkpoint_final.pt").unlink()  # as if stopped after the epoch-2 checkpoint
    (models / "checkpoint_epoch=2.pt").rename(models / "checkpoint_epoch=1.pt")  # and before it
    ckpt = torch.load(models / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=False)
    ckpt["trainer"]["iteration"] = ckpt["trainer"]["epoch_length"]  # the end of epoch 1
    torch.save(ckpt, models / "checkpoint_epoch=1.pt")
    spent = table2.train_row(protocol, "hard_sharing", 0, train_dl, run_dir)
    assert spent["segments"] == 2 and spent["resumed_from"] == "checkpoint_epoch=1.pt"
    final = torch.load(models / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert final["trainer"]["iteration"] == 2 * final["trainer"]["epoch_length"]
    # a finished training is not run again
    assert table2.train_row(protocol, "hard_sharing", 0, train_dl, run_dir)["segments"] == 2
