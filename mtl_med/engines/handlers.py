"""Ignite handlers of the bundles' training runs: TensorBoard example slices, and running a step on rank 0 first."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events


__all__ = ["ExampleSlicesHandler", "rank_zero_first"]


class ExampleSlicesHandler:
    """After each validation run, writes one axial slice of the first case as a TensorBoard image
    row: MR, CT, synthetic CT, label map, predicted label map (the last two as labels / max label).

    Expects an evaluator output with ``image`` (``B1XYZ``), ``label`` and ``pred`` dicts holding
    ``ct_key`` / ``seg_key`` in network units (``HU = ct_scale * (x - 1)``; pelvis, A.3: CT / 1024 + 1) and logits.
    """

    def __init__(self, summary_writer, ct_key: str, seg_key: str, ct_scale: float, step_transform=None,
                 window=(-1024.0, 1500.0), tag: str = "val/example_slices"):
        self.writer, self.step_transform, self.ct_key, self.seg_key = summary_writer, step_transform, ct_key, seg_key
        self.ct_scale = float(ct_scale)
        self.window, self.tag = window, tag

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        image, label, pred = out["image"], out["label"], out["pred"]
        z = image.shape[-1] // 2

        def plane(x):
            return torch.as_tensor(x)[0, 0, ..., z].detach().float().cpu()

        lo, hi = self.window
        ct_unit = lambda x: ((plane(x) - 1.0) * self.ct_scale - lo) / (hi - lo)  # noqa: E731  network scale -> window
        mr = plane(image)
        tiles = [(mr - mr.min()) / (mr.max() - mr.min()).clamp_min(1e-6)]
        if self.ct_key in label:
            tiles.append(ct_unit(label[self.ct_key]))
        tiles.append(ct_unit(pred[self.ct_key]))
        n = max(int(pred[self.seg_key].shape[1]) - 1, 1)
        if self.seg_key in label:
            tiles.append(plane(label[self.seg_key]) / n)
        tiles.append(plane(pred[self.seg_key].argmax(1, keepdim=True)) / n)
        row = torch.cat([t.clamp(0, 1).T.flip(0) for t in tiles], 1)  # axial view, anterior up
        step = self.step_transform(engine) if self.step_transform else engine.state.epoch
        self.writer.add_image(self.tag, row[None], step)


def rank_zero_first(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0 first, then on the other ranks (e.g. rank 0 learns and writes
    the landmarks file, the others then read it). Without torch.distributed it simply calls ``fn``."""
    import ignite.distributed as idist

    with idist.one_rank_first(rank=0):
        return fn(*args, **kwargs)
