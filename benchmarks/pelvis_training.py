"""Short training runs of the pelvis bundle's own ``configs/train.json`` on generated phantoms, measured.

Two modes, each writing one record per run under ``results/performance/`` with ``--record``:

``accuracy``: for each seed, trains the network twice from the same seed on the same phantoms, once in float32
(``use_amp`` false) and once with bf16 autocast (``amp`` true; on a CPU without native bf16 ``use_amp`` is forced
on and bf16 is emulated: the record says which). Records per precision: each task's training loss (the mean over
the last epoch, and the first iteration's, which both runs compute from the same weights and batch), the bundle's
validation metrics after the last iteration (Dice mean, PSNR and MAE of the sCT in HU, computed by the bundle's
evaluator, which autocasts as the trainer does, and again with the evaluator in float32), and the CPU seconds
(``time.process_time``, all threads of this process) of training. Both runs store a hash of the initial weights
and of the first batch, so a reader can check that the two precisions started from the same point.

``loading``: one epoch (no validation) with the bundle's loader settings; per iteration, the time the trainer
waits on the data loader (ignite's ``GET_BATCH_STARTED`` -> ``GET_BATCH_COMPLETED``) and the time in the
iteration (``ITERATION_STARTED`` -> ``ITERATION_COMPLETED``: forward, loss, backward, optimiser step and the
bundle's iteration handlers), in wall and CPU seconds, and the set-up (datasets built and cached) before it.

    nice -n 5 python benchmarks/pelvis_training.py accuracy --seeds 0 1 --max_epochs 8 --record
    nice -n 5 python benchmarks/pelvis_training.py loading --record
    python benchmarks/pelvis_training.py accuracy --tiny --work /tmp/w --results /tmp/w/records   # a check

Defaults: ``configs/demo.json``'s widths and patches on 8 phantoms (``--preset medium``, data seed 0: 4 training,
2 validation cases), the demo's 30 patches per volume, batch 10 (12 iterations an epoch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import records  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "sfg_highresnet_pelvis" / "configs"
BENCHMARK = "performance"
#: the test's size: every value a config id of train.json
TINY = {"features": [4, 8, 8], "patch_size": [24, 24], "padded_size": [32, 32], "batch_size": 2,
        "samples_per_volume": 2, "grouping_interval": 1000, "log_interval": 1000, "n4_shrink_factor": 2}


def tensor_hash(tensors) -> str:
    """sha256 of a sequence of (name, tensor) pairs: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = torch.as_tensor(t).detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{t.numel()}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def phantoms(work: Path, cases: int, seed: int, preset: str, shape=None) -> Path:
    """The phantoms' datalist, generated once under ``work``."""
    from mtl_med.pelvis.phantoms import generate_dataset

    out = work / f"phantoms_{preset if shape is None else 'x'.join(map(str, shape))}_{cases}_seed{seed}"
    if not (out / "datalist.json").is_file():
        generate_dataset(out, cases, seed=seed, preset=preset, shape=shape)
    return out / "datalist.json"


class Timer:
    """Ignite handlers on the trainer: data waits and iterations (wall and CPU seconds), losses per iteration,
    the initial weights' and the first batch's hashes."""

    def __init__(self, trainer, network, batch_keys=("mr", "ct", "label", "mask")):
        from ignite.engine import Events

        self.network, self.batch_keys = network, batch_keys
        self.wait, self.wait_cpu, self.iter, self.iter_cpu, self.losses = [], [], [], [], []
        self.epochs, self.first_batch, self.initial_weights = [], None, None
        trainer.add_event_handler(Events.STARTED, self._started)
        trainer.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        trainer.add_event_handler(Events.GET_BATCH_STARTED, self._batch_started)
        trainer.add_event_handler(Events.GET_BATCH_COMPLETED, self._batch_completed)
        trainer.add_event_handler(Events.ITERATION_STARTED, self._iter_started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iter_completed)

    @staticmethod
    def _now():
        return time.perf_counter(), time.process_time()

    def _started(self, engine):
        self.initial_weights = tensor_hash(sorted(self.network.state_dict().items()))

    def _epoch_started(self, engine):
        self._epoch = self._now()

    def _epoch_completed(self, engine):
        t, c = self._now()
        self.epochs.append({"wall_s": t - self._epoch[0], "cpu_s": c - self._epoch[1], "iterations": engine.state.epoch_length})

    def _batch_started(self, engine):
        self._get = self._now()

    def _batch_completed(self, engine):
        t, c = self._now()
        self.wait.append(t - self._get[0])
        self.wait_cpu.append(c - self._get[1])
        if self.first_batch is None:
            self.first_batch = tensor_hash((k, engine.state.batch[k]) for k in self.batch_keys if k in engine.state.batch)

    def _iter_started(self, engine):
        self._it = self._now()

    def _iter_completed(self, engine):
        t, c = self._now()
        self.iter.append(t - self._it[0])
        self.iter_cpu.append(c - self._it[1])
        self.losses.append({k: float(v) for k, v in engine.state.output["terms"].items()} | {"total": float(engine.state.output["loss"])})


def run_bundle(work: Path, datalist: Path, overrides: dict, *, evaluate: bool) -> dict:
    """One training run of train.json (+ demo.json) with ``overrides`` in a fresh bundle root under ``work``."""
    from monai.bundle import ConfigWorkflow

    root = Path(tempfile.mkdtemp(prefix="run_", dir=work))
    args = {"bundle_root": str(root), "datalist": str(datalist), "n4_cache_dir": str(work / "n4_cache"), **overrides}
    load = [os.getloadavg()[0]]
    t0, c0 = time.perf_counter(), time.process_time()
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "demo.json")],
                        meta_file=str(CONFIGS / "metadata.json"), logging_file=False, **args)
    wf.initialize()  # seeds, learns the landmarks (N4 cached), builds the network, datasets (cached) and engines
    parser = wf.parser
    trainer, network = parser.get_parsed_content("train#trainer"), parser.get_parsed_content("network")
    timer = Timer(trainer, network)
    t1, c1 = time.perf_counter(), time.process_time()
    wf.run()
    t2, c2 = time.perf_counter(), time.process_time()
    load.append(os.getloadavg()[0])
    loader = {k: parser.get_parsed_content(k) for k in ("num_workers", "cache", "batch_size", "samples_per_volume")}
    out = {"use_amp": bool(parser.get_parsed_content("use_amp")), "iterations": trainer.state.iteration, "loader": loader,
           "epoch_length": trainer.state.epoch_length, "initial_weights_sha256": timer.initial_weights,
           "first_batch_sha256": timer.first_batch, "losses": timer.losses,
           "timings": {"setup_wall_s": t1 - t0, "setup_cpu_s": c1 - c0, "train_wall_s": t2 - t1, "train_cpu_s": c2 - c1,
                       "data_wait_wall_s": timer.wait, "data_wait_cpu_s": timer.wait_cpu,
                       "iteration_wall_s": timer.iter, "iteration_cpu_s": timer.iter_cpu, "epochs": timer.epochs,
                       "load_average_1min_start_end": load}}
    if evaluate:
        evaluator = parser.get_parsed_content("validate#evaluator")
        out["validation"] = {}
        for name, amp in (("bundle", evaluator.amp), ("fp32", False)):
            torch.manual_seed(int(parser.get_parsed_content("seed")))  # the same posterior draws in every evaluation
            evaluator.amp = amp
            t, c = time.perf_counter(), time.process_time()
            evaluator.run()
            out["validation"][name] = {"amp": bool(amp), **{k: float(v) for k, v in evaluator.state.metrics.items()},
                                       "wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c}
    wf.finalize()
    return out


def _mean_last(losses: list[dict], n: int) -> dict:
    tail = losses[-n:]
    return {k: statistics.fmean(x[k] for x in tail) for k in tail[0]}


def accuracy(args, datalist: Path) -> list[dict]:
    from mtl_med.inference.posterior import native_bfloat16

    native = native_bfloat16()
    out = []
    for i, seed in enumerate(args.seeds):
        base = {**args.overrides, "seed": seed, "max_epochs": args.max_epochs, "val_interval": 10**6}
        runs = {}
        order = ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")  # the first run of a process pays its warm-up
        for precision in order:
            overrides = dict(base, amp=precision == "bf16")
            if precision == "bf16" and not native:
                overrides["use_amp"] = True  # train.json turns bf16 on only where it is native: here it is emulated
            r = run_bundle(args.work, datalist, overrides, evaluate=True)
            if r["use_amp"] != (precision == "bf16"):
                raise RuntimeError(f"{precision} run resolved use_amp={r['use_amp']}")
            n = r["epoch_length"]
            runs[precision] = r
            print(f"seed {seed} {precision}: {r['iterations']} iterations, train {r['timings']['train_cpu_s']:.0f} CPU-s; "
                  f"loss (last epoch) {json.dumps({k: round(v, 4) for k, v in _mean_last(r['losses'], n).items()})}; "
                  f"val {json.dumps({k: round(v, 3) for k, v in r['validation']['bundle'].items()})}", flush=True)
        runs = {p: runs[p] for p in ("fp32", "bf16")}
        metrics = {p: {"first_loss": r["losses"][0], "final_loss_last_epoch": _mean_last(r["losses"], r["epoch_length"]),
                       "final_loss_last_iteration": r["losses"][-1], "validation": r["validation"],
                       "train_cpu_s": r["timings"]["train_cpu_s"], "iteration_cpu_s": sum(r["timings"]["iteration_cpu_s"]),
                       "median_iteration_cpu_s": statistics.median(r["timings"]["iteration_cpu_s"]),
                       "use_amp": r["use_amp"], "iterations": r["iterations"], "epoch_length": r["epoch_length"],
                       "initial_weights_sha256": r["initial_weights_sha256"], "first_batch_sha256": r["first_batch_sha256"],
                       "run_order": order.index(p)} for p, r in runs.items()}
        rec = {"seed": seed, "metrics": metrics, "native_bfloat16": native,
               "bf16": "native" if native else "emulated (no avx512_bf16 / amx_bf16 on this CPU)",
               "losses": {p: r["losses"] for p, r in runs.items()},
               "timings": {p: r["timings"] for p, r in runs.items()},
               "config": records.run_config(args, drop=("seeds", "record", "record_tag", "work", "results", "overrides", "func"),
                                            overrides=base | {"amp": "fp32: false, bf16: true"}, datalist=_datalist_summary(datalist),
                                            loader=runs["fp32"]["loader"])}
        if args.record:
            path = records.write_record(BENCHMARK, records.tagged(args, f"amp_accuracy_seed{seed}"), root=args.results,
                                        config=rec["config"], seed=seed, metrics=metrics, timings=rec["timings"],
                                        native_bfloat16=native, bf16=rec["bf16"], losses=rec["losses"])
            print(f"record: {path}")
        out.append(rec)
    return out


def loading(args, datalist: Path) -> dict:
    overrides = {**args.overrides, "seed": args.seeds[0], "max_epochs": 1, "val_interval": 10**6}
    r = run_bundle(args.work, datalist, overrides, evaluate=False)
    t = r["timings"]
    epoch = t["epochs"][0]
    summary = {"epoch_wall_s": epoch["wall_s"], "epoch_cpu_s": epoch["cpu_s"], "iterations": epoch["iterations"],
               "data_wait_wall_s": sum(t["data_wait_wall_s"]), "data_wait_cpu_s": sum(t["data_wait_cpu_s"]),
               "iteration_wall_s": sum(t["iteration_wall_s"]), "iteration_cpu_s": sum(t["iteration_cpu_s"]),
               "first_wait_wall_s": t["data_wait_wall_s"][0], "load_average_1min_start_end": t["load_average_1min_start_end"],
               "setup_wall_s": t["setup_wall_s"], "setup_cpu_s": t["setup_cpu_s"]}
    summary["data_wait_fraction_wall"] = summary["data_wait_wall_s"] / epoch["wall_s"]
    summary["data_wait_fraction_cpu"] = summary["data_wait_cpu_s"] / epoch["cpu_s"]
    summary["iteration_fraction_wall"] = summary["iteration_wall_s"] / epoch["wall_s"]
    print(json.dumps(summary, indent=1))
    config = records.run_config(args, drop=("seeds", "record", "record_tag", "work", "results", "overrides", "func", "max_epochs"),
                                overrides=overrides, datalist=_datalist_summary(datalist),
                                loader=r["loader"])
    if args.record:
        name = records.slug(f"data_loading_{args.record_tag}" if args.record_tag else "data_loading")
        path = records.write_record(BENCHMARK, name, root=args.results, config=config, seed=args.seeds[0], metrics=summary,
                                    timings={k: v for k, v in t.items()})
        print(f"record: {path}")
    return summary


def _datalist_summary(datalist: Path) -> dict:
    d = json.loads(datalist.read_text())
    return {k: len(d.get(k, [])) for k in ("training", "validation", "test")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("accuracy", "loading"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (train.json's seed)")
    p.add_argument("--max_epochs", type=int, default=8, help="accuracy: epochs of each run")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument("--preset", default="medium", help="phantom size (mtl_med.pelvis.phantoms.PRESETS)")
    p.add_argument("--shape", type=int, nargs=3, default=None, help="phantom shape, instead of --preset's")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="ID=JSON",
                   help="a train.json config id and its value as JSON, e.g. --set num_workers=2 (repeatable)")
    p.add_argument("--tiny", action="store_true", help="tiny widths and patches (a check, not a measurement)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", default=None, help="scratch folder: phantoms, bundle roots (default: a new temporary one)")
    p.add_argument("--results", default=None, help="records' root (default: the repository's results/)")
    records.add_record_arguments(p)
    args = p.parse_args(argv)
    args.overrides = {**(TINY if args.tiny else {}), **{k: json.loads(v) for k, v in (s.split("=", 1) for s in args.sets)}}
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work = Path(args.work or tempfile.mkdtemp(prefix="pelvis_training_"))
    args.work.mkdir(parents=True, exist_ok=True)
    datalist = phantoms(args.work, args.cases, args.data_seed, args.preset, args.shape)
    return accuracy(args, datalist) if args.mode == "accuracy" else loading(args, datalist)


if __name__ == "__main__":
    main()


# --- tables (benchmarks/report.py renders them into docs/performance.md) -------------------------


def _records(results: Path, prefix: str) -> list[dict]:
    folder = Path(results) / BENCHMARK
    recs = [json.loads(p.read_text()) for p in sorted(folder.glob(f"{prefix}*.json"))]
    if not recs:
        raise FileNotFoundError(f"no records {folder}/{prefix}*.json")
    return recs


def _machine(rec: dict) -> str:
    m = rec["machine"]
    flags = ", ".join(m.get("cpu_flags") or []) or "no bf16 / AMX flags"
    return f"{m.get('cpus')}-core {m.get('cpu_model')} ({flags}), torch {m.get('torch')} with {m.get('torch_threads')} threads"


def _code(rec: dict) -> str:
    c = rec.get("code") or {}
    return f"{str(c.get('commit'))[:10]}{' with local changes' if c.get('local_changes') else ''}"


def render_accuracy(results: Path) -> str:
    """fp32 against bf16 autocast, one pair of rows per seed and the difference bf16 - fp32."""
    recs = sorted(_records(results, "amp_accuracy_seed"), key=lambda r: r["seed"])
    lines = ["| seed | precision | iterations | first-iteration loss sct / seg | final loss sct / seg | Dice mean | PSNR (dB, HU) | MAE (HU) "
             "| Dice / PSNR / MAE, fp32 evaluator | train CPU-s | CPU-s / iteration (median) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in recs:
        m = r["metrics"]
        for p in ("fp32", "bf16"):
            x, v, f = m[p], m[p]["validation"]["bundle"], m[p]["validation"]["fp32"]
            lines.append(f"| {r['seed']} | {p} | {x['iterations']} | {x['first_loss']['sct']:.4f} / {x['first_loss']['seg']:.4f} | "
                         f"{x['final_loss_last_epoch']['sct']:.4f} / {x['final_loss_last_epoch']['seg']:.4f} | {v['val_dice']:.3f} | "
                         f"{v['val_psnr_hu']:.2f} | {v['val_mae_hu']:.1f} | {f['val_dice']:.3f} / {f['val_psnr_hu']:.2f} / {f['val_mae_hu']:.1f} | "
                         f"{x['train_cpu_s']:.0f} | {x['median_iteration_cpu_s']:.2f} |")
        a, b = m["fp32"], m["bf16"]
        va, vb = a["validation"]["bundle"], b["validation"]["bundle"]
        lines.append(f"| {r['seed']} | bf16 - fp32 | | {b['first_loss']['sct'] - a['first_loss']['sct']:+.4f} / "
                     f"{b['first_loss']['seg'] - a['first_loss']['seg']:+.4f} | {b['final_loss_last_epoch']['sct'] - a['final_loss_last_epoch']['sct']:+.4f} / "
                     f"{b['final_loss_last_epoch']['seg'] - a['final_loss_last_epoch']['seg']:+.4f} | {vb['val_dice'] - va['val_dice']:+.3f} | "
                     f"{vb['val_psnr_hu'] - va['val_psnr_hu']:+.2f} | {vb['val_mae_hu'] - va['val_mae_hu']:+.1f} | | "
                     f"{b['train_cpu_s'] / a['train_cpu_s']:.2f}x | {b['median_iteration_cpu_s'] / a['median_iteration_cpu_s']:.2f}x |")
    r0 = recs[0]
    c, d = r0["config"], r0["config"]["datalist"]
    same = all(r["metrics"]["fp32"][k] == r["metrics"]["bf16"][k] for r in recs for k in ("initial_weights_sha256", "first_batch_sha256"))
    bf16 = "; ".join(sorted({f"bf16 {r['bf16']}" for r in recs}))
    lines += ["", f"Per seed, both precisions start from {'the same' if same else 'DIFFERENT'} initial weights and first batch "
                  f"(sha256 in the records); one pair of runs per seed, {len(recs)} seed{'s' if len(recs) > 1 else ''}. "
                  f"`train.json` + `configs/demo.json`, {c['max_epochs']} epochs of {r0['metrics']['fp32']['epoch_length']} iterations "
                  f"(batch {c['loader']['batch_size']}, {c['loader']['samples_per_volume']} patches per volume); "
                  f"{c['cases']} phantoms (preset {c['preset']}, data seed {c['data_seed']}): {d['training']} training, {d['validation']} validation. "
                  "Final loss: mean over the last epoch; validation: the bundle's evaluator on the validation phantoms after the last "
                  "iteration (autocast as the trainer), and again with the evaluator in float32. CPU seconds: `time.process_time` of "
                  f"the training loop (all threads). Records: `results/performance/amp_accuracy_seed*.json`; {bf16}; {_machine(r0)}; "
                  f"code {', '.join(sorted({_code(r) for r in recs}))}."]
    return "\n".join(lines) + "\n"


def render_loading(results: Path) -> str:
    """One epoch: time waiting on the data loader against time in the iterations, one row per record."""
    recs = _records(results, "data_loading")
    lines = ["| record | num_workers | cache | batch | iterations | epoch (s / CPU-s) | waiting on data (s / CPU-s) | in iterations (s / CPU-s) "
             "| waiting on data, share of the epoch (wall / CPU) | set-up before the epoch (s / CPU-s) | load average (start, end) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in recs:
        m, ld = r["metrics"], r["config"]["loader"]
        la = ", ".join(f"{x:.1f}" for x in m["load_average_1min_start_end"])
        lines.append(f"| {r['name']} | {ld['num_workers']} | {ld['cache']} | {ld['batch_size']} | {m['iterations']} | "
                     f"{m['epoch_wall_s']:.1f} / {m['epoch_cpu_s']:.1f} | {m['data_wait_wall_s']:.1f} / {m['data_wait_cpu_s']:.1f} | "
                     f"{m['iteration_wall_s']:.1f} / {m['iteration_cpu_s']:.1f} | {100 * m['data_wait_fraction_wall']:.1f}% / "
                     f"{100 * m['data_wait_fraction_cpu']:.1f}% | {m['setup_wall_s']:.1f} / {m['setup_cpu_s']:.1f} | {la} |")
    r0 = recs[0]
    c, d = r0["config"], r0["config"]["datalist"]
    lines += ["", f"One epoch of `train.json` + `configs/demo.json` (no validation), {d['training']} training phantoms (preset {c['preset']}) x "
                  f"{c['loader']['samples_per_volume']} patches; waiting on data: ignite's `GET_BATCH_STARTED` -> `GET_BATCH_COMPLETED`; "
                  "in iterations: `ITERATION_STARTED` -> `ITERATION_COMPLETED` (forward, loss, backward, Adam and the bundle's iteration "
                  "handlers); CPU seconds: `time.process_time` (all threads and, with workers, not the workers' own). Set-up: the workflow's "
                  f"`initialize` (landmarks, network, datasets filled). Records: `results/performance/data_loading*.json`; {_machine(r0)}; "
                  f"code {', '.join(sorted({_code(r) for r in recs}))}."]
    return "\n".join(lines) + "\n"
