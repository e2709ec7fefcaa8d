"""The Selective Sharing table (``selective_digits.py --record``, rendered by ``report.py``): one head design for
every method in the records, the paired differences are the records' own per-seed differences, and records of
different protocols are refused instead of mixed."""

import json
from pathlib import Path

import numpy as np
import pytest

ACC = {"hard": [0.990, 0.991, 0.989], "similarity": [0.997, 0.996, 0.998], "branches": [0.995, 0.997, 0.994],
       "stl": [0.985, 0.988, 0.986], "cross_stitch": [0.986, 0.987, 0.990]}


@pytest.fixture(scope="module")
def selective(load_benchmark):
    return load_benchmark("selective_digits")


def _write(results: Path, method: str, seed: int, acc: float, head: str) -> None:
    folder = results / "selective"
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {"accuracy": acc, "epochs": 20, "best_epoch": 7, "active_parameters": 1000}
    if method in ("similarity", "branches"):
        metrics.update(groups=[["digit_0", "digit_3"], ["digit_1"]] if method == "similarity" else [["digit_0"]], lock_epoch=4, first_grouped=1)
    rec = {"benchmark": "selective", "name": f"{method}_seed{seed}", "seed": seed,
           "config": {"method": method, "max_epochs": 20, "head": head}, "metrics": metrics,
           "timings": {"cpu_s": 10.0 * (1 + seed)}, "machine": {"cpu_model": "test CPU", "cpus": 2}}
    (folder / f"{method}_seed{seed}.json").write_text(json.dumps(rec))


def _records(results: Path, selective, head=None) -> None:
    for m, accs in ACC.items():
        for s, a in enumerate(accs):
            _write(results, m, s, a, head or selective.HEAD)


def test_every_plain_method_runs_the_papers_head(selective):
    """The plain methods get section 4.2's FC 640 -> 100 -> 50 on the flattened 640 features, as Selective Sharing
    and the branches have: the same layer shapes after the convolutions."""
    from mtl_med.build import build_network, selective_mnist
    from mtl_med.networks.heads import PooledHeads

    names = [f"digit_{d}" for d in range(10)]
    sel = selective_mnist(names)
    sel_shapes = [tuple(w.shape[-2:]) for w in sel.branch_weights]
    for method, sharing in selective.PLAIN.items():
        configs, over = selective.settings(method, 0, type("A", (), {"max_epochs": 1})())
        net = build_network("mnist_cnn", sharing, names, 2, in_channels=1, head_hidden=over["network_def#head_hidden"],
                            head_pooled_size=over["network_def#head_pooled_size"])
        head = next(m for m in net.modules() if isinstance(m, PooledHeads))
        shapes = [tuple(w.shape[1:]) for w in head.weights]
        assert shapes[0] == (640, 640) and shapes[1:3] == sel_shapes[:2] == [(100, 640), (50, 100)], (method, shapes, sel_shapes)


def test_rendered_differences_are_the_records_paired_differences(tmp_path, selective):
    _records(tmp_path, selective)
    text = selective.render(tmp_path)
    for a, b in (("similarity", "branches"), ("stl", "branches"), ("cross_stitch", "stl")):
        d = 100 * (np.array(ACC[a]) - np.array(ACC[b]))
        row = next(line for line in text.splitlines() if line.startswith(f"| {a} - {b} |"))
        assert f"{d.mean():+.2f} (" in row, row
        wins, losses = int((d > 0).sum()), int((d < 0).sum())
        assert f"| {wins} / {3 - wins - losses} / {losses} |" in row, row
    sim = next(line for line in text.splitlines() if line.startswith("| similarity |"))
    assert f"{100 * np.mean(ACC['similarity']):.2f} ± {100 * np.std(ACC['similarity'], ddof=1):.2f} %" in sim  # sample std
    assert "{0,3}" in sim and selective.HEAD in text


def test_records_of_another_head_are_refused_not_mixed(tmp_path, selective):
    _records(tmp_path, selective)
    _write(tmp_path, "stl", 1, 0.98, "pooled 40 global features -> FC 100")
    with pytest.raises(ValueError, match="differs .* in \\['head'\\]"):
        selective.render(tmp_path)
