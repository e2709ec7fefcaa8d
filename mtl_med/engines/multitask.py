"""MONAI engines for multi-task batches: one image in, a dict of task targets (and optionally a
mask of valid voxels) out, whatever the sharing mechanism of the network."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from ..networks.utils import batch_norm_statistics, unwrap

__all__ = ["MultiTaskPrepareBatch", "MultiTaskTrainer", "MultiTaskEvaluator", "loss_terms", "task_output", "parameter_groups"]


class MultiTaskPrepareBatch:
    """Turns a batch dict into ``(inputs, {task: target}, args, kwargs)`` for MONAI's engines.

    Args:
        image_key: the network input, e.g. ``"mr"``.
        target_keys: task name -> batch key of its target, e.g. ``{"sct": "ct", "seg": "label"}``;
            or the key of a batch entry that already is a ``{task: target}`` dict (e.g.
            ``"targets"`` of :class:`mtl_med.data.vision.MultiTaskImageDataset` items).
        mask_key: batch key of the mask of valid voxels (A.3's padding mask); it travels in the
            targets dict under ``"mask"`` so the loss can honour it.
    """

    def __init__(self, image_key: str, target_keys: Mapping[str, str] | str, mask_key: str | None = None):
        self.image_key, self.mask_key = image_key, mask_key
        self.target_keys = target_keys if isinstance(target_keys, str) else dict(target_keys)

    def __call__(self, batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs):
        def move(x):
            return torch.as_tensor(x).to(device=device, non_blocking=non_blocking, **kwargs)

        if self.image_key not in batchdata:
            raise KeyError(f"batch has no {self.image_key!r}; keys are {sorted(batchdata)}")
        if isinstance(self.target_keys, str):
            targets = {task: move(v) for task, v in batchdata.get(self.target_keys, {}).items()}
        else:
            targets = {task: move(batchdata[key]) for task, key in self.target_keys.items() if key in batchdata}
        if self.mask_key is not None and self.mask_key in batchdata:
            targets["mask"] = move(batchdata[self.mask_key])
        return move(batchdata[self.image_key]), targets, (), {}


def _split_mask(targets: Mapping[str, torch.Tensor]):
    return {k: v for k, v in targets.items() if k != "mask"}, targets.get("mask")


class MultiTaskTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose network returns ``{task: output}`` and whose loss is a
    :class:`~mtl_med.losses.MultiTaskLoss` (given the mask and the network, so sharing
    regularisers such as SFG's eq. 5 are added).

    Args:
        task_sampler: optional callable returning the task of each mini-batch (Task Routing's
            alg. 1); the network is then called with ``task=`` and only that task's loss counts.
        forward_kwargs: extra keyword arguments of every network call (e.g. a generator).
        Others: as ``SupervisedTrainer``; ``decollate`` defaults to False (outputs are dicts). ``amp``
            autocasts the forward pass and the loss: fp16 with a gradient scaler on CUDA, bfloat16 without
            one on a CPU (choose it where the CPU computes bf16 natively: ``native_bfloat16()``).

    ``engine.state.output`` holds ``image``, ``label`` (targets dict), ``pred`` (outputs dict),
    ``loss`` (the total) and ``terms`` (each task's loss and the regulariser, detached).
    """

    def __init__(self, *args, task_sampler: Callable | None = None, forward_kwargs: Mapping | None = None, decollate: bool = False, **kwargs):
        super().__init__(*args, decollate=decollate, **kwargs)
        self.task_sampler = task_sampler
        self.forward_kwargs = dict(forward_kwargs or {})

    def _iteration(self, engine: MultiTaskTrainer, batchdata: Mapping) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets, _, _ = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        targets, mask = _split_mask(targets)
        kwargs = dict(self.forward_kwargs)
        if self.task_sampler is not None:
            kwargs["task"] = self.task_sampler()
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}

        def compute():
            pred = engine.inferer(inputs, engine.network, **kwargs)
            engine.state.output[Keys.PRED] = pred
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            total, terms = engine.loss_function(pred, targets, mask=mask, model=engine.network)
            engine.state.output[Keys.LOSS], engine.state.output["terms"] = total, terms
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        if engine.amp:  # fp16 with a gradient scaler on CUDA; bf16 (same exponent range as fp32, no scaler) on a CPU
            with torch.autocast(engine.state.device.type, **engine.amp_kwargs):
                compute()
        else:
            compute()
        if engine.amp and engine.scaler is not None and engine.state.device.type == "cuda":  # a CPU's bf16 needs no scaling
            engine.scaler.scale(engine.state.output[Keys.LOSS]).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            engine.state.output[Keys.LOSS].backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class MultiTaskEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` for networks returning ``{task: output}``; ``label`` in the output is
    the targets dict of :class:`MultiTaskPrepareBatch`.

    Args:
        forward_kwargs: extra keyword arguments of every network call.
        bn_inference: ``"population"`` (batch-norm running averages) or ``"batch"`` (statistics of
            each evaluation batch, as SFG's A.4; needed where the running averages mix inputs whose
            statistics differ by task, e.g. task routing with small sigma; use large batches).
    """

    def __init__(self, *args, forward_kwargs: Mapping | None = None, bn_inference: str = "population", decollate: bool = False, **kwargs):
        super().__init__(*args, decollate=decollate, **kwargs)
        if bn_inference not in ("population", "batch"):
            raise ValueError(f"bn_inference must be 'population' or 'batch', got {bn_inference!r}")
        self.forward_kwargs, self.bn_inference = dict(forward_kwargs or {}), bn_inference

    def _iteration(self, engine: MultiTaskEvaluator, batchdata: Mapping) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets, _, _ = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        targets, _ = _split_mask(targets)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        with engine.mode(engine.network), batch_norm_statistics(engine.network, self.bn_inference == "batch"):
            if engine.amp:
                with torch.autocast(engine.state.device.type, **engine.amp_kwargs):
                    pred = engine.inferer(inputs, engine.network, **self.forward_kwargs)
            else:
                pred = engine.inferer(inputs, engine.network, **self.forward_kwargs)
        engine.state.output[Keys.PRED] = pred
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def loss_terms(output: Mapping) -> dict[str, float]:
    """``output_transform`` for ``TensorBoardStatsHandler``/``StatsHandler``: the total loss and
    each task's term as scalars (``loss/<task>``)."""
    terms = {f"loss/{k}": float(v) for k, v in output.get("terms", {}).items()}
    terms["loss/total"] = float(output[Keys.LOSS].detach())
    return terms


def task_output(task: str, pred_transform: Callable | None = None, label_transform: Callable | None = None) -> Callable:
    """``output_transform`` for an ignite/MONAI metric of one task: ``(y_pred, y)`` of ``task``,
    each optionally transformed (e.g. argmax and one-hot for Dice)."""

    def transform(output: Mapping | Sequence):
        pred, label = output[Keys.PRED][task], output[Keys.LABEL][task]
        if pred_transform is not None:
            pred = pred_transform(pred)
        if label_transform is not None:
            label = label_transform(label)
        return pred, label

    return transform


def parameter_groups(network: torch.nn.Module, lr: float, **options) -> list:
    """The optimiser's parameters (or parameter groups with their own rates) as the network says:
    ``network.parameter_groups(lr, **options)`` (a sharing method's hook; ``options`` are its
    settings, e.g. a rate scale of some of its parameters), else every parameter in one group.
    A wrapped network (DDP) is asked through its ``module``."""
    net = unwrap(network)
    hook = getattr(net, "parameter_groups", None)
    return hook(lr, **options) if callable(hook) else list(network.parameters())
