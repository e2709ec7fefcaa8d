"""Does the flagship's uncertainty mean something? Held-out phantoms through the bundle with the demonstration
weights: the per-voxel sCT standard deviation against the absolute error (Spearman's rho, and the error by std
decile) and the segmentation's vote entropy as a detector of wrong labels (ROC AUC), inside the body.

    python benchmarks/uncertainty.py --seeds 2001 2002 2003 2004 2005 --num-samples 50 \\
        --json results/uncertainty/demo_weights.json --figure docs/uncertainty_demo.png

The phantoms are new seeds (the demo weights saw seed 0, cases 0-7; the main job is seed 1000); the second is
stored LPS (its arrays flipped, its affine saying so) and the third is oblique (15 degrees). Each case writes its
record to the JSON as it finishes, so a stopped run keeps what it did and ``--json`` of an earlier run resumes it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "sfg_highresnet_pelvis"


def storage(seed_index: int) -> tuple[str, float]:
    """(how the case is stored, its obliquity in degrees): RAS, LPS, oblique, then RAS again."""
    return {1: ("LPS", 0.0), 2: ("RAS", 15.0)}.get(seed_index, ("RAS", 0.0))


def make_case(seed: int, index: int, preset: str, root: Path) -> dict[str, str]:
    from mtl_med.pelvis.phantoms import PRESETS, generate_phantom, write_phantom

    axes, oblique = storage(index)
    paths = write_phantom(generate_phantom(seed, shape=PRESETS[preset], oblique_deg=oblique), root / f"seed{seed}")
    if axes == "LPS":  # the same anatomy, stored the other way round in x and y
        lps = nib.orientations.axcodes2ornt(("L", "P", "S"))
        for key in ("mr", "ct", "label", "body"):
            img = nib.load(paths[key])
            ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine), lps)
            nib.save(img.as_reoriented(ornt), paths[key])
    return {k: str(v) for k, v in paths.items()}


def on_mr_grid(paths: dict[str, str]) -> dict[str, np.ndarray]:
    """CT (HU), labels and body mask on the MR's own grid (the outputs' grid)."""
    from monai.transforms import LoadImaged, ResampleToMatchd

    keys = ["ct", "label", "body"]
    d = LoadImaged(["mr", *keys], ensure_channel_first=True, image_only=True)({"mr": paths["mr"], **{k: paths[k] for k in keys}})
    d = ResampleToMatchd(keys, key_dst="mr", mode=["bilinear", "nearest", "nearest"], padding_mode="border")(d)
    return {k: np.asarray(d[k])[0] for k in keys}


def run_case(pred, paths: dict[str, str]) -> dict:
    from mtl_med.metrics.medical import uncertainty_quality

    t0 = time.perf_counter()
    out = pred.predict_case(paths["mr"], ct=paths["ct"], label=paths["label"])
    truth = on_mr_grid(paths)
    body = truth["body"] > 0.5
    q = uncertainty_quality(out["sct_std"], np.abs(out["sct"] - truth["ct"]), out["seg_uncertainty"],
                            out["seg"] != np.rint(truth["label"]), mask=body)
    return {**q, "metrics": {k: v for k, v in out["metrics"].items() if isinstance(v, (int, float))},
            "seconds": round(time.perf_counter() - t0, 1)}


def machine() -> dict:
    import torch

    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = ""
    return {"cpu": model, "threads": torch.get_num_threads(), "torch": torch.__version__, "revision": rev}


def figure(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtl_med.io import atomic_write

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for seed, case in record["cases"].items():
        label = f"seed {seed} ({case['storage']}): rho {case['std_error_spearman']:.2f}, AUC {case['label_error_auc']:.2f}"
        ax[0].plot(range(1, 11), case["error_by_std_decile"], marker="o", label=label)
        ax[1].bar(str(seed), case["label_error_auc"])
    ax[0].set(xlabel="decile of the posterior sCT std (inside the body)", ylabel="mean |sCT - CT| (HU)",
              title="sCT error by its uncertainty")
    ax[0].legend(fontsize=7)
    ax[1].axhline(0.5, color="grey", ls="--", lw=1)
    ax[1].set(ylim=(0, 1), xlabel="phantom seed", ylabel="ROC AUC", title="vote entropy as a detector of wrong labels")
    fig.suptitle(f"weights {record['config']['weights']}, {record['config']['num_samples']} posterior samples", fontsize=9)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def table(record: dict) -> str:
    rows = ["| phantom | stored | Spearman rho (std vs error) | error in lowest / highest std decile (HU) | label error AUC | label error rate |",
            "| --- | --- | --- | --- | --- | --- |"]
    for seed, c in record["cases"].items():
        dec = c["error_by_std_decile"]
        rows.append(f"| seed {seed} | {c['storage']} | {c['std_error_spearman']:.2f} | {dec[0]:.0f} / {dec[-1]:.0f} | "
                    f"{c['label_error_auc']:.3f} | {c['label_error_rate']:.3f} |")
    rho = [c["std_error_spearman"] for c in record["cases"].values()]
    auc = [c["label_error_auc"] for c in record["cases"].values()]
    if len(rho) > 1:
        rows.append(f"| mean (sample std), {len(rho)} phantoms | | {np.mean(rho):.2f} ({np.std(rho, ddof=1):.2f}) | | "
                    f"{np.mean(auc):.3f} ({np.std(auc, ddof=1):.3f}) | |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[2001, 2002, 2003, 2004, 2005])
    p.add_argument("--num-samples", type=int, default=50)
    p.add_argument("--preset", default="medium")
    p.add_argument("--work", type=Path, default=Path("uncertainty_work"), help="phantoms are written here")
    p.add_argument("--json", type=Path, default=None, help="the record (resumed when it exists)")
    p.add_argument("--figure", type=Path, default=None)
    p.add_argument("--weights", type=Path, default=None,
                   help="a folder with model.pt and landmarks.json (default: the bundle's models/demo)")
    args = p.parse_args(argv)
    if args.weights is not None:
        missing = [n for n in ("model.pt", "landmarks.json") if not (args.weights / n).is_file()]
        if missing:
            p.error(f"--weights {args.weights}: no {' or '.join(missing)} there")

    from mtl_med.inference import Predictor
    from mtl_med.io import atomic_write_json, json_finite

    # weights other than the shipped ones are named by the MD5 of their model.pt
    weights = "demo" if args.weights is None else "md5:" + hashlib.md5((args.weights / "model.pt").read_bytes()).hexdigest()
    config = {"seeds": args.seeds, "num_samples": args.num_samples, "preset": args.preset, "weights": weights,
              "uncertainty": "entropy", "mask": "body"}
    record = {"benchmark": "uncertainty", "config": config, "machine": machine(), "cases": {}}
    if args.json and args.json.is_file():
        earlier = json.loads(args.json.read_text())
        if earlier.get("config") == config:
            record["cases"] = earlier.get("cases", {})
    pred = Predictor(BUNDLE, [BUNDLE / "configs" / "inference.json", BUNDLE / "configs" / "demo.json"],
                     num_samples=args.num_samples, uncertainty="entropy", save_png=False, progress=False,
                     truth_geometry="resample",  # the oblique phantom's CT is on a grid of its own
                     **({"ckpt_dir": str(args.weights.resolve())} if args.weights else {}))
    for i, seed in enumerate(args.seeds):
        if str(seed) in record["cases"]:
            continue
        axes, oblique = storage(i)
        case = run_case(pred, make_case(seed, i, args.preset, args.work))
        record["cases"][str(seed)] = {"storage": axes + (f", oblique {oblique:g} deg" if oblique else ""), **case}
        print(f"seed {seed}: rho {case['std_error_spearman']:.3f}, AUC {case['label_error_auc']:.3f} "
              f"({case['seconds']} s)", flush=True)
        if args.json:
            atomic_write_json(json_finite(record), args.json)
    print(table(record))
    if args.figure:
        figure(record, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
