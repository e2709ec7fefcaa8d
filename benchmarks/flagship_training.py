"""Train the flagship's demonstration weights with the bundle's own ``train.json`` + ``demo.json``, in resumable
chunks, and keep the validation curve as data.

    python benchmarks/flagship_training.py --work runs/flagship            # runs or resumes to --max-epochs
    python benchmarks/flagship_training.py --work runs/flagship --status   # the curve so far

Each chunk is one ``python -m monai.bundle run`` (the command in the bundle's docs, "Training") that resumes
``models/demo/checkpoint_final.pt`` and trains ``--chunk-epochs`` more epochs; after it, the chunk's validation
metrics (the bundle's own validation: Dice, PSNR and MAE on whole validation volumes, one draw per slice) are read
from its TensorBoard events and appended to the record ``results/flagship/training.json`` with the chunk's wall
and CPU time. Training stops at ``--max-epochs`` or when validation Dice has not improved by ``--min-gain`` for
``--patience`` chunks (a plateau, recorded as such). Stopping the script at any point loses at most one chunk.

The data: a varied cohort of medium phantoms (``data_prep.phantoms --varied``: seed, body size, bias field, noise,
orientation and storage vary per case), data seed 300, disjoint from the held-out seeds of
``benchmarks/uncertainty.py`` (2001-2005) and the main job's (1000). The best validation weights end in
``WORK/models/demo/model.pt`` with ``landmarks.json``; ``benchmarks/uncertainty.py --weights WORK/models/demo``
evaluates them on the held-out phantoms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "sfg_highresnet_pelvis" / "configs"
RECORD = REPO / "results" / "flagship" / "training.json"

# the cohort: medium phantoms varied per case; 3 of 20 validate
DATA = {"preset": "medium", "cases": 20, "seed": 300, "val_fraction": 0.15, "varied": True}
VAL_TAGS = ("val_dice", "val_psnr_hu", "val_mae_hu")  # train.json's validation metrics as TensorBoard names them


def make_data(work: Path, data: dict) -> Path:
    """The training cohort, made once with the documented command (same seed, same bytes)."""
    datalist = work / "data" / "datalist.json"
    if not datalist.is_file():
        cmd = [sys.executable, "-m", "data_prep.phantoms", "--out", str(datalist.parent), "--cases", str(data["cases"]),
               "--seed", str(data["seed"]), "--preset", data["preset"], "--val-fraction", str(data["val_fraction"]),
               "--test-fraction", "0", "--quiet"] + (["--varied"] if data["varied"] else [])
        subprocess.run(cmd, cwd=REPO, check=True)
    return datalist


def _epoch(checkpoint: Path) -> int:
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["trainer"]
    return int(state["iteration"]) // max(1, int(state["epoch_length"]))


def latest_checkpoint(models: Path) -> tuple[Path | None, int]:
    """The checkpoint with the most epochs behind it and that epoch: ``checkpoint_final.pt`` of a finished chunk
    or the ``checkpoint_epoch=N.pt`` train.json saves at every validation, so a stopped chunk resumes from its
    last validation instead of its start."""
    found = [(_epoch(c), c.name == "checkpoint_final.pt", c) for c in models.glob("checkpoint*.pt")] if models.is_dir() else []
    if not found:
        return None, 0
    epoch, _, path = max(found)
    return path, epoch


def validation_curve(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every validation scalar the bundle wrote to TensorBoard under ``log_dir``: tag -> [(epoch, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curve: dict[str, dict[int, float]] = {}
    for events in sorted(log_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.lower().startswith("val"):
                for ev in acc.Scalars(tag):
                    curve.setdefault(tag, {})[int(ev.step)] = float(ev.value)
    return {tag: sorted(steps.items()) for tag, steps in curve.items()}


def plateaued(chunks: list[dict], patience: int, min_gain: float) -> bool:
    """True when the best validation Dice of the last ``patience`` chunks is not ``min_gain`` above the best
    before them."""
    dice = [c["best_val_dice"] for c in chunks if c.get("best_val_dice") is not None]
    if len(dice) <= patience:
        return False
    return max(dice[-patience:]) < max(dice[:-patience]) + min_gain


def train_chunk(work: Path, datalist: Path, to_epoch: int, args) -> None:
    models = work / "models" / "demo"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           str([str(CONFIGS / "train.json"), str(CONFIGS / "demo.json")]),
           "--logging_file", str(CONFIGS / "logging.conf"), "--bundle_root", str(work), "--datalist", str(datalist),
           "--max_epochs", str(to_epoch), "--seed", str(args.seed), "--cache", "memory"]
    resume, _ = latest_checkpoint(models)
    if resume is not None:
        cmd += ["--resume_ckpt", str(resume)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    with open(work / "train.log", "a") as log:
        subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)


def refresh(record: dict, curve: dict[str, list[tuple[int, float]]]) -> None:
    """Every chunk's validation values from the whole curve (the events hold every run's), so the record always
    says what the events say."""
    start = 0
    for chunk in record["chunks"]:
        end = chunk["to_epoch"]
        chunk["val"] = {tag: [v for e, v in curve.get(tag, []) if start < e <= end] for tag in VAL_TAGS}
        dice = [v for e, v in curve.get("val_dice", []) if e <= end]
        chunk["best_val_dice"] = max(dice) if dice else None
        start = end


def load_record(path: Path, config: dict) -> dict:
    if path.is_file():
        rec = json.loads(path.read_text())
        if rec.get("config") == config:
            return rec
        raise SystemExit(f"{path} holds another training protocol; pass another --record")
    return {"benchmark": "flagship_training", "config": config, "chunks": []}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=REPO / "runs" / "flagship")
    p.add_argument("--record", type=Path, default=RECORD)
    p.add_argument("--max-epochs", type=int, default=600)
    p.add_argument("--chunk-epochs", type=int, default=20, help="a multiple of demo.json's val_interval")
    p.add_argument("--patience", type=int, default=4, help="chunks without a Dice gain before stopping")
    p.add_argument("--min-gain", type=float, default=0.005)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--status", action="store_true", help="refresh the record from the events, print it and exit")
    args = p.parse_args(argv)
    for name in ("max_epochs", "chunk_epochs", "patience", "threads"):
        if getattr(args, name) < 1:  # a chunk of 0 epochs would train nothing, forever
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")

    sys.path.insert(0, str(REPO / "benchmarks"))
    from records import code_revision, machine

    from mtl_med.io import atomic_write_json, json_finite

    demo = json.loads((CONFIGS / "demo.json").read_text())
    config = {"data": DATA, "demo_json": demo, "seed": args.seed, "chunk_epochs": args.chunk_epochs,
              "command": "python -m monai.bundle run --config_file [train.json, demo.json] --resume_ckpt ..."}
    record = load_record(args.record, config)
    if args.status:
        refresh(record, validation_curve(args.work / "runs"))
        atomic_write_json(json_finite(record), args.record)
        for c in record["chunks"]:
            print({k: v for k, v in c.items() if k not in ("machine", "revision")})
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    datalist = make_data(args.work, DATA)
    models = args.work / "models" / "demo"
    while True:
        _, done = latest_checkpoint(models)
        if done >= args.max_epochs or plateaued(record["chunks"], args.patience, args.min_gain):
            record["stopped"] = "max_epochs" if done >= args.max_epochs else "plateau"
            atomic_write_json(json_finite(record), args.record)
            print(f"stopped at epoch {done}: {record['stopped']}")
            return 0
        to = min(args.max_epochs, done + args.chunk_epochs)
        t0, c0 = time.perf_counter(), os.times()
        train_chunk(args.work, datalist, to, args)
        c1 = os.times()
        chunk = {"to_epoch": latest_checkpoint(models)[1], "wall_s": round(time.perf_counter() - t0, 1),
                 "cpu_s": round((c1.children_user + c1.children_system) - (c0.children_user + c0.children_system), 1),
                 "revision": code_revision(), "machine": machine()}
        record["chunks"].append(chunk)
        refresh(record, validation_curve(args.work / "runs"))
        atomic_write_json(json_finite(record), args.record)
        print(f"epoch {chunk['to_epoch']}: val {chunk['val']} best dice {chunk['best_val_dice']} "
              f"({chunk['wall_s']} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
