"""SFG-HighResNet in one minute on a generated volume.

``python -m mtl_med.demo`` trains a 2D SFG-HighResNet for a few iterations on the axial slices
of a generated MR-like volume with a CT-like target and a 6-label map, then draws the 50-sample
posterior over the volume and prints what it learned: losses, grouping proportions per SFG
layer, and the spread of the posterior.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from tqdm import tqdm

from .inference import sample_posterior
from .layers import ExponentialTemperature
from .losses import MaskedDiceCELoss, MaskedRMSELoss, MultiTaskLoss
from .networks import SFGHighResNet

log = logging.getLogger("mtl_med.demo")


def generated_volume(size: int = 64, slices: int = 8, seed: int = 0):
    """An MR-like volume with a CT-like target and labels 0..5 made of random ellipses."""
    g = torch.Generator().manual_seed(seed)
    zz, yy, xx = torch.meshgrid(torch.linspace(-1, 1, slices), torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    label = torch.zeros(slices, size, size, dtype=torch.long)
    body = (xx / 0.9) ** 2 + (yy / 0.7) ** 2 < 1
    for k in range(1, 6):
        cx, cy = (torch.rand(2, generator=g) - 0.5) * 0.9
        r = 0.1 + 0.1 * torch.rand(1, generator=g)
        label[((xx - cx) ** 2 + (yy - cy) ** 2 + 0.2 * zz**2 < r**2) & body] = k
    hu = torch.tensor([40.0, 700.0, 700.0, 45.0, 10.0, -200.0])  # soft tissue, bone, organs, gas
    ct = torch.where(body, hu[label], torch.tensor(-1024.0))
    mr_level = torch.tensor([0.6, 0.1, 0.1, 0.8, 1.0, 0.05])  # bone and gas both dark in MR
    mr = torch.where(body, mr_level[label], torch.tensor(0.0)) + 0.05 * torch.randn(label.shape, generator=g)
    return mr, ct.clamp(-1024, 2500) / 1024 + 1, label  # A.3: CT/1024 + 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtl_med.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--num-samples", type=int, default=50, help="posterior samples (the paper's 50)")
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    mr, ct, label = generated_volume(args.size, seed=args.seed)
    x, targets = mr[:, None].to(device), {"sct": ct[:, None].to(device), "seg": label[:, None].to(device)}
    model = SFGHighResNet(spatial_dims=2).to(device)
    log.info("SFG-HighResNet 2D: %d parameters, SFG layers %s", sum(p.numel() for p in model.parameters()), [n for n, _ in model.sfg_layers()])
    loss_fn = MultiTaskLoss({"sct": MaskedRMSELoss(), "seg": MaskedDiceCELoss()})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999))  # A.1
    tau = ExponentialTemperature()  # A.1: max(0.1, exp(-1e-5 t))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    for _ in (bar := tqdm(range(args.iterations), desc="train", unit="it")):
        model.set_temperature(tau.step())
        loss, terms = loss_fn(model(x, gen), targets, model=model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix({k: f"{v.item():.3f}" for k, v in terms.items()})
    log.info("trained %d iterations in %.1f s, tau = %.5f", args.iterations, time.perf_counter() - start, model.temperature)

    start = time.perf_counter()
    post = sample_posterior(model, x, num_samples=args.num_samples, samples_per_batch=10, regression=("sct",), labels={"seg": 6}, generator=gen)
    log.info("%d-sample posterior over %s in %.1f s", args.num_samples, tuple(mr.shape), time.perf_counter() - start)
    sct_hu = (post["sct"] - 1) * 1024
    log.info("synthetic CT: %.0f..%.0f HU, posterior std mean %.1f HU", sct_hu.min(), sct_hu.max(), 1024 * post["sct_std"].mean())
    log.info("segmentation: labels %s, mean vote disagreement %.3f", post["seg"].unique().tolist(), post["seg_disagreement"].mean())
    log.info("grouping proportions per SFG layer [sct, seg, shared]:")
    for name, props in model.group_proportions().items():
        log.info("  %-6s %s   mean entropy %.3f", name, [round(p, 3) for p in props], model.mean_entropy()[name])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
