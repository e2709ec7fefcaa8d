"""What ``ckpt_export`` / ``onnx_export`` export of a multi-task network: its task outputs concatenated
channel-wise (:class:`ConcatTaskOutputs`), traced per example and looped over the batch (:class:`ExportNetwork`),
and the ONNX writer (:func:`export_onnx`)."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from mtl_med.inference.checkpoint import load_checkpoint

__all__ = ["ConcatTaskOutputs", "ExportNetwork", "export_onnx"]

logger = logging.getLogger("mtl_med.inference")


class ConcatTaskOutputs(nn.Module):
    """One-tensor view of a multi-task network for ``verify_net_in_out`` / ``ckpt_export``: the task outputs
    concatenated channel-wise in ``task_names`` order (SFG-HighResNet: channel 0 synthetic CT on the network
    scale CT/1024 + 1, channels 1-6 segmentation logits), with the group assignments drawn by ``mode``
    (``"argmax"``: deterministic, traceable).

    ``load_state_dict`` accepts the wrapped network's own state dict (what training saves), so
    ``ckpt_export --net_id network_export_def`` loads ``models/model.pt`` as it is.
    """

    def __init__(self, network: nn.Module, task_names: Sequence[str] | None = None, mode: str | None = "argmax"):
        super().__init__()
        self.network = network
        self.task_names = tuple(task_names) if task_names is not None else tuple(getattr(network, "task_names", ()))
        if not self.task_names:
            raise ValueError("task_names are needed when the network has no task_names attribute")
        if mode is not None and hasattr(network, "set_inference"):
            network.set_inference(mode, per_example=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        return torch.cat([out[name] for name in self.task_names], dim=1)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if state_dict and not any(str(k).startswith("network.") for k in state_dict):
            return self.network.load_state_dict(state_dict, strict=strict, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


class _EachExample(nn.Module):
    """Runs a network traced on one example over every example of a batch (a TorchScript loop)."""

    def __init__(self, single: nn.Module):
        super().__init__()
        self.single = single

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.single(x[i : i + 1]) for i in range(x.shape[0])]
        return torch.cat(outs, 0)


class ExportNetwork(nn.Module):
    """What ``ckpt_export`` (TorchScript, traced or scripted) and ``onnx_export`` export: the network's task
    outputs concatenated channel-wise (:class:`ConcatTaskOutputs`, group assignments by ``mode``), at ANY batch
    size and input size.

    A trace of a multi-task network holds the traced batch size (the SFG layers run their streams as one batch
    and split it by the batch size), and the network as a whole cannot be scripted. So the network is traced
    on one example of ``example_shape`` (the trace keeps the input size free) and a scripted loop runs it over
    the batch; tracing or scripting this module keeps that loop (an ONNX ``Loop`` with the TorchScript-based
    exporter). The eager network is held outside the module tree, so that scripting does not reach it;
    ``load_state_dict`` takes the training state dict (``models/model.pt``) and traces again.
    """

    __jit_unused_properties__ = ["network"]

    def __init__(self, network: nn.Module, task_names: Sequence[str] | None = None, mode: str | None = "argmax",
                 example_shape: Sequence[int] = (1, 1, 32, 32)):
        super().__init__()
        self._eager = (ConcatTaskOutputs(network, task_names, mode).eval(),)  # a tuple: not a submodule
        self.example_shape = (1, *[int(s) for s in example_shape][1:])
        self.each = self._build()

    @property
    def network(self) -> nn.Module:
        return self._eager[0].network

    def _build(self) -> torch.jit.ScriptModule:
        eager = self._eager[0].eval()
        param = next(eager.parameters(), None)
        example = torch.zeros(self.example_shape, device=param.device if param is not None else "cpu")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation and int-conversion notes
            return torch.jit.script(_EachExample(torch.jit.trace(eager, example, check_trace=False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.each(x)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        keys = [str(k) for k in state_dict]
        if keys and all(k.startswith("each.") for k in keys):  # this module's own state dict
            prefix = "each.single.network."
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if str(k).startswith(prefix)}
        res = self._eager[0].load_state_dict(state_dict, strict=strict, assign=assign)
        self.each = self._build()
        return res


def export_onnx(network: ExportNetwork, path: str | os.PathLike, ckpt_path: str | os.PathLike | None = None,
                opset_version: int = 17) -> Path:
    """Write ``network`` (an :class:`ExportNetwork`, weights from ``ckpt_path`` when given) as ONNX with the batch
    and every spatial size dynamic: input ``image`` ``(B, C, *spatial)``, output ``pred``; atomically.

    The module is scripted and exported by the TorchScript-based exporter, which keeps the loop over the batch
    (an ONNX ``Loop``). MONAI's ``onnx_export`` hands the module to ``torch.export`` on PyTorch >= 2.9, which
    specialises the batch size at the SFG layers' split of their stacked streams. Needs the ``onnx`` extra.
    """
    from mtl_med.io import atomic_write

    if ckpt_path:
        load_checkpoint(network, ckpt_path)
    scripted = torch.jit.script(network.eval())
    example = torch.zeros(network.example_shape, device=next(network.network.parameters()).device)
    axes = {0: "batch", **{d: f"size{d - 1}" for d in range(2, example.ndim)}}
    with atomic_write(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation note
        torch.onnx.export(scripted, (example,), str(tmp), dynamo=False, input_names=["image"], output_names=["pred"],
                          dynamic_axes={"image": axes, "pred": axes}, opset_version=int(opset_version))
    logger.info("ONNX network written to %s", path)
    return Path(path)

