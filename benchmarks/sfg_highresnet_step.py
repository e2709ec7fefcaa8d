"""Training step of SFG against a plain network of the same backbone: time, FLOPs and the overhead beyond the FLOP ratio.

For each pair (the flagship SFG-HighResNet against MONAI's HighResNet with the same 7 outputs; the
vision benchmark's VGG-11 with SFG against the same VGG-11 with hard sharing) it counts the FLOPs of
one training step (forward, multi-task loss, backward; ``torch.utils.flop_counter``) and times the
step (forward, loss, backward, Adam) in fp32, bf16 autocast and bf16 autocast with channels_last
memory (bf16 rows only on CPUs that compute bf16 natively, or on CUDA), interleaved over
``--rounds`` rounds in one run. The overhead is ``(t_SFG / t_plain) / (FLOPs_SFG / FLOPs_plain)``:
1.0 means SFG costs exactly its extra arithmetic. Also prints the machine's 3x3-convolution rate
measured in the same run, and writes a record under ``results/training_step/`` with ``--record``.
Usage:
    python benchmarks/sfg_highresnet_step.py [--rounds 3] [--batch 10] [--size 128] [--device cpu|cuda] [--threads N] [--record NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from monai.networks.nets import HighResNet
from torch.utils.flop_counter import FlopCounterMode

from mtl_med.build import build_network
from mtl_med.inference.posterior import native_bfloat16
from mtl_med.losses import MaskedDiceCELoss, MaskedRMSELoss, MultiTaskLoss
from mtl_med.networks.utils import channels_last


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def conv_rate(device, dtype=torch.float32, size=128, channels=32, batch=8, repeats=5) -> float:
    """GFLOP/s of a plain 3x3 convolution (channels -> channels) on this machine, now."""
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device, dtype)
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    flops = 2 * batch * channels * channels * 9 * size * size
    with torch.no_grad():
        conv(x)
        times = []
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            conv(x)
            _sync(device)
            times.append(time.perf_counter() - t)
    return flops / min(times) / 1e9


class Case:
    """One network with its inputs, loss and optimiser, stepped in a given precision and memory format."""

    foreach = True  # as the bundles' optimisers: one kernel per op for all tensors

    def __init__(self, name, make, x, targets, loss_fn, device):
        self.name, self.make, self.x, self.targets, self.loss_fn, self.device = name, make, x, targets, loss_fn, device

    def setup(self, fmt: str):
        torch.manual_seed(0)
        self.model, self.forward = self.make()
        self.model.to(self.device).train()
        self.x_in = self.x
        if fmt.endswith("_cl"):
            channels_last(self.model)
            self.x_in = self.x.contiguous(memory_format=torch.channels_last)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if fmt.startswith("bf16")
                         else contextlib.nullcontext())
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, foreach=self.foreach)

    def step(self):
        with self.autocast:
            loss, _ = self.loss_fn(self.forward(self.x_in), self.targets, model=self.model)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def flops(self) -> int:
        self.setup("fp32")
        with FlopCounterMode(display=False) as counter:
            with self.autocast:
                loss, _ = self.loss_fn(self.forward(self.x_in), self.targets, model=self.model)
            loss.backward()
        return counter.get_total_flops()

    def timed(self, fmt: str, steps: int) -> float:
        self.setup(fmt)
        self.step()  # warm-up: allocators, kernels, oneDNN primitives
        times = []
        for _ in range(steps):
            _sync(self.device)
            t = time.perf_counter()
            self.step()
            _sync(self.device)
            times.append(time.perf_counter() - t)
        return min(times)


def pelvis_cases(device, batch, size):
    x = torch.randn(batch, 1, size, size, device=device)
    targets = {"sct": torch.randn_like(x), "seg": torch.randint(0, 6, x.shape, device=device)}
    loss_fn = MultiTaskLoss({"sct": MaskedRMSELoss(), "seg": MaskedDiceCELoss()})

    def plain():
        net = HighResNet(spatial_dims=2, in_channels=1, out_channels=7, acti_type=("prelu", {}))
        return net, lambda b: dict(zip(("sct", "seg"), net(b).split([1, 6], 1)))  # one 7-channel head as two tasks

    def sfg():
        net = build_network("highresnet", "sfg", ("sct", "seg"), (1, 6))
        return net, net

    return (Case("HighResNet (MONAI, 2D)", plain, x, targets, loss_fn, device),
            Case("SFG-HighResNet (2D)", sfg, x, targets, loss_fn, device))


def vision_cases(device, batch, size=64, tasks=2):
    names = tuple(f"task{k}" for k in range(tasks))
    x = torch.randn(batch, 3, size, size, device=device)
    targets = {t: torch.randint(0, 2, (batch,), device=device) for t in names}
    loss_fn = MultiTaskLoss({t: torch.nn.CrossEntropyLoss() for t in names})

    def make(sharing):
        def build():
            net = build_network("vgg11_bn", sharing, names, 2, act="prelu", head_act="prelu")
            return net, net
        return build

    return (Case("VGG-11 hard sharing", make("hard_sharing"), x, targets, loss_fn, device),
            Case("VGG-11 SFG", make("sfg"), x, targets, loss_fn, device))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round (the fastest counts)")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--formats", nargs="+", default=None, help="fp32, bf16, bf16_cl (default: all the machine computes natively)")
    parser.add_argument("--adam", choices=("foreach", "loop"), default="foreach", help="Adam's implementation (the bundles: foreach)")
    parser.add_argument("--record", default=None, help="write results/training_step/NAME.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    Case.foreach = args.adam == "foreach"
    bf16 = device.type == "cuda" or native_bfloat16()
    formats = args.formats or (["fp32", "fp32_cl", "bf16", "bf16_cl"] if bf16 else ["fp32", "fp32_cl"])
    pairs = {"pelvis": pelvis_cases(device, args.batch, args.size), "vision": vision_cases(device, args.batch)}
    flops = {c.name: c.flops() for pair in pairs.values() for c in pair}
    times: dict = {}
    rates = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):  # interleaved, so a change of the machine's speed touches every row alike
        rates["fp32"].append(conv_rate(device))
        if bf16:
            rates["bf16"].append(conv_rate(device, torch.bfloat16))
        for pair in pairs.values():
            for case in pair:
                for fmt in formats:
                    times.setdefault((case.name, fmt), []).append(case.timed(fmt, args.steps))
    median = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: statistics.median(v) for k, v in rates.items() if v}
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, threads {torch.get_num_threads()},"
          f" batch {args.batch}, median over {args.rounds} rounds of the fastest of {args.steps} steps")
    print("3x3 conv rate in this run: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rate.items()))
    print(f"{'network':26s} {'GFLOP/step':>10s} " + " ".join(f"{f + ' s':>10s}" for f in formats) + "  " +
          " ".join(f"{f + '/fp32':>12s}" for f in formats[1:]))
    rows = {}
    for name, pair in pairs.items():
        plain, sfg = pair
        for case in pair:
            t = [median[(case.name, f)] for f in formats]
            print(f"{case.name:26s} {flops[case.name] / 1e9:10.2f} " + " ".join(f"{v:10.3f}" for v in t) + "  " +
                  " ".join(f"{v / t[0]:12.2f}" for v in t[1:]))
        flop_ratio = flops[sfg.name] / flops[plain.name]
        over = {f: median[(sfg.name, f)] / median[(plain.name, f)] / flop_ratio for f in formats}
        print(f"  {name}: FLOP ratio {flop_ratio:.2f}x; time ratio " +
              ", ".join(f"{f} {median[(sfg.name, f)] / median[(plain.name, f)]:.2f}x" for f in formats) +
              "; overhead beyond FLOPs " + ", ".join(f"{f} {v:.2f}x" for f, v in over.items()))
        rows[name] = {"flops": {c.name: flops[c.name] for c in pair}, "flop_ratio": flop_ratio, "overhead": over,
                      "seconds": {c.name: {f: median[(c.name, f)] for f in formats} for c in pair}}
    if args.record:
        import records

        records.write_record("training_step", args.record, seed=0,
                             config={k: getattr(args, k) for k in ("rounds", "steps", "batch", "size", "device", "adam")} | {"formats": formats},
                             metrics={"pairs": rows, "conv_rate_gflops": rate},
                             timings={"raw_seconds": {f"{n}|{f}": v for (n, f), v in times.items()}})


if __name__ == "__main__":
    main()
