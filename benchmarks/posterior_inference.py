"""Time of 50-sample posterior inference of SFG-HighResNet over a whole volume, in one run, and the accuracy cost
of a reduced compute dtype.

Timed methods (random-init weights at ``--features``: the time does not depend on them):

1. naive: S sequential single-pass runs of MONAI's SliceInferer over the volume, each aggregated into running
   statistics (what the original tool did).
2. dense: the sampler on the network's own forward (``engine="dense"``): every slice batch runs all S
   samples, ``max_batch // slices`` copies per forward call, each copy with its own group assignment.
3. compact fp32: the sampler's compacted pass (:mod:`mtl_med.sharing.sfg.compact`), float32, channels-last.
4. compact bf16: the same in bfloat16 (native only where the CPU has AMX-BF16 / AVX512-BF16; on CUDA float16).
5. one deterministic pass (argmax groups).

Each method makes ``--timed-passes`` passes (default: S on CUDA) and its time is scaled to S (linear: every
pass costs the same); the output says so. Every slice gets the bundle's replicate margin (``--margin``, 33).
Prints seconds, peak memory (CUDA: ``max_memory_allocated``; CPU: peak resident memory above the level before
the method, sampled every 2 ms), FLOPs actually computed per pass (``FlopCounterMode``), achieved GFLOP/s next
to this machine's measured 3x3 convolution rate, and the ratios.

``--paper-slices N`` times N single-slice posterior passes at the paper's job (288 x 288 slices + margin,
features 16/32/64) with the compacted sampler and scales to 62 slices x 50 passes.

``--paper-table N`` times, in one run, one slice-pass of the paper job (one 288 x 288 slice + the margin, 16/32/64)
for each of: dense, dense + receptive-field cropping, compact, compact + cropping, in float32 and (where
``native_bfloat16()``, or float16 on CUDA) the reduced dtype, N timed passes each after a warm-up pass; with GFLOP
per pass (``FlopCounterMode``), achieved GFLOP/s, this machine's 3x3 convolution rate measured in the same run and
the minutes of the whole job (62 slices x 50 passes). Writes its raw record as JSON under ``results/performance/``
(config, git revision, machine, metrics, timings).

``--accuracy`` runs the demo weights on a phantom through the bundle's preprocessing, S passes of every slice,
float32 against the reduced dtype with the same draws: mean / max |sCT difference| (HU), the fraction of voxels
whose modal label changes and the change of the Table 2 metrics; then ``num_samples="auto"``: passes per slice
batch and the same differences against the fixed-S run.

    OMP_NUM_THREADS=1 python benchmarks/posterior_inference.py --size 48 48 4 --timed-passes 4 --accuracy
    python benchmarks/posterior_inference.py --size 288 288 62 --device cuda      # the paper's volume (A.3)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp: no spin-waits on a shared CPU

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.inferers import SliceInferer  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from mtl_med.pelvis.phantoms import generate_phantom  # noqa: E402
from mtl_med.inference import PosteriorAggregator, PosteriorSampler, sampling_mode  # noqa: E402
from mtl_med.inference.posterior import native_bfloat16  # noqa: E402
from mtl_med.build import build_network  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "sfg_highresnet_pelvis"


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict):
    """Peak memory above the starting level (bytes) into ``out["peak"]``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize()
        out["peak"] = torch.cuda.max_memory_allocated(device) - base
        return
    base, peak, stop = _rss(), [0], threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        out["peak"] = max(peak[0], _rss()) - base


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def conv_rate(device: torch.device, dtype=torch.float32, channels_last: bool = False) -> float:
    """Measured FLOP/s of a 3x3 convolution like the network's widest (64 channels, 128 x 128)."""
    x = torch.randn(1, 64, 128, 128, device=device, dtype=dtype)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).to(device, dtype)
    if channels_last:
        x, conv = x.contiguous(memory_format=torch.channels_last), conv.to(memory_format=torch.channels_last)
    flops = 2 * 64 * 64 * 9 * 128 * 128
    with torch.no_grad():
        conv(x)
        _sync(device)
        reps, t0 = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t0 < 0.5:
            conv(x)
            reps += 1
        _sync(device)
    return flops * reps / (time.perf_counter() - t0)


def _timed(device, fn) -> tuple[float, int]:
    mem: dict = {}
    with peak_memory(device, mem):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        t = time.perf_counter() - t0
    return t, mem["peak"]


def _sampler(net, passes, margin, **kw):
    return PosteriorSampler(net, passes, regression=("sct",), labels={"seg": 6}, margin=margin, **kw)


def _flops_per_pass(fn, passes: int) -> float:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return fc.get_total_flops() / passes


def timing(args, device, reduced):
    size = tuple(args.size)
    S, n = args.num_samples, args.timed_passes or (args.num_samples if device.type == "cuda" else 4)
    ph = generate_phantom(0, shape=size)
    mr = torch.as_tensor(ph.mr, dtype=torch.float32)
    x = ((mr - mr.mean()) / mr.std())[None, None].to(device)
    net = build_network("highresnet", "sfg", ("sct", "seg"), (1, 6), features=tuple(args.features)).to(device).eval()
    inferer = SliceInferer(spatial_dim=2, roi_size=(-1, -1), sw_batch_size=args.sw_batch_size, overlap=0.0, progress=False)
    m = args.margin
    pad = lambda b: torch.nn.functional.pad(b, [m] * 4, mode="replicate")  # noqa: E731
    crop = lambda o: {k: v[..., m:-m, m:-m] if m else v for k, v in o.items()}  # noqa: E731
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"volume {size}, margin {m}, S = {S} (each method timed on {n} passes, scaled to S), features {args.features}, "
          f"sw_batch_size {args.sw_batch_size}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    with torch.no_grad(), sampling_mode(net, "argmax", per_example=False):  # warm-up
        inferer(x[..., :1], lambda b: net(pad(b)))

    res, flops = {}, {}

    def naive():
        g = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad(), sampling_mode(net, "sample", per_example=False):
            agg = PosteriorAggregator(("sct",), {"seg": 6})
            for _ in range(n):
                out = inferer(x, lambda b: crop(net(pad(b), generator=g)))
                agg.update({k: v.float() for k, v in out.items()}, stacked=False)
            agg.result()

    res["naive"] = _timed(device, naive)
    flops["naive"] = flops["dense"] = _flops_per_pass(lambda: _sampler(net, 1, m, engine="dense").run(inferer, x), 1)
    for mb in args.max_batch:
        res[f"dense{mb}"] = _timed(device, lambda: _sampler(net, n, m, max_batch=mb, engine="dense").run(inferer, x, generator=torch.Generator(device=device).manual_seed(0)))
    variants = {"compact fp32": torch.float32, f"compact {str(reduced).split('.')[-1]}": reduced}
    for name, dt in variants.items():
        res[name] = _timed(device, lambda: _sampler(net, n, m, max_batch=args.max_batch[0], engine="compact", dtype=dt).run(inferer, x, generator=torch.Generator(device=device).manual_seed(0)))
    flops["compact"] = _flops_per_pass(lambda: _sampler(net, 2, m, engine="compact").run(inferer, x, generator=torch.Generator().manual_seed(0)), 2)
    res["deterministic"] = _timed(device, lambda: _sampler(net, 1, m, mode="argmax", engine="compact").run(inferer, x))
    flops["argmax"] = _flops_per_pass(lambda: _sampler(net, 1, m, mode="argmax", engine="compact").run(inferer, x), 1)

    rate32 = conv_rate(device, torch.float32, channels_last=device.type == "cpu")
    rate_red = conv_rate(device, reduced, channels_last=True)
    rows = [(f"naive: {S} sequential SliceInferer runs (dense forward)", res["naive"], S / n, flops["dense"], rate32)]
    rows += [(f"dense vectorised: max_batch {mb} ({max(1, mb // args.sw_batch_size)} copies per call)", res[f"dense{mb}"], S / n, flops["dense"], rate32)
             for mb in args.max_batch]
    rows += [(f"{name}, channels-last, one distinct assignment per call", res[name], S / n, flops["compact"], rate32 if dt == torch.float32 else rate_red)
             for name, dt in variants.items()]
    rows.append(("deterministic: 1 pass (argmax), compact fp32", res["deterministic"], 1, flops["argmax"], rate32))
    ref = res[f"dense{args.max_batch[0]}"][0] * S / n
    print(f"\n{'method':78s} {'seconds':>9s} {'peak MB':>8s} {'vs dense':>9s} {'GFLOP/pass':>10s} {'GFLOP/s':>8s} {'of conv rate':>12s}")
    for name, (sec, peak), scale, fl, rate in rows:
        total = sec * scale
        passes = 1 if name.startswith("deterministic") else S
        achieved = fl * passes / total
        print(f"{name:78s} {total:9.2f} {peak / 2**20:8.1f} {ref / total:8.2f}x {fl / 1e9:10.2f} {achieved / 1e9:8.2f} {achieved / rate:11.0%}")
    print(f"\nmachine: 3x3 conv (64 ch) {rate32 / 1e9:.1f} GFLOP/s float32{' channels-last' if device.type == 'cpu' else ''}, "
          f"{rate_red / 1e9:.1f} GFLOP/s {str(reduced).split('.')[-1]} channels-last (measured now); native bfloat16: {native_bfloat16()}")
    print(f"naive / compact fp32: {res['naive'][0] / res['compact fp32'][0]:.2f}x; dense FLOPs / compact FLOPs per pass: {flops['dense'] / flops['compact']:.2f}")


def paper_job(args, device, reduced):
    """Single-slice posterior passes at the paper's size (288 x 288 + margin, 16/32/64), scaled to 62 x 50."""
    net = build_network("highresnet", "sfg", ("sct", "seg"), (1, 6), features=(16, 32, 64)).to(device).eval()
    x = torch.randn(1, 1, 288, 288, device=device)
    for name, dt in (("compact fp32", torch.float32), (f"compact {str(reduced).split('.')[-1]}", reduced)):
        if dt != torch.float32 and device.type == "cpu" and not native_bfloat16():
            print(f"paper job, {name}: skipped (no native bfloat16 on this CPU)")
            continue
        s = _sampler(net, 1, args.margin, engine="compact", dtype=dt)
        s.sample(x)  # warm-up
        t, peak = _timed(device, lambda: _sampler(net, args.paper_slices, args.margin, engine="compact", dtype=dt).sample(x))
        per = t / args.paper_slices
        print(f"paper job, {name}: {per:.2f} s per slice-pass ({args.paper_slices} passes of one 354 x 354 slice timed), "
              f"x 62 slices x 50 passes = {per * 3100:.0f} s ({per * 3100 / 60:.1f} min); peak {peak / 2**20:.0f} MB")


def machine() -> dict:
    """The CPU (lscpu's model name, cores, the bfloat16 / AMX flags), torch's threads and the GPU if any."""
    info: dict = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        info["cpu_model"] = fields.get("Model name", "").strip()
        info["cpus"] = int(fields.get("CPU(s)", "0").strip() or 0)
        flags = set(fields.get("Flags", "").split())
        info["flags"] = sorted(f for f in flags if "bf16" in f or f.startswith("amx") or f in ("avx512f", "avx2", "avx512_vnni"))
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    info["native_bfloat16"] = native_bfloat16()
    info["load_average"] = list(os.getloadavg())  # a shared machine: what else ran
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def git_revision() -> dict:
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip())
        return {"revision": rev, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"revision": None, "dirty": None}


def paper_table(args, device, reduced):
    """Per slice-pass of the paper job: dense / compact, each without and with receptive-field cropping, in
    float32 and the reduced dtype; one JSON record."""
    torch.manual_seed(0)
    net = build_network("highresnet", "sfg", ("sct", "seg"), (1, 6), features=tuple(args.features)).to(device).eval()
    x = torch.randn(1, 1, 288, 288, device=device)
    n, m, slices, S = args.paper_table, args.margin, 62, args.num_samples
    red = str(reduced).split(".")[-1]
    dtypes = [("float32", torch.float32)]
    if device.type == "cuda" or native_bfloat16():
        dtypes.append((red, reduced))
    variants = [(eng, crop, name, dt) for name, dt in dtypes for eng in ("dense", "compact") for crop in (False, True)]

    def sampler(eng, crop, dt, passes):
        s = _sampler(net, passes, m, engine=eng, dtype=dt, max_batch=args.paper_max_batch, generator=torch.Generator(device=device).manual_seed(0))
        s.receptive_crop = crop
        return s

    rate = {"float32": conv_rate(device, torch.float32, channels_last=device.type == "cpu")}
    if len(dtypes) > 1:
        rate[red] = conv_rate(device, reduced, channels_last=True)
    flops, rows = {}, []
    for eng, crop, name, dt in variants:
        key = (eng, crop)
        if key not in flops:  # the same work in every dtype
            flops[key] = _flops_per_pass(lambda: sampler(eng, crop, torch.float32, 1).sample(x), 1)
        sampler(eng, crop, dt, 1).sample(x)  # warm-up
        c0 = time.process_time()
        t, peak = _timed(device, lambda: sampler(eng, crop, dt, n).sample(x))
        per, cpu = t / n, (time.process_time() - c0) / n
        rows.append(dict(engine=eng, cropped=crop, dtype=name, seconds_per_pass=per, cpu_seconds_per_pass=cpu, gflop_per_pass=flops[key] / 1e9,
                         gflops_achieved=flops[key] / per / 1e9, conv_rate_gflops=rate[name] / 1e9, fraction_of_conv_rate=flops[key] / per / rate[name],
                         job_minutes=per * slices * S / 60, peak_mb=peak / 2**20, timed_passes=n))
        r = rows[-1]
        print(f"{eng:8s} {'crop' if crop else 'full':5s} {name:9s} {per:7.3f} s/pass ({cpu:6.2f} CPU s)  {r['gflop_per_pass']:7.1f} GFLOP  "
              f"{r['gflops_achieved']:6.1f} GFLOP/s ({r['fraction_of_conv_rate']:4.0%} of conv)  job {r['job_minutes']:6.1f} min", flush=True)
    mach = machine()
    where = mach.get("gpu") if device.type == "cuda" else f"{mach.get('cpu_model', '?')}, {mach.get('cpus', '?')} CPUs, {torch.get_num_threads()} threads, flags {' '.join(mach.get('flags', []))}"
    print(f"\npaper job per slice-pass (one 288 x 288 slice + margin {m} = {288 + 2 * m} x {288 + 2 * m}; {n} timed passes each; "
          f"whole job {slices} slices x {S} passes) on {where}")
    print("| engine | regions | dtype | s / pass | CPU s / pass | GFLOP / pass | GFLOP/s | of 3x3 conv rate | job (min) | vs dense fp32 |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    base = rows[0]["seconds_per_pass"]
    for r in rows:
        print(f"| {r['engine']} | {'cropped' if r['cropped'] else 'whole frame'} | {r['dtype']} | {r['seconds_per_pass']:.2f} | {r['cpu_seconds_per_pass']:.2f} | {r['gflop_per_pass']:.1f} | "
              f"{r['gflops_achieved']:.1f} | {r['fraction_of_conv_rate']:.0%} | {r['job_minutes']:.1f} | {base / r['seconds_per_pass']:.2f}x |")
    print("3x3 conv rate (64 ch, 128 x 128, measured in this run): " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in rate.items()))
    record = dict(
        benchmark="posterior_inference --paper-table",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        config=dict(slice=[288, 288], margin=m, features=list(args.features), slices=slices, passes=S, timed_passes=n,
                    max_batch=args.paper_max_batch, device=str(device), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY")),
        git=git_revision(), machine=mach,
        metrics=dict(conv_rate_gflops={k: v / 1e9 for k, v in rate.items()}),
        timings=rows,
    )
    out = Path(args.results) / f"posterior_paper_{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"record: {out}")


def accuracy(args, device, reduced):
    """Demo weights on a phantom (the bundle's preprocessing): float32 against ``reduced`` with the same draws,
    then ``num_samples='auto'`` against the fixed count."""
    from mtl_med.pelvis.phantoms import write_phantom
    from mtl_med.inference import Predictor

    S = args.accuracy_samples
    with tempfile.TemporaryDirectory() as root:
        paths = write_phantom(generate_phantom(3, shape=tuple(args.accuracy_size)), Path(root))
        demo = BUNDLE / "models" / "demo"
        pred = Predictor(BUNDLE, ckpt_path=str(demo / "model.pt"), landmarks_path=str(demo / "landmarks.json"), features=[8, 16, 16],
                         device=str(device), n4=False, progress=False, save_png=False, num_samples=S, seed=0)
        item = {"mr": paths["mr"], "ct": paths["ct"], "label": paths["label"]}
        data = pred.preprocess(item)

        def run(dtype, num_samples=S):
            pred.sampler.dtype, pred.sampler.adaptive = dtype, num_samples == "auto"
            pred.sampler.reset_passes()
            t0 = time.perf_counter()
            maps = pred.sample(data)
            return maps, pred.metrics(data, maps, item), time.perf_counter() - t0, pred.sampler.passes_used()

        ref, m_ref, t_ref, _ = run(torch.float32)
        shape = tuple(data["mr"].shape[1:])
        print(f"\naccuracy on the demo weights: phantom {tuple(args.accuracy_size)} -> {shape} after preprocessing, {S} passes per slice, "
              f"float32 {t_ref:.1f} s")

        def compare(name, maps, m, secs, extra=""):
            d = (maps["sct"] - ref["sct"]).abs()
            flips = float((maps["seg"] != ref["seg"]).float().mean())
            keys = [k for k in m_ref if isinstance(m_ref[k], float) and ("dice" in k.lower() or k in ("psnr_overall", "mae_overall"))]
            delta = ", ".join(f"{k} {m[k] - m_ref[k]:+.4f}" for k in keys)
            print(f"{name}: {secs:.1f} s{extra}; |sCT - float32 sCT| mean {float(d.mean()):.2f} HU, max {float(d.max()):.1f} HU; "
                  f"modal label changed at {flips:.3%} of voxels; metric changes: {delta}")

        if device.type == "cpu" and reduced == torch.bfloat16 and not native_bfloat16():
            print("(no native bfloat16 on this CPU: the reduced-dtype run is emulated and slow; its numbers are what a native CPU computes)")
        if not args.skip_reduced:
            compare(str(reduced).split(".")[-1], *run(reduced)[:3])
        pred.sampler.requested_samples = args.num_samples  # "auto" runs up to the maximum
        maps, m, secs, used = run(torch.float32, "auto")
        compare(f"auto (max {args.num_samples}) float32", maps, m, secs,
                f", passes per slice batch mean {used['mean']:.1f} (min {used['min']}, max {used['max']}, {used['batches']} batches)")
        print(f"Monte-Carlo noise for scale: float32 {S} passes with another seed: ", end="")
        pred.seed = 1
        compare(f"seed 1, {S} passes", *run(torch.float32)[:3])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=3, default=None, help="volume X Y Z (default 288 288 62 on CUDA, 48 48 4 on CPU)")
    p.add_argument("--num-samples", type=int, default=50, help="S (section 5.2: 50)")
    p.add_argument("--timed-passes", type=int, default=None, help="passes timed per method, scaled to S (default: S on CUDA, 4 on CPU)")
    p.add_argument("--features", type=int, nargs=3, default=[16, 32, 64])
    p.add_argument("--margin", type=int, default=33, help="replicate margin per slice side (inference.json margin)")
    p.add_argument("--sw-batch-size", type=int, default=4, help="slices per inferer batch (inference.json sw_batch_size)")
    p.add_argument("--max-batch", type=int, nargs="+", default=[64], help="images per forward call of the dense sampler")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--paper-slices", type=int, default=0, help="time this many slice-passes of the paper job and scale")
    p.add_argument("--paper-table", type=int, default=0, metavar="N",
                   help="per slice-pass table of the paper job (dense / compact, whole frame / cropped, fp32 / reduced), N timed passes each")
    p.add_argument("--paper-max-batch", type=int, default=2, help="copies per dense call in --paper-table (memory: 354 x 354 x 64 ch x 3 streams each)")
    p.add_argument("--results", default=str(Path(__file__).resolve().parents[1] / "results" / "performance"), help="folder of the JSON records")
    p.add_argument("--accuracy", action="store_true", help="demo weights on a phantom: reduced dtype and auto pass count")
    p.add_argument("--accuracy-size", type=int, nargs=3, default=[48, 48, 6])
    p.add_argument("--accuracy-samples", type=int, default=50)
    p.add_argument("--skip-reduced", action="store_true", help="accuracy without the reduced-dtype run")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.size = args.size or ([288, 288, 62] if device.type == "cuda" else [48, 48, 4])
    reduced = torch.float16 if device.type == "cuda" else torch.bfloat16
    if not args.no_timing:
        timing(args, device, reduced)
    if args.paper_slices:
        paper_job(args, device, reduced)
    if args.paper_table:
        paper_table(args, device, reduced)
    if args.accuracy:
        accuracy(args, device, reduced)


if __name__ == "__main__":
    main()
