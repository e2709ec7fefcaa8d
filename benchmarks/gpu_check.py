"""GPU check: the CUDA tests, the paper's posterior job, the training step with and without AMP and a 1-process
NCCL DDP step, in one run of at most 8 minutes on one H100, ending in one markdown table.

    python benchmarks/gpu_check.py [--json PATH]            # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run [--json PATH]  # the same code on the CPU at a tiny size (the test)

1. ``pytest -q -m gpu`` as a subprocess with a time limit (dry run: ``--collect-only`` of one small test file, at a tiny size): the counts.
2. The paper job (288 x 288 x 62, 354 x 354 slices with the margin, 50 passes, SFG-HighResNet 16/32/64, random
   weights) through ``PosteriorSampler`` + ``SliceInferer`` as the bundle runs it: the naive loop (one forward per
   sample) against the dense and compacted engines in float32 and float16 (dry run: bfloat16). Each method is
   warmed up on one inferer batch of slices; where that shows the whole volume would not fit the row budget, a
   subset of slices is timed and scaled to the volume (the table says so).
3. One training step (forward, multi-task loss, backward, Adam) at train.json's patch size, batch size and
   widths, with and without AMP (float16 with a GradScaler; dry run: bfloat16), SFG-HighResNet against MONAI's
   HighResNet at the same widths.
4. A world-size-1 DDP step over NCCL (dry run: gloo).

Each part's failure is caught and shown as FAILED with a one-line reason; the exit code is 1 when any part
failed, 3 when there is no CUDA and no ``--dry-run``. Timings come from benchmarks/posterior_inference.py's
helpers (synchronised, peak memory above the level before the timed run).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp (the CPU dry run on a shared machine)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from monai.inferers import SliceInferer  # noqa: E402
from monai.networks.nets import HighResNet  # noqa: E402
from monai.networks.nets.highresnet import DEFAULT_LAYER_PARAMS_3D  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import posterior_inference as pi  # noqa: E402  the benchmark's timers, sampler factory and FLOP counter

from mtl_med.inference import PosteriorAggregator, sampling_mode  # noqa: E402
from mtl_med.losses import MaskedDiceCELoss, MaskedRMSELoss, MultiTaskLoss  # noqa: E402
from mtl_med.build import build_network  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = 3
TASKS, OUT = ("sct", "seg"), (1, 6)
# Hang guards (seconds): together with start-up they stay inside the 8 minutes; the row budget keeps part 2 well under its own.
PART_LIMITS = {"pytest": 120, "paper_job": 210, "training": 60, "ddp": 40}


class OverTime(Exception):
    """A part ran past its limit: stops the part, not just the row."""


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]


@contextlib.contextmanager
def time_limit(seconds: int):
    def stop(*_):
        raise OverTime(f"over its {seconds} s limit")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def guarded(rows: list, what: str, fn) -> None:
    """One measurement; its failure becomes a FAILED row and the part goes on with the next one."""
    try:
        rows.append({"what": what, "status": "OK", **fn()})
    except OverTime:
        raise
    except Exception as e:  # noqa: BLE001  any failure is a result to report
        rows.append({"what": what, "status": "FAILED", "reason": one_line(e)})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # an OOM must not starve the next row


def settings(dry_run: bool) -> SimpleNamespace:
    """The sizes: the bundle's own (train.json, inference.json) on the GPU, tiny ones for the dry run."""
    configs = ROOT / "bundles" / "sfg_highresnet_pelvis" / "configs"
    train, infer = (json.loads((configs / n).read_text()) for n in ("train.json", "inference.json"))
    if dry_run:
        # row budget 0: time one inferer batch of the 4 slices and scale, the path the GPU run takes at the paper's size
        return SimpleNamespace(size=(32, 32, 4), features=(4, 8, 8), passes=2, margin=4, sw_batch_size=2, max_batch=4,
                               patch=(16, 16), batch=2, train_features=(4, 8, 8), steps=2, amp_dtype=torch.bfloat16,
                               backend="gloo", row_budget=0.0, pytest_args=["--collect-only", "tests/test_gpu_check.py"])
    return SimpleNamespace(size=(288, 288, 62), features=(16, 32, 64), passes=int(infer["num_samples"]), margin=int(infer["margin"]),
                           sw_batch_size=int(infer["sw_batch_size"]), max_batch=64,  # inference.json's CUDA max_batch
                           patch=tuple(train["patch_size"]), batch=int(train["batch_size"]), train_features=tuple(train["features"]),
                           steps=20, amp_dtype=torch.float16, backend="nccl", row_budget=25.0, pytest_args=[])


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).split(".")[-1]


# ---- 1. the CUDA-marked tests
def pytest_counts(cfg, device) -> list[dict]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *cfg.pytest_args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=PART_LIMITS["pytest"] - 10)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    last = lines[-1] if lines else "(no output)"
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors", "deselected", "collected")}
    for n, word in re.findall(r"(\d+)(?:/\d+)? (passed|failed|skipped|errors?|deselected|tests? collected)", last):
        key = "errors" if word.startswith("error") else "collected" if "collected" in word else word
        counts[key] = int(n)
    row = {"what": " ".join(cmd[2:]), "returncode": proc.returncode, **counts, "summary": last}
    # 5: nothing selected (no test carries the marker yet), not a failure
    row.update(status="OK") if proc.returncode in (0, 5) else row.update(status="FAILED", reason=f"pytest exit {proc.returncode}: {last}")
    return [row]


# ---- 2. the paper job
def naive_loop(net, inferer, x, passes, margin, device):
    """What the original tool did: one SliceInferer run per sample, each folded into running statistics."""
    g = torch.Generator(device=device).manual_seed(0)
    pad = lambda b: torch.nn.functional.pad(b, [margin] * 4, mode="replicate")  # noqa: E731
    crop = lambda o: {k: v[..., margin:-margin, margin:-margin] if margin else v for k, v in o.items()}  # noqa: E731
    agg = PosteriorAggregator(("sct",), {"seg": 6})
    with torch.no_grad(), sampling_mode(net, "sample", per_example=False):
        for _ in range(passes):
            agg.update({k: v.float() for k, v in inferer(x, lambda b: crop(net(pad(b), generator=g))).items()}, stacked=False)
    return agg.result()


def timed_job(run, x, cfg, device) -> dict:
    """Warm-up on one inferer batch of slices; then the whole volume, or the most whole batches the row budget
    allows, scaled to the volume."""
    z = x.shape[-1]
    probe = min(z, cfg.sw_batch_size)
    t0 = time.perf_counter()
    run(x[..., :probe].contiguous())
    pi._sync(device)
    per_slice = (time.perf_counter() - t0) / probe  # includes one-time costs: errs towards fewer slices
    n = z if per_slice * z <= cfg.row_budget else max(probe, int(cfg.row_budget / per_slice) // probe * probe)
    xs = x[..., :n].contiguous()
    seconds, peak = pi._timed(device, lambda: run(xs))
    return {"seconds": seconds * z / n, "timed_slices": n, "peak_mb": peak / 2**20,
            "note": "whole volume" if n == z else f"timed {n} of {z} slices, scaled x{z / n:.2f}"}


def paper_job(cfg, device) -> list[dict]:
    torch.manual_seed(0)
    net = build_network("highresnet", "sfg", TASKS, OUT, features=cfg.features).to(device).eval()
    x = torch.randn(1, 1, *cfg.size, device=device)
    inferer = SliceInferer(spatial_dim=2, roi_size=(-1, -1), sw_batch_size=cfg.sw_batch_size, overlap=0.0, progress=False)
    gen = lambda: torch.Generator(device=device).manual_seed(0)  # noqa: E731

    def sampler(engine, dtype, passes=cfg.passes):
        return lambda v: pi._sampler(net, passes, cfg.margin, max_batch=cfg.max_batch, engine=engine, dtype=dtype).run(inferer, v, generator=gen())

    flops = {}  # per slice-pass, counted on one slice
    for engine in ("dense", "compact"):
        with contextlib.suppress(Exception):  # a failing engine shows in its own rows
            flops[engine] = pi._flops_per_pass(lambda: sampler(engine, torch.float32, 2)(x[..., :1]), 2)
    reduced = cfg.amp_dtype
    methods = [("naive loop float32 (one forward per sample)", "dense", lambda v: naive_loop(net, inferer, v, cfg.passes, cfg.margin, device))]
    methods += [(f"{engine} {dtype_name(dt)}", engine, sampler(engine, dt)) for engine in ("dense", "compact") for dt in (torch.float32, reduced)]
    rows: list[dict] = []
    for what, engine, run in methods:
        guarded(rows, what, lambda: timed_job(run, x, cfg, device))
    base = {r["what"].split(" (")[0]: r["seconds"] for r in rows if r["status"] == "OK"}
    slice_passes = cfg.size[2] * cfg.passes
    for r in rows:
        if r["status"] != "OK":
            continue
        engine = r["what"].split()[0]
        r["vs_naive"] = base["naive loop float32"] / r["seconds"] if "naive loop float32" in base and engine != "naive" else None
        r["vs_dense_fp32"] = base["dense float32"] / r["seconds"] if "dense float32" in base and r["what"] != "dense float32" else None
        counted = flops.get("compact" if engine == "compact" else "dense")  # the naive loop runs the dense forward
        r["tflop_per_s"] = counted * slice_passes / r["seconds"] / 1e12 if counted else None
    return rows


# ---- 3. the training step
def monai_layer_params(features):
    """MONAI HighResNet's layers with its widths 16/32/64 replaced by ``features`` (its 1x1 80 scaled alike)."""
    widths = {"conv_0": features[0], "res_1": features[0], "res_2": features[1], "res_3": features[2], "conv_1": round(80 * features[2] / 64)}
    return tuple({**p, "n_features": widths[p["name"]]} if p["name"] in widths else dict(p) for p in DEFAULT_LAYER_PARAMS_3D)


def steps_per_second(net, forward, batch, cfg, device, amp_dtype) -> dict:
    """As MultiTaskTrainer steps: zero_grad, forward + loss under autocast, (scaled) backward, Adam."""
    x, targets = batch
    loss_fn = MultiTaskLoss({"sct": MaskedRMSELoss(), "seg": MaskedDiceCELoss()})
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None  # bfloat16 needs no scaling
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss, _ = loss_fn(forward(x), targets, model=net)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        losses.append(loss.detach())

    step()  # warm-up: kernels, allocator, Adam state
    seconds, peak = pi._timed(device, lambda: [step() for _ in range(cfg.steps)])
    if not all(torch.isfinite(v) for v in losses):
        raise FloatingPointError(f"loss not finite: {[float(v) for v in losses]}")
    return {"steps_per_s": cfg.steps / seconds, "step_s": seconds / cfg.steps, "peak_mb": peak / 2**20, "final_loss": float(losses[-1])}


def training(cfg, device) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(cfg.batch, 1, *cfg.patch, device=device)
    batch = (x, {"sct": torch.randn_like(x), "seg": torch.randint(0, 6, x.shape, device=device)})
    g = torch.Generator(device=device).manual_seed(0)
    sfg = build_network("highresnet", "sfg", TASKS, OUT, features=cfg.train_features).to(device).train()
    monai_net = HighResNet(spatial_dims=2, in_channels=1, out_channels=7, acti_type=("prelu", {}),
                           layer_params=monai_layer_params(cfg.train_features)).to(device).train()
    nets = {"SFG-HighResNet": (sfg, lambda b: sfg(b, generator=g)),
            "MONAI HighResNet": (monai_net, lambda b: (lambda y: {"sct": y[:, :1], "seg": y[:, 1:]})(monai_net(b)))}
    rows: list[dict] = []
    for name, (net, fwd) in nets.items():
        for amp in (None, cfg.amp_dtype):
            precision = f"AMP {dtype_name(amp)}" if amp else "float32"
            guarded(rows, f"{name} {precision}", lambda: {"net": name, "precision": precision, **steps_per_second(net, fwd, batch, cfg, device, amp)})
    ok = {(r["net"], r["precision"]): r for r in rows if r["status"] == "OK"}
    for r in rows:
        if r["status"] == "OK":
            fp32, monai_twin = ok.get((r["net"], "float32")), ok.get(("MONAI HighResNet", r["precision"]))
            r["amp_speedup"] = r["steps_per_s"] / fp32["steps_per_s"] if fp32 and r is not fp32 else None
            r["vs_monai"] = monai_twin["step_s"] / r["step_s"] if monai_twin and r is not monai_twin else None
    return rows


# ---- 4. a 1-process DDP step
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_step(cfg, device) -> list[dict]:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(free_port())
    dist.init_process_group(cfg.backend, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        net = build_network("highresnet", "sfg", TASKS, OUT, features=cfg.train_features).to(device).train()
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                                        find_unused_parameters=net.may_skip_parameters)  # as multi_gpu_train.json
        x = torch.randn(cfg.batch, 1, *cfg.patch, device=device)
        targets = {"sct": torch.randn_like(x), "seg": torch.randint(0, 6, x.shape, device=device)}
        loss_fn, opt = MultiTaskLoss({"sct": MaskedRMSELoss(), "seg": MaskedDiceCELoss()}), torch.optim.Adam(ddp.parameters(), lr=1e-3)
        g = torch.Generator(device=device).manual_seed(0)

        def step():
            opt.zero_grad(set_to_none=True)
            loss, _ = loss_fn(ddp(x, generator=g), targets, model=ddp)
            loss.backward()  # the gradient all-reduce runs here
            opt.step()

        step()  # warm-up: DDP builds its buckets on the first backward
        seconds, peak = pi._timed(device, step)
        return [{"what": f"DDP step, backend {cfg.backend}, world size 1", "status": "OK", "step_s": seconds, "peak_mb": peak / 2**20}]
    finally:
        dist.destroy_process_group()


# ---- the record and the table
def machine(device) -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu}", "cpu": cpu,
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "python": platform.python_version(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info.update(gpu_memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30,
                    tf32_convolutions=torch.backends.cudnn.allow_tf32)  # float32 convolutions run in TF32 by default
    return info


def revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def fmt(v, spec=".2f", suffix=""):
    return "" if v is None else f"{v:{spec}}{suffix}"


def table_rows(part: str, rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["status"] != "OK":
            out.append(f"| {part} | {r['what']} | FAILED: {r['reason']} | | | |")
        elif part.startswith("1"):
            result = f"{r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped, {r['errors']} errors"
            if "--collect-only" in r["what"]:
                result = f"{r['collected']} collected (collect-only)"
            out.append(f"| {part} | `{r['what']}` | {result} | | | {r['deselected']} deselected |")
        elif part.startswith("2"):
            ratios = ", ".join(s for s in (fmt(r["vs_naive"], ".2f", "x vs naive"), fmt(r["vs_dense_fp32"], ".2f", "x vs dense float32"),
                                           fmt(r["tflop_per_s"], ".3g", " TFLOP/s")) if s)
            out.append(f"| {part} | {r['what']} | {r['seconds']:.3g} s | {r['peak_mb']:.1f} | {ratios} | {r['note']} |")
        elif part.startswith("3"):
            ratios = ", ".join(s for s in (fmt(r["amp_speedup"], ".2f", "x vs float32"), fmt(r["vs_monai"], ".2f", "x MONAI's speed")) if s)
            out.append(f"| {part} | {r['what']} | {r['steps_per_s']:.3g} steps/s ({r['step_s'] * 1e3:.3g} ms) | {r['peak_mb']:.1f} | {ratios} | |")
        else:
            out.append(f"| {part} | {r['what']} | OK, step {r['step_s'] * 1e3:.3g} ms | {r['peak_mb']:.1f} | | |")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the CPU at a tiny size (gloo, bfloat16 autocast, pytest --collect-only)")
    p.add_argument("--json", type=Path, default=None, help="write the record here")
    args = p.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}); "
              f"nothing measured; --dry-run runs the CPU path")
        return NO_CUDA
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg = settings(args.dry_run)
    start = time.perf_counter()
    parts = {"pytest": ("1 CUDA tests", pytest_counts), "paper_job": ("2 posterior job", paper_job),
             "training": ("3 training step", training), "ddp": ("4 DDP", ddp_step)}
    metrics, timings = {}, {}
    for key, (label, fn) in parts.items():
        t0 = time.perf_counter()
        try:
            with time_limit(PART_LIMITS[key]):
                rows = fn(cfg, device)
        except Exception as e:  # noqa: BLE001  the part's set-up (or its limit) failed: report, go on
            rows = [{"what": "(part)", "status": "FAILED", "reason": one_line(e)}]
        timings[key] = time.perf_counter() - t0
        failed = [r for r in rows if r["status"] != "OK"]
        metrics[key] = {"status": "FAILED" if failed else "OK", "reason": failed[0]["reason"] if failed else None, "rows": rows}
    timings["total"] = time.perf_counter() - start

    info, rev = machine(device), revision()
    (x, y, z), m = cfg.size, cfg.margin
    print(f"\nGPU check{' (CPU dry run)' if args.dry_run else ''}: {info['device']}; torch {info['torch']}, CUDA {info['cuda']}, "
          f"cuDNN {info['cudnn']}; revision {rev[:10] if rev else 'unknown'}; {timings['total']:.0f} s")
    print(f"posterior job: SFG-HighResNet {'/'.join(map(str, cfg.features))}, {x} x {y} x {z} ({x + 2 * m} x {y + 2 * m} slices with the "
          f"margin), {cfg.passes} passes, SliceInferer sw_batch_size {cfg.sw_batch_size}, max_batch {cfg.max_batch}; training: batch "
          f"{cfg.batch} x {' x '.join(map(str, cfg.patch))}, widths {'/'.join(map(str, cfg.train_features))}, {cfg.steps} timed steps\n")
    lines = ["| part | measurement | result | peak MB | ratios | note |", "| --- | --- | --- | --- | --- | --- |"]
    for key, (label, _) in parts.items():
        lines += table_rows(label, metrics[key]["rows"])
    print("\n".join(lines))
    failed = [k for k, v in metrics.items() if v["status"] != "OK"]
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all parts OK'}")
    if args.json:
        config = {k: (dtype_name(v) if isinstance(v, torch.dtype) else v) for k, v in vars(cfg).items()}
        record = {"config": {**config, "dry_run": args.dry_run}, "machine": info, "metrics": metrics, "timings": timings, "revision": rev,
                  "table": lines}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
