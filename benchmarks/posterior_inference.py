"""Time of 50-sample posterior inference of SFG-HighResNet over a whole volume, three ways, in one run.

1. naive: S sequential single-pass runs of MONAI's SliceInferer over the volume, each aggregated into running
   statistics (what the original tool did). Only ``--naive-passes`` passes are timed and the time is scaled
   to S (said in the output).
2. vectorised: the bundle's sampler (``mtl_med.inference.PosteriorSampler`` inside one SliceInferer run):
   every slice batch runs all S samples, ``max_batch // slices`` copies per forward call, each copy with its
   own group assignment; once per ``--max-batch`` value (the first is the reference of the ratios).
3. one deterministic pass (argmax groups).

Prints seconds, peak memory (CUDA: ``max_memory_allocated``; CPU: peak resident memory above the level before
the method, sampled from /proc every 2 ms), the ratios, the FLOP count of one pass
(``torch.utils.flop_counter.FlopCounterMode``) and the achieved FLOP/s next to this machine's measured matmul
and convolution rates. The input is a phantom MR (z-scored; N4 / histogram standardisation happen once per case
in the bundle and are not part of this comparison). Random-init weights: the time does not depend on them.

    python benchmarks/posterior_inference.py --size 288 288 62 --device cuda      # the paper's volume (A.3)
    python benchmarks/posterior_inference.py --size 64 64 16 --threads 2         # a reduced size on a CPU
    python benchmarks/posterior_inference.py --size 96 96 32 --features 8 16 16 --max-batch 4 16 64 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time

import numpy as np
import torch
from monai.inferers import SliceInferer
from torch.utils.flop_counter import FlopCounterMode

from mtl_med.data.phantoms import generate_phantom
from mtl_med.inference import PosteriorAggregator, PosteriorSampler, sampling_mode
from mtl_med.networks import build_network


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


def machine_rates(device: torch.device, n: int) -> tuple[float, float]:
    """Measured FLOP/s of a float32 matmul (n x n) and of a 3x3 convolution like the network's (64 channels)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    x = torch.randn(16, 64, 64, 64, device=device)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(device)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        conv(x)
    conv_flops = fc.get_total_flops()
    rates = []
    for fn, flops in ((lambda: a @ b, 2 * n**3), (lambda: conv(x), conv_flops)):
        with torch.no_grad():
            fn()
            _sync(device)
            reps, t0 = 0, time.perf_counter()
            while reps < 3 or time.perf_counter() - t0 < 0.5:
                fn()
                reps += 1
            _sync(device)
        rates.append(flops * reps / (time.perf_counter() - t0))
    return rates[0], rates[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=3, default=None, help="volume X Y Z (default 288 288 62 on CUDA, 64 64 16 on CPU)")
    p.add_argument("--num-samples", type=int, default=50, help="S (section 5.2: 50)")
    p.add_argument("--naive-passes", type=int, default=None, help="naive passes timed, scaled to S (default: S on CUDA, 3 on CPU)")
    p.add_argument("--features", type=int, nargs=3, default=[16, 32, 64])
    p.add_argument("--sw-batch-size", type=int, default=4, help="slices per forward call (inference.json sw_batch_size)")
    p.add_argument("--max-batch", type=int, nargs="+", default=[64], help="images per forward call of the sampler (inference.json max_batch); several values: one timing each")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--amp", action="store_true", help="float16 autocast (CUDA)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = tuple(args.size) if args.size else ((288, 288, 62) if device.type == "cuda" else (64, 64, 16))
    S = args.num_samples
    naive_passes = min(S, args.naive_passes or (S if device.type == "cuda" else 3))

    ph = generate_phantom(0, shape=size)
    mr = torch.as_tensor(ph.mr, dtype=torch.float32)
    x = ((mr - mr.mean()) / mr.std())[None, None].to(device)
    net = build_network("highresnet", "sfg", ("sct", "seg"), (1, 6), features=tuple(args.features)).to(device).eval()
    inferer = SliceInferer(spatial_dim=2, roi_size=(-1, -1), sw_batch_size=args.sw_batch_size, overlap=0.0, progress=False)
    amp = torch.autocast("cuda", dtype=torch.float16) if args.amp and device.type == "cuda" else contextlib.nullcontext()
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"volume {size}, S = {S}, features {args.features}, sw_batch_size {args.sw_batch_size}, max_batch {args.max_batch}")

    # warm-up (allocator, kernels)
    with torch.no_grad(), sampling_mode(net, "argmax", per_example=False), amp:
        inferer(x[..., :2], lambda b: net(b))

    results = {}

    # 1. naive: S sequential runs of the slice inferer, aggregated volume by volume
    g = torch.Generator(device=device).manual_seed(0)
    mem: dict = {}
    with peak_memory(device, mem), torch.no_grad(), sampling_mode(net, "sample", per_example=False), amp:
        agg = PosteriorAggregator(("sct",), {"seg": 6})
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(naive_passes):
            out = inferer(x, lambda b: net(b, generator=g))
            agg.update({k: v.float() for k, v in out.items()}, stacked=False)
        agg.result()
        _sync(device)
        t = time.perf_counter() - t0
    results["naive"] = (t * S / naive_passes, mem["peak"])
    naive_note = f" (timed {naive_passes} passes, scaled to {S})" if naive_passes < S else ""

    # 2. the bundle's vectorised sampler, per max_batch
    for mb in args.max_batch:
        g = torch.Generator(device=device).manual_seed(0)
        mem = {}
        sampler = PosteriorSampler(net, num_samples=S, max_batch=mb, mode="sample", regression=("sct",),
                                   labels={"seg": 6}, amp=args.amp)
        with peak_memory(device, mem):
            _sync(device)
            t0 = time.perf_counter()
            sampler.run(inferer, x, generator=g)
            _sync(device)
            t = time.perf_counter() - t0
        results[f"vectorised{mb}"] = (t, mem["peak"])

    # 3. one deterministic pass
    mem = {}
    with peak_memory(device, mem), torch.no_grad(), sampling_mode(net, "argmax", per_example=False), amp:
        _sync(device)
        t0 = time.perf_counter()
        inferer(x, lambda b: net(b))
        _sync(device)
        t = time.perf_counter() - t0
    results["deterministic"] = (t, mem["peak"])

    # FLOPs of one pass over the volume
    with FlopCounterMode(display=False) as fc, torch.no_grad(), sampling_mode(net, "argmax", per_example=False):
        inferer(x, lambda b: net(b))
    flops = fc.get_total_flops()
    mm_rate, conv_rate = machine_rates(device, 4096 if device.type == "cuda" else 1024)

    print(f"\n{'method':70s} {'seconds':>9s} {'peak MB':>9s} {f'vs max_batch {args.max_batch[0]}':>16s} {'achieved GFLOP/s':>17s}")
    rows = [
        (f"naive: {S} sequential SliceInferer runs{naive_note}", *results["naive"], S * flops),
        *[(f"vectorised: {S} samples, max_batch {mb} ({max(1, mb // args.sw_batch_size)} copies per call)", *results[f"vectorised{mb}"], S * flops)
          for mb in args.max_batch],
        ("deterministic: 1 pass (argmax)", *results["deterministic"], flops),
    ]
    tv = results[f"vectorised{args.max_batch[0]}"][0]
    for name, sec, peak, fl in rows:
        print(f"{name:70s} {sec:9.2f} {peak / 2**20:9.1f} {sec / tv:15.2f}x {fl / sec / 1e9:17.2f}")
    print(f"\nspeed-up of the vectorised sampler (max_batch {args.max_batch[0]}) over the naive loop: {results['naive'][0] / tv:.2f}x; "
          f"{S} samples cost {tv / results['deterministic'][0]:.1f}x one deterministic pass")
    print(f"FLOPs of one pass over the volume: {flops / 1e9:.2f} GFLOP ({flops / np.prod(size) / 1e3:.1f} kFLOP per voxel)")
    print(f"machine: matmul {mm_rate / 1e9:.1f} GFLOP/s, 3x3 conv (64 ch) {conv_rate / 1e9:.1f} GFLOP/s (float32, measured now)")
    print(f"vectorised sampler reaches {S * flops / tv / conv_rate:.0%} of the measured conv rate")


if __name__ == "__main__":
    main()
