"""Training step and posterior pass of the flagship network at two git revisions, interleaved in one run.

Each revision's network is what its own pelvis bundle builds (``network_def`` of
``bundles/sfg_highresnet_pelvis/configs/train.json`` and ``inference.json``), so the comparison
needs nothing but the configs. Each round runs one child process per revision (alternating
order), each timing ``--steps`` steps after a warm-up; the medians over rounds and their ratio
are printed. Usage:
    python benchmarks/compare_revisions.py --base HEAD~1 [--rounds 5] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, sys, time, statistics, torch
from monai.bundle import ConfigParser
torch.set_num_threads(int(os.environ.get("BENCH_THREADS") or torch.get_num_threads()))
cfg = os.path.join("bundles", "sfg_highresnet_pelvis", "configs")
device = torch.device(os.environ["BENCH_DEVICE"])
steps, size, batch, samples = (int(os.environ[k]) for k in ("BENCH_STEPS", "BENCH_SIZE", "BENCH_BATCH", "BENCH_SAMPLES"))

def network(name):
    p = ConfigParser()
    p.read_config(os.path.join(cfg, name))
    p["bundle_root"] = os.path.join("bundles", "sfg_highresnet_pelvis")
    return p.get_parsed_content("network_def").to(device)

def timed(fn):
    fn(); fn()  # warm-up: allocator, kernels
    out = []
    for _ in range(steps):
        if device.type == "cuda": torch.cuda.synchronize()
        t = time.perf_counter(); fn()
        if device.type == "cuda": torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)

torch.manual_seed(0)
net = network("train.json").train()
opt = torch.optim.Adam(net.parameters(), 1e-3)
x = torch.randn(batch, 1, size, size, device=device)
ct = torch.randn(batch, 1, size, size, device=device)
seg = torch.randint(0, 6, (batch, size, size), device=device)
def step():
    out = net(x)
    loss = torch.nn.functional.mse_loss(out["sct"], ct) + torch.nn.functional.cross_entropy(out["seg"], seg) + net.regularizer()
    opt.zero_grad(); loss.backward(); opt.step()
train = timed(step)

inf = network("inference.json").eval()
inf.set_inference("sample", per_example=True)
xs = torch.randn(samples, 1, size, size, device=device)
g = torch.Generator(device=device).manual_seed(0)
def sample():
    with torch.no_grad():
        inf(xs, generator=g)
print(json.dumps({"train_step_s": train, "posterior_pass_s": timed(sample)}))
"""


def run_child(tree: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=tree, env={**env, "PYTHONPATH": tree}, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{tree}: the benchmark failed:\n{out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="git revision to compare the working tree with")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="timed steps per child (median)")
    p.add_argument("--size", type=int, default=128, help="slice size (A.3: 128 x 128 patches)")
    p.add_argument("--batch", type=int, default=10, help="training batch (A.3: 10)")
    p.add_argument("--samples", type=int, default=10, help="posterior samples in one pass")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    repo = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip()
    env = dict(os.environ, BENCH_DEVICE=args.device, BENCH_STEPS=str(args.steps), BENCH_SIZE=str(args.size),
               BENCH_BATCH=str(args.batch), BENCH_SAMPLES=str(args.samples), BENCH_THREADS=str(args.threads or ""))
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = os.path.join(tmp, "base")
        subprocess.run(["git", "worktree", "add", "--detach", base_tree, args.base], cwd=repo, check=True, capture_output=True)
        try:
            results = {"base": [], "current": []}
            for r in range(args.rounds):
                order = [("base", base_tree), ("current", repo)]
                for name, tree in order if r % 2 == 0 else order[::-1]:
                    results[name].append(run_child(tree, env))
                print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]['train_step_s']:.3f} / {v[-1]['posterior_pass_s']:.3f} s" for n, v in results.items()), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", base_tree], cwd=repo, capture_output=True)
    print(f"device {args.device}, threads {args.threads or 'default'}, training batch {args.batch} x 1 x {args.size}^2, "
          f"posterior pass {args.samples} samples x 1 x {args.size}^2, median over {args.rounds} rounds of {args.steps} steps")
    for key, label in (("train_step_s", "training step"), ("posterior_pass_s", "posterior pass")):
        b = statistics.median(v[key] for v in results["base"])
        c = statistics.median(v[key] for v in results["current"])
        print(f"{label:15s} base ({args.base}) {b:.4f} s   current {c:.4f} s   current/base {c / b:.3f}")


if __name__ == "__main__":
    main()
