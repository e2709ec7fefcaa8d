"""Size and training-step time of SFG-HighResNet against MONAI's HighResNet (both 2D).

Prints parameter counts and the median time of one training step (forward, multi-task loss,
backward, Adam) on a batch of 10 x 1 x 128 x 128 (A.3's batch and patch size), measured in the
same run, with the ratio to MONAI's HighResNet. Usage:
    python benchmarks/sfg_highresnet_step.py [--repeats 5] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.networks.nets import HighResNet

from mtl_med.losses import MaskedDiceCELoss, MaskedRMSELoss, MultiTaskLoss
from mtl_med.build import build_network


def step_time(model, forward, loss_fn, x, targets, repeats, device):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for i in range(repeats + 1):  # the first step warms up allocators and kernels
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = loss_fn(forward(x), targets, model=model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, args.size, args.size, device=device)
    targets = {"sct": torch.randn_like(x), "seg": torch.randint(0, 6, x.shape, device=device)}
    loss_fn = MultiTaskLoss({"sct": MaskedRMSELoss(), "seg": MaskedDiceCELoss()})

    monai_net = HighResNet(spatial_dims=2, in_channels=1, out_channels=7, acti_type=("prelu", {})).to(device).train()
    split = lambda y: {"sct": y[:, :1], "seg": y[:, 1:]}  # noqa: E731  one 7-channel head as two tasks
    rows = [("MONAI HighResNet (2D, 7 outputs)", monai_net, lambda b: split(monai_net(b)))]
    for grouping in ("sfg", "hard_sharing", "cross_stitch"):
        net = build_network("highresnet", "sfg", ("sct", "seg"), (1, 6), grouping=grouping).to(device).train()
        rows.append((f"SFG-HighResNet (2D, grouping={grouping})", net, net))

    print(f"device {device}, threads {torch.get_num_threads()}, batch {tuple(x.shape)}, median of {args.repeats} steps")
    base = None
    for name, model, fwd in rows:
        params = sum(p.numel() for p in model.parameters())
        t = step_time(model, fwd, loss_fn, x, targets, args.repeats, device)
        base = base or (params, t)
        print(f"{name:42s} params {params:>9,d} ({params / base[0]:.2f}x)   step {t:7.3f} s ({t / base[1]:.2f}x)")


if __name__ == "__main__":
    main()
