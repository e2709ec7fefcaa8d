"""Loading a training checkpoint onto a network, with errors that name the file."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtl_med.errors import InputError

__all__ = ["load_checkpoint"]


def load_checkpoint(network: nn.Module, path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """Load a state dict saved by training (``CheckpointSaver(save_dict={"model": net})`` writes the bare state
    dict; ``{"model": ...}`` / ``{"state_dict": ...}`` and a ``module.`` prefix from DDP are accepted too) onto
    ``network``, mapping tensors to ``map_location`` (a CUDA checkpoint loads on a CPU-only machine).

    Raises:
        InputError: naming the checkpoint when it is missing, unreadable or does not match the network.
    """
    from mtl_med.io import verify_shipped

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint file does not exist; train one with the bundle's configs/train.json, or "
                               "use the demonstration weights: add configs/demo.json (mtl-med --config "
                               "<bundle>/configs/demo.json; python -m monai.bundle run --config_file "
                               "\"['configs/inference.json','configs/demo.json']\")")
    verify_shipped(path)
    try:
        ckpt = torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message suggests weights_only=False, i.e. running arbitrary code from the file: never here
        what = ("holds Python objects other than tensors; save the state dict (torch.save(model.state_dict()))"
                if zipfile.is_zipfile(path) else "is not a PyTorch checkpoint (corrupt, or not written by torch.save)")
        raise InputError(path, f"cannot load checkpoint: the file {what}") from err
    except Exception as err:
        raise InputError(path, f"cannot load checkpoint: the file is not a readable PyTorch checkpoint "
                               f"({type(err).__name__})") from err
    if isinstance(ckpt, Mapping):
        for key in ("model", "state_dict", "network"):
            if key in ckpt and isinstance(ckpt[key], Mapping):
                ckpt = ckpt[key]
                break
    # modules may add non-tensor ``_extra_state`` (e.g. AdaShare's policy mode)
    if not isinstance(ckpt, Mapping) or not all(isinstance(v, torch.Tensor) or str(k).endswith("_extra_state") for k, v in ckpt.items()):
        raise InputError(path, "not a state dict of tensors")
    if ckpt and all(str(k).startswith("module.") for k in ckpt):
        ckpt = {str(k)[len("module."):]: v for k, v in ckpt.items()}
    try:
        network.load_state_dict(ckpt, strict=True)
    except RuntimeError as err:
        desc = type(network).__name__
        for attr in ("sharing", "spatial_dims"):
            if hasattr(network, attr):
                desc += f" {attr}={getattr(network, attr)}"
        msg = str(err).replace("\n\t", " ").replace("\n", " ")
        if len(msg) > 600:
            msg = msg[:600] + " ..."
        raise InputError(path, f"checkpoint does not match the network ({desc}): {msg}") from err
    return network

