"""Inference under ``torch.distributed`` (torchrun, ``multi_gpu_*.json``): this process's rank and the world size,
the cases it runs, and every rank's results gathered into one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["rank_world", "my_share", "gather_results", "barrier"]


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside an initialised process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def my_share(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """The cases dealt to ``rank`` in turn (``items[rank::world]``): each case runs exactly once."""
    return list(items[rank::world])


def barrier(world: int) -> None:
    """Wait for every rank (nothing to wait for with one process)."""
    if world > 1:
        torch.distributed.barrier()


def gather_results(res: dict[str, Any], items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every rank's ``run`` result merged (in case order) on every rank."""
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, res)
    order = {x["name"]: i for i, x in enumerate(items)}
    merged: dict[str, Any] = {"cases": {}, "failed": {}, "skipped": [], "ranks": {}}
    for part in parts:
        merged["cases"].update(part["cases"])
        merged["failed"].update(part["failed"])
        merged["skipped"] += part["skipped"]
        merged["ranks"].update(part["ranks"])
    for key in ("cases", "failed"):
        merged[key] = dict(sorted(merged[key].items(), key=lambda kv: order.get(kv[0], len(order))))
    merged["skipped"].sort(key=lambda c: order.get(c, len(order)))
    return merged
