"""The same-task, different-seed control of the Branched MTN affinity (``branched_digits.py --same-task-control``):
each task's network is compared with the same task's network of the other seed of its pair, measured exactly as the
distinct-task affinities; a network compared with itself has affinity 1 at every block; the records name their
seeds; the rendered table's numbers are the records' numbers."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl_med.metrics import stats


@pytest.fixture(scope="module")
def branched(load_benchmark):
    return load_benchmark("branched_digits")


@pytest.fixture(scope="module")
def report(load_benchmark):
    return load_benchmark("report")


def test_control_metrics_compare_each_task_with_itself_across_seeds(branched):
    """Rows of every (task, seed) network; the same-task entries are task t of one seed against task t of the other,
    never another task nor the same seed."""
    tasks, seeds = ["a", "b", "c"], [4, 9]
    names = [branched.network_name(t, s) for s in seeds for t in tasks]
    m = len(names)
    # a symmetric A whose entries encode their row and column
    A = np.array([[[1.0 if i == j else 0.01 * min(i, j) + 0.1 * max(i, j) + d for j in range(m)] for i in range(m)] for d in (0.0, 0.5)])
    idx = {n: i for i, n in enumerate(names)}
    same = branched.control_metrics(A, tasks, names, 4, 9)
    for t_i, t in enumerate(tasks):
        expect = A[:, idx[f"{t}@seed4"], idx[f"{t}@seed9"]]
        np.testing.assert_allclose(same["same_task"][:, t_i], expect)
    cross = [A[:, idx[f"{i}@seed4"], idx[f"{j}@seed9"]] for i in tasks for j in tasks if i != j]
    np.testing.assert_allclose(same["mean_distinct_other_seed"], np.mean(cross, axis=0))
    own = branched.control_metrics(A, tasks, names, 9)
    within = [A[:, idx[f"{i}@seed9"], idx[f"{j}@seed9"]] for k, i in enumerate(tasks) for j in tasks[k + 1:]]
    np.testing.assert_allclose(own["mean_over_pairs"], np.mean(within, axis=0))
    assert own["affinity"].shape == (2, 3, 3)


def test_the_control_run_records_each_pair_with_its_seeds_and_a_network_against_itself_scores_one(tmp_path, monkeypatch, branched):
    """The whole control at a tiny size, with untrained networks in place of the training: ``left`` gets the same
    weights at both seeds (one network, compared with itself: affinity 1 at every block), ``odd`` different
    ones (below 1). The records carry their seeds, and the rows of seed 0 (whose held-out images the control uses) equal that stage's own affinity file."""
    real = branched.run_bundle

    def stage(configs, root, seed, **over):  # the stage with the networks' initial weights as their checkpoints
        wf, search = branched.branched_search(Path(root), seed, over)
        try:
            for t in search.task_names:
                torch.manual_seed(0 if t == "left" else seed)
                net = wf.parser.get_parsed_content("network_def", instantiate=True, lazy=False)  # a new network each time
                ckpt = Path(root) / "affinity" / "single_task" / t / "model_final.pt"
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"model": net.state_dict()}, ckpt)
        finally:
            wf.finalize()
        return real(configs, root, seed=seed, **over)  # reuses those checkpoints: affinity and search

    monkeypatch.setattr(branched, "run_bundle", stage)
    monkeypatch.setattr(sys.modules["records"], "RESULTS", tmp_path / "results")
    monkeypatch.setattr(sys, "argv", ["branched_digits.py", "--same-task-control", "--seeds", "0", "5", "--dataset", "placed_digits",
                                      "--tasks", "left", "odd", "--affinity_images", "24", "--width", "0.0625",
                                      "--workdir", str(tmp_path / "work"), "--record", "--record_tag", "tiny"])
    branched.main()
    folder = tmp_path / "results" / "branched_affinity"
    assert sorted(p.name for p in folder.glob("*.json")) == ["tiny_distinct_seed0.json", "tiny_distinct_seed5.json",
                                                            "tiny_same_task_seed0_seed5.json"]
    pair = json.loads((folder / "tiny_same_task_seed0_seed5.json").read_text())
    assert (pair["seed"], pair["config"]["other_seed"], pair["config"]["kind"]) == (0, 5, "same_task")
    assert pair["config"]["tasks"] == ["left", "odd"] and pair["config"]["num_images"] == 24
    same = np.array(pair["metrics"]["same_task"])  # (blocks, tasks)
    assert same.shape == (4, 2)
    np.testing.assert_allclose(same[:, 0], 1.0, atol=1e-9)  # `left`: one network, compared with itself
    assert np.all(same[:, 1] < 0.999)  # `odd`: two different networks
    first = json.loads((folder / "tiny_distinct_seed0.json").read_text())
    assert first["seed"] == 0 and first["config"]["kind"] == "distinct" and first["config"]["other_seed"] is None
    np.testing.assert_allclose(first["metrics"]["affinity"], first["metrics"]["stage_affinity"], atol=1e-12)


def _records(root, pairs, same_value, distinct_value, tasks=("a", "b", "c")):
    """Records of ``pairs`` as the benchmark writes them, with the given per-block means."""
    write = sys.modules["records"].write_record
    cfg = dict(tasks=list(tasks), num_images=50, image_seed=0, width=0.25, image_size=16, encoder_epochs=20, dataset="digits",
               location_names=["block1", "block2"])
    n = len(tasks)
    for s, o in pairs:
        for seed in (s, o):
            A = np.stack([np.full((n, n), distinct_value(seed, b)) for b in range(2)])
            for a in A:
                np.fill_diagonal(a, 1.0)
            write("branched_affinity", f"distinct_seed{seed}", root=root, seed=seed, config=dict(cfg, kind="distinct", other_seed=None),
                  metrics={"affinity": A, "stage_affinity": A, "mean_over_pairs": [distinct_value(seed, b) for b in range(2)]},
                  timings={"stage_cpu_s": 100.0, "encoders_reused": []})
        same = np.array([[same_value(s, b) + 0.01 * (t - 1) for t in range(n)] for b in range(2)])
        write("branched_affinity", f"same_task_seed{s}_seed{o}", root=root, seed=s, config=dict(cfg, kind="same_task", other_seed=o),
              metrics={"same_task": same, "mean_same_task": same.mean(axis=1), "distinct_other_seed": np.zeros((2, n, n)),
                       "mean_distinct_other_seed": [same_value(s, b) - 0.1 for b in range(2)]},
              timings={"affinity_cpu_s": 10.0})


def test_the_rendered_comparison_is_the_records_numbers(tmp_path, report):
    pairs = [(0, 1), (2, 3), (4, 5)]
    same_value = lambda s, b: 0.9 - 0.3 * b + 0.01 * s  # noqa: E731
    distinct_value = lambda s, b: 0.8 - 0.4 * b + 0.02 * s  # noqa: E731
    _records(tmp_path, pairs, same_value, distinct_value)
    text = report.branched_affinity(tmp_path)
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| block")}
    for b in range(2):
        row = rows[f"block{b + 1}"]
        seeds = [s for q in pairs for s in q]
        assert row[1] == stats.format_mean_std([distinct_value(s, b) for s in seeds], digits=3)
        assert row[2] == stats.format_mean_std([same_value(s, b) for s, _ in pairs], digits=3)
        test = stats.paired_comparison([(distinct_value(s, b) + distinct_value(o, b)) / 2 for s, o in pairs],
                                       [same_value(s, b) for s, _ in pairs])
        assert row[3] == f"{test.mean_diff:+.3f} ({test.ci_low:+.3f} to {test.ci_high:+.3f})"
        assert row[5] == stats.format_mean_std([same_value(s, b) - 0.1 for s, _ in pairs], digits=3)
    assert "seeds 0, 1, 2, 3, 4, 5, paired (0, 1), (2, 3), (4, 5)" in text


def test_records_of_another_protocol_or_a_missing_seed_are_refused(tmp_path, report):
    _records(tmp_path, [(0, 1), (2, 3)], lambda s, b: 0.5, lambda s, b: 0.4)
    (tmp_path / "branched_affinity" / "distinct_seed3.json").unlink()
    with pytest.raises(ValueError, match=r"seed\(s\) \[3\]"):
        report.branched_affinity(tmp_path)
    _records(tmp_path, [(2, 3)], lambda s, b: 0.5, lambda s, b: 0.4, tasks=("a", "b", "d"))
    with pytest.raises(ValueError, match="differs .* in \\['tasks'\\]"):
        report.branched_affinity(tmp_path)
