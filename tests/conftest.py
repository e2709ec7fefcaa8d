"""Test-wide settings and shared fixtures: in CI (``CI`` set) hypothesis draws the same examples on every run, so a
red build is reproducible; elsewhere each run explores new examples."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def _randomise_statistics(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(1 + 0.3 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.num_features, generator=g))
            elif isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(0.0, 0.5, generator=g)
    return net.eval()


@pytest.fixture
def randomise_statistics():
    """``randomise_statistics(net, seed=0)``: non-trivial batch-norm statistics and affine parameters and PReLU
    slopes (from ``seed``), in eval mode, so that folding or cropping them is tested; returns ``net``."""
    return _randomise_statistics


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_benchmark(name, register=False):
    """The script ``benchmarks/<name>.py`` as a module, with its folder on ``sys.path`` as when it runs as a script
    (the scripts import one another by name, some inside functions); ``register`` also puts it in ``sys.modules``
    (for its pickles and for scripts that import it)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark(name, register=False)``: a script of ``benchmarks/`` as a module."""
    return _load_benchmark
