"""Helpers shared by the networks and the engines."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["batch_norm_statistics", "channels_last", "unwrap"]


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DataParallel / DDP wrapper (its ``module``), else ``module`` itself."""
    return getattr(module, "module", module)


@contextlib.contextmanager
def batch_norm_statistics(network: torch.nn.Module, enabled: bool = True):
    """Normalise with the statistics of the current batch, leaving the running ones untouched
    (SFG paper, A.4's test-time batch-norm)."""
    bns = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] if enabled else []
    saved = [(m.training, m.momentum) for m in bns]
    for m in bns:
        m.train()
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, (training, momentum) in zip(bns, saved):
            m.train(training)
            m.momentum = momentum


def channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with its 4-D parameters and buffers in ``channels_last`` and its 5-D ones in
    ``channels_last_3d`` memory (in place; values unchanged). oneDNN's and cuDNN's fastest convolutions
    read and write channels-last tensors; give the inputs the same format."""

    def convert(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        if t.dim() == 5:
            return t.contiguous(memory_format=torch.channels_last_3d)
        return t

    return module._apply(convert)
