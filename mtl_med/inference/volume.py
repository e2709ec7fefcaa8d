"""Whole-volume posterior inference of a 2D (slice-wise) or 3D multi-task network (SFG paper, section 5.2).

Per case: preprocessing once (N4 -> histogram standardisation with the training landmarks -> resampling,
:func:`mtl_med.transforms.preprocess_transforms`), then MONAI's ``SliceInferer`` (2D network) or
``SlidingWindowInferer`` (3D network) over the whole volume with
:class:`~mtl_med.inference.posterior.PosteriorSampler` (the sampler of :func:`sample_posterior` too) as its
network: for each batch of slices it runs all S posterior samples itself, ``k`` copies of the batch per forward
call with one group assignment per copy (``per_example``), aggregated on the fly, and returns per-slice statistic
maps (``sct_mean``, ``sct_std``, ``seg_votes``) that the inferer stitches into 3D. Memory holds those maps, never S
volumes. The maps are converted to HU / labels / uncertainty and resampled back to the input grid (MONAI
``Invertd``, labels nearest), then written atomically as ``output_dir/<case>/<case>_<postfix>.nii.gz``.

An input may be a DICOM MR series folder (:mod:`mtl_med.data.dicom`: read by MONAI's ITK reader, its slice geometry
carried by the affine into the same orientation handling); ``dicom_outputs`` then adds the synthetic CT as a CT
series and the organs as DICOM SEG and / or RTSTRUCT on the series' own grid, beside the NIfTI files.

Every voxel sees S independent posterior draws; neighbouring slices of one draw do not share an assignment
(each slice-copy has its own), which leaves the per-voxel statistics (mean, variance, votes) unchanged.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import pickle
import shutil
import socket
import time
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from torch import nn
from tqdm.auto import tqdm

from mtl_med.data.nifti import DICOM_ROLES, check_datalist
from mtl_med.errors import CaseFailures, InputError, as_bool
from mtl_med.inference.cases import case_identity, case_output_paths, check_case_name, check_unique_cases
from mtl_med.inference.posterior import AUTO_LABEL_TOL, AUTO_MAX_SAMPLES, AUTO_MIN_SAMPLES, AUTO_REGRESSION_TOL, PosteriorSampler
from mtl_med.pelvis import CT_RANGE_HU, CT_SCALE, IMAGE_KEYS, NUM_LABELS, SCT_TASK, SEG_TASK
from mtl_med.inference.provenance import RUN_RECORD
from mtl_med.transforms.intensity import network_to_hu
from mtl_med.transforms.io import as_metatensor, unwrap_input_error
from mtl_med.transforms.spatial import invert_to_input

__all__ = [
    "ConcatTaskOutputs",
    "ExportNetwork",
    "export_onnx",
    "load_checkpoint",
    "VolumePredictor",
    "list_cases",
    "case_names",
    "evaluate_cases",
    "read_case_csv",
    "check_output_dir",
]

logger = logging.getLogger("mtl_med.inference")

OUTPUT_POSTFIXES = {"sct": "sct", "seg": "seg", "sct_std": "sct_std", "seg_uncertainty": "seg_uncertainty"}
# dicom_outputs choice -> (output key, name after "<case>_"): a CT series folder, a SEG file, an RTSTRUCT file
DICOM_OUTPUTS = {"ct": ("dicom_ct", "sct_dicom"), "seg": ("dicom_seg", "seg.dcm"),
                 "rtstruct": ("dicom_rtstruct", "rtstruct.dcm")}


# ----------------------------------------------------------------------------------------------- networks
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


# ----------------------------------------------------------------------------------------------- cases
def case_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Case names of inputs (:func:`~mtl_med.inference.cases.case_identity`), each checked, and refused when two
    are one (:func:`~mtl_med.inference.cases.check_unique_cases`)."""
    names = [check_case_name(case_identity(p), p) for p in paths]
    check_unique_cases({"name": n, "mr": str(p)} for n, p in zip(names, paths))
    return names


def list_cases(
    input_dir: str | os.PathLike | None = None,
    datalist: str | os.PathLike | Mapping | None = None,
    section: str = "test",
    pattern: str = "*.nii*",
) -> list[dict]:
    """Items ``{"name", "mr", ["ct", "label", "bone"]}`` from a datalist section (takes precedence) or from
    the files matching ``pattern`` in ``input_dir`` and its DICOM series folders (exactly ``input_dir`` when it
    is a file or holds DICOM files; relative paths resolve against the current directory). Case names are the
    datalist's ``name`` values or the inputs' identities (:mod:`mtl_med.inference.cases`), checked and unique.

    Raises:
        InputError: a missing input, no inputs, a name that cannot be a folder, two inputs of one name.
    """
    from mtl_med.data.dicom import is_series_folder, series_folders

    if datalist:
        if isinstance(datalist, (str, os.PathLike)):  # relative to the current directory
            datalist = Path(datalist).expanduser().resolve()
        items = check_datalist(datalist, sections=(section,))[section]
    elif input_dir:
        root = Path(input_dir).expanduser().resolve()
        if not root.exists():
            raise InputError(root, "input file or folder does not exist")
        if root.is_file() or is_series_folder(root):  # exactly this input
            files = [str(root)]
        else:
            # the folder's own name is no pattern: brackets in it must not glob
            files = sorted(str(root / p) for p in glob.glob(pattern, root_dir=root, recursive=True) if (root / p).is_file())
            files += [str(p) for p in series_folders(root)]
        if not files:
            raise InputError(root, f"no files matching {pattern!r} and no DICOM series folders")
        items = [{"mr": f} for f in files]
    else:
        raise ValueError("give input_dir or datalist")
    items = [dict(x) for x in items]
    for item in items:
        source = datalist if datalist and "name" in item else item["mr"]
        name = item["name"] if "name" in item else case_identity(item["mr"])
        item["name"] = check_case_name(name, source if isinstance(source, (str, os.PathLike)) else "<datalist dict>")
    check_unique_cases(items)
    return items


def check_dicom_outputs(value: Any) -> tuple[str, ...]:
    """The ``dicom_outputs`` config value as a tuple of known choices; the writers' packages must import.

    Raises:
        ConfigError: naming ``dicom_outputs``, for an unknown choice or a missing ``dicom`` extra.
    """
    from mtl_med.errors import ConfigError

    vals = (value,) if isinstance(value, str) else tuple(value or ())
    bad = [v for v in vals if v not in DICOM_OUTPUTS]
    if bad:
        raise ConfigError("dicom_outputs", f"unknown DICOM outputs {bad}; choose from {list(DICOM_OUTPUTS)}")
    needs = {"seg": "highdicom", "rtstruct": "contourpy"}
    for v in vals:
        if v in needs:
            try:
                __import__(needs[v])
            except ImportError as err:
                raise ConfigError("dicom_outputs", f'"{v}" needs {needs[v]}, which is not installed: '
                                                   "pip install 'mtl_med[dicom]'") from err
    return tuple(dict.fromkeys(vals))


# ----------------------------------------------------------------------------------------------- predictor
class VolumePredictor:
    """Posterior inference on whole MR volumes, from a bundle config (``configs/inference.json``).

    Args:
        network: the multi-task network (``network_def`` on ``device``).
        preprocessing: a MONAI ``Compose`` for datalist items, or a ``functools.partial`` building one (the
            config's ``_mode_: callable``, so a missing landmarks file is reported when the run starts).
        inferer: MONAI ``SliceInferer`` (2D network) or ``SlidingWindowInferer`` (3D network).
        ckpt_path: state dict to load (None: keep the network's weights, e.g. in tests).
        device: compute device; the checkpoint is mapped onto it.
        num_samples: S posterior samples (section 5.2: 50), or ``"auto"``: at most ``max_samples``,
            stopping once the remaining passes would change the mean sCT and the organ labels less than
            ``regression_tol`` / ``label_tol`` (see :class:`~mtl_med.inference.posterior.PosteriorSampler`;
            the passes made are logged and put in the metrics as ``passes``); in argmax mode one pass
            is made and :attr:`num_samples` (logs, metrics summary) is 1.
        max_batch: images per forward call (slices x sample copies).
        margin: replicate padding around each slice (or patch) before the network, see
            :class:`~mtl_med.inference.posterior.PosteriorSampler`.
        inference_mode: ``"sample"`` (posterior), ``"argmax"`` (deterministic single pass) or ``"relaxed"``.
        seed: seed of the group draws; the generator is re-seeded for every case, so a case's outputs do not
            depend on the other cases.
        amp: mixed precision (used on CUDA only).
        engine: ``"auto"`` (the exact compacted SFG pass where the network allows it, else dense),
            ``"compact"`` or ``"dense"`` (docs/performance.md).
        dtype: compute dtype: ``"auto"`` (bfloat16 autocast on CPUs that compute it natively, float16
            with ``amp`` on CUDA, else float32), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        max_samples, min_samples, regression_tol, label_tol: the ``num_samples="auto"`` rule.
        sct_key, seg_key, num_classes: names of the regression and label outputs.
        uncertainty: ``"disagreement"`` (1 - votes(mode) / S) or ``"entropy"`` (of the vote frequencies, nats).
        output_dir: where ``<case>/<case>_<postfix>.nii.gz`` go; postfixes: output -> file postfix.
        save_png: also write ``<case>/<case>_overview.png``.
        ct_clip: HU range of the synthetic CT (A.3: [-1024, 2500]).
        bone_threshold_hu: bone region of the metrics when the item has no "bone" mask.
        metrics_keys: item keys compared when present ("ct", "label", "bone").
        progress: show tqdm bars (on a terminal only: a log file gets no bar lines).
        dicom_outputs: for a DICOM MR series input, also write any of ``"ct"`` (the synthetic CT as a CT series
            folder ``<case>_sct_dicom``), ``"seg"`` (DICOM SEG ``<case>_seg.dcm``) and ``"rtstruct"``
            (``<case>_rtstruct.dcm``), see :mod:`mtl_med.data.dicom`; needs the ``dicom`` extra.

    ``sampler`` (a :class:`~mtl_med.inference.posterior.PosteriorSampler` built here) holds the sampling settings:
    ``num_samples``, ``max_batch``, ``margin``, ``inference_mode`` and ``amp`` read them from it.
    """

    def __init__(
        self,
        network: nn.Module,
        preprocessing: Any,
        inferer: Inferer,
        ckpt_path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        num_samples: int | str = 50,
        max_batch: int = 64,
        margin: int = 0,
        inference_mode: str = "sample",
        seed: int = 0,
        amp: bool = False,
        engine: str = "auto",
        dtype: str = "auto",
        max_samples: int = AUTO_MAX_SAMPLES,
        min_samples: int = AUTO_MIN_SAMPLES,
        regression_tol: float = AUTO_REGRESSION_TOL,
        label_tol: float = AUTO_LABEL_TOL,
        sct_key: str = SCT_TASK,
        seg_key: str = SEG_TASK,
        num_classes: int = NUM_LABELS,
        uncertainty: str = "disagreement",
        output_dir: str | os.PathLike = "./output",
        postfixes: Mapping[str, str] | None = None,
        save_png: bool = True,
        ct_clip: Sequence[float] = CT_RANGE_HU,
        bone_threshold_hu: float = 250.0,
        progress: bool = True,
        dicom_outputs: Sequence[str] = (),
    ):
        if uncertainty not in ("disagreement", "entropy"):
            raise ValueError(f"uncertainty must be 'disagreement' or 'entropy', got {uncertainty!r}")
        self.device = torch.device(device)
        self.network = network.to(self.device)
        self._preprocessing = preprocessing
        self.inferer = inferer
        self.ckpt_path = ckpt_path
        self.seed = int(seed)
        self.sct_key, self.seg_key, self.num_classes = sct_key, seg_key, int(num_classes)
        self.sampler = PosteriorSampler(
            self.network,
            num_samples=num_samples if num_samples == "auto" else int(num_samples),
            max_batch=int(max_batch),
            mode=inference_mode,
            regression=(self.sct_key,),
            labels={self.seg_key: self.num_classes},
            amp=as_bool(amp, "amp") and self.device.type == "cuda",
            margin=int(margin),
            engine=engine,
            dtype=dtype,
            max_samples=int(max_samples),
            min_samples=int(min_samples),
            regression_tol=float(regression_tol),
            label_tol=float(label_tol),
        )
        self.uncertainty = uncertainty
        self.output_dir = output_dir
        self.postfixes = {**OUTPUT_POSTFIXES, **dict(postfixes or {})}
        self.save_png = as_bool(save_png, "save_png")
        self.ct_clip = tuple(float(v) for v in ct_clip)
        self.bone_threshold_hu = float(bone_threshold_hu)
        self.progress = as_bool(progress, "progress")
        self.dicom_outputs = check_dicom_outputs(dicom_outputs)
        self._loaded = False
        self._pre = None

    # ---- sampling settings (the sampler's)
    @property
    def num_samples(self) -> int:
        """Posterior passes made per slice: the configured S, or 1 in argmax mode."""
        return self.sampler.num_samples

    @property
    def inference_mode(self) -> str:
        return self.sampler.mode

    @property
    def max_batch(self) -> int:
        return self.sampler.max_batch

    @property
    def margin(self) -> int:
        return self.sampler.margin

    @property
    def amp(self) -> bool:
        return self.sampler.amp

    # ---- setup
    @property
    def preprocessing(self):
        if self._pre is None:
            p = self._preprocessing
            self._pre = p() if isinstance(p, functools.partial) else p
        return self._pre

    def setup(self) -> None:
        """Load the checkpoint and build the preprocessing (reads the landmarks file); errors name the file."""
        if not self._loaded:
            if self.ckpt_path is not None:
                logger.info("loading checkpoint %s (map_location=%s)", self.ckpt_path, self.device)
                load_checkpoint(self.network, self.ckpt_path, map_location=self.device)
            self._loaded = True
        _ = self.preprocessing

    def generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed)

    # ---- one case, in memory
    def read_dicom_inputs(self, item: Mapping[str, Any]) -> dict:
        """The item with its DICOM series folders ("mr", "ct") read into MetaTensors (:func:`mtl_med.data.dicom.load_series`)
        and the MR series' headers under ``"dicom_mr"`` (what the DICOM writers reference). An item that asks
        for ``dicom_outputs`` without an MR series is refused here, before any work."""
        from mtl_med.data.dicom import is_series_folder, load_series, read_headers

        it = dict(item)
        for key, modality in DICOM_ROLES.items():
            v = it.get(key)
            if isinstance(v, (str, os.PathLike)) and Path(v).is_dir():
                if not is_series_folder(v):
                    raise InputError(v, f"{key} folder holds no DICOM files")
                hdr = read_headers(v, role=key, modality=modality)
                it[key] = load_series(v, role=key, headers=hdr)
                if key == "mr":
                    it["dicom_mr"] = hdr
        if self.dicom_outputs and "dicom_mr" not in it:
            name = item.get("mr") if isinstance(item.get("mr"), (str, os.PathLike)) else "<in-memory MR>"
            raise InputError(name, f"dicom_outputs {list(self.dicom_outputs)} need a DICOM MR series folder as "
                                   "input (its patient, study and frame of reference); this input is not one")
        return it

    def preprocess(self, item: Mapping[str, Any]) -> dict:
        data = self.preprocessing(dict(item))
        if isinstance(data, list):  # a Compose of random crops would return a list
            raise ValueError("the inference preprocessing must return one item per case")
        return data

    @torch.no_grad()
    def sample(self, data: Mapping[str, Any], progress: Any = None) -> dict[str, torch.Tensor]:
        """Posterior statistic maps on the preprocessed grid: ``sct`` (mean, HU), ``sct_std`` (HU), ``seg``
        (mode), ``seg_disagreement``, ``seg_entropy``, ``seg_votes`` (frequencies), each ``(C, *spatial)``."""
        self.setup()
        mr = data["mr"]
        vol = (mr.as_tensor() if isinstance(mr, MetaTensor) else torch.as_tensor(mr)).float()[None].to(self.device)
        if progress is not None:
            axis = getattr(self.inferer, "spatial_dim", None)
            progress.reset(total=vol.shape[2 + axis] * self.num_samples if axis is not None else None)
        maps = self.sampler.run(self.inferer, vol, generator=self.generator(), progress=progress)
        mean = maps[f"{self.sct_key}_mean"][0].float()
        std = maps[f"{self.sct_key}_std"][0].float()
        freq = maps[f"{self.seg_key}_votes"][0].float()
        freq = freq / freq.sum(0, keepdim=True).clamp_min(1e-12)  # blending (overlapping windows) keeps it a distribution
        return {
            "sct": network_to_hu(mean, self.ct_clip, CT_SCALE),
            "sct_std": std * CT_SCALE,  # d(HU) = 1024 * d(network scale), A.3
            "seg": freq.argmax(0, keepdim=True),
            "seg_disagreement": 1.0 - freq.amax(0, keepdim=True),
            "seg_entropy": torch.special.entr(freq).sum(0, keepdim=True),
            "seg_votes": freq,
        }

    def to_input_grid(self, data: Mapping[str, Any], maps: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Resample the output maps back to the input MR grid (``Invertd``; labels nearest) -> numpy (spatial)."""
        mr = data["mr"]
        unc = maps[f"seg_{self.uncertainty}"]
        outputs = {"sct": maps["sct"], "sct_std": maps["sct_std"], "seg": maps["seg"].float(), "seg_uncertainty": unc}
        if not isinstance(mr, MetaTensor) or not mr.applied_operations:
            return {k: v[0].cpu().numpy() for k, v in outputs.items()}
        d = {"mr": mr}
        for k, v in outputs.items():
            d[k] = MetaTensor(v.detach().cpu(), meta=dict(mr.meta), applied_operations=list(mr.applied_operations))
        keys = list(outputs)
        inv = invert_to_input(keys, self.preprocessing, orig_key="mr", nearest_interp=[k == "seg" for k in keys])
        d = inv(d)
        res = {k: np.asarray(d[k].detach().cpu() if isinstance(d[k], torch.Tensor) else d[k])[0] for k in keys}
        res["sct"] = np.clip(res["sct"], *self.ct_clip)
        res["sct_std"] = np.maximum(res["sct_std"], 0.0)
        res["seg_uncertainty"] = np.maximum(res["seg_uncertainty"], 0.0)
        return res

    def metrics(self, data: Mapping[str, Any], maps: Mapping[str, torch.Tensor], item: Mapping[str, Any]) -> dict:
        """Table 2 metrics on the preprocessed (common, A.3: 1.46 mm) grid when the item has CT and/or labels."""
        from mtl_med.metrics.medical import pelvis_metrics

        def arr(key):
            v = data.get(key) if key in item else None
            return None if v is None else torch.as_tensor(np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v))[0]

        ct, label, bone = arr("ct"), arr("label"), arr("bone")
        if ct is None and label is None:
            return {}
        ct_hu = network_to_hu(ct.float(), self.ct_clip, CT_SCALE) if ct is not None else None
        m = pelvis_metrics(
            maps["sct"][0] if ct is not None else None, ct_hu,
            maps["seg"][0] if label is not None else None, label.round().long() if label is not None else None,
            (bone > 0.5) if bone is not None else None, bone_threshold_hu=self.bone_threshold_hu,
        )
        if data.get("resampled_to_mr"):  # truth_geometry "resample": say so beside the numbers
            m["resampled_to_mr"] = "+".join(data["resampled_to_mr"])
        return m

    def check_posterior(self, name: Any, maps: Mapping[str, torch.Tensor]) -> float:
        """Warn when draws lie far outside the CT range: the posterior sCT standard deviation above the range's
        width cannot come from draws inside it. A network with a confident grouping (p near 1) still makes its
        rare draws at test time, never trained on, and one such output among S moves the mean by its excess / S
        (docs/reproduction.md, SFG). Returns the fraction of voxels concerned."""
        lo, hi = self.ct_clip
        far = float((maps["sct_std"] > hi - lo).float().mean())
        if far > 0:
            logger.warning("%s: the synthetic CT's posterior standard deviation exceeds the CT range's width (%.0f HU) in "
                           "%.3g%% of the voxels: some posterior draws lie far outside the CT range and pull the mean there "
                           "(inference_mode 'argmax' gives this network's modal answer)", name, hi - lo, 100 * far)
        return far

    def predict_item(self, item: Mapping[str, Any], progress: Any = None,
                     data: Mapping[str, Any] | None = None) -> tuple[dict, dict, dict, dict]:
        """(input-grid outputs as numpy, common-grid maps, metrics, preprocessed data) of one datalist item
        (``data``: its preprocessing done already, e.g. in a DataLoader worker)."""
        t0 = time.perf_counter()
        pre = "done before"
        data_given = data is not None
        if data is None:
            logger.info("%s: preprocessing (orientation, N4, histogram standardisation, resampling)", item.get("name"))
            data = self.preprocess(item)
            pre = f"{time.perf_counter() - t0:.1f} s"
        t1 = time.perf_counter()
        adaptive = self.sampler.adaptive and self.inference_mode == "sample"
        logger.info("%s: %s posterior samples of every axial slice", item.get("name"),
                    f"up to {self.num_samples}" if adaptive else self.num_samples)
        self.sampler.reset_passes()
        maps = self.sample(data, progress)
        self.check_posterior(item.get("name", item["mr"]), maps)
        t2 = time.perf_counter()
        out = self.to_input_grid(data, maps)
        metrics = self.metrics(data, maps, item)
        passes: dict[str, Any] = {"num_samples": self.num_samples, "adaptive": adaptive}
        if adaptive:
            used = self.sampler.passes_used()
            metrics = {**metrics, "passes": used["mean"]}
            passes["per_slice_batch"] = used
            logger.info("%s: %.1f passes per slice batch on average (%d-%d)", item.get("name"), used["mean"], used["min"], used["max"])
        t3 = time.perf_counter()
        logger.info("%s: preprocessing %s, %s-sample inference %.1f s, resampling back %.1f s",
                    item.get("name", item["mr"]), pre, "adaptive" if adaptive else self.num_samples, t2 - t1, t3 - t2)
        # for the case's run record (write): seconds per step, the passes made
        self._case_info = {"case": item.get("name"), "passes": passes, "timings": {
            "preprocess": None if data_given else t1 - t0, "inference": t2 - t1, "resampling": t3 - t2}}
        return out, maps, metrics, data

    # ---- writing
    def output_paths(self, case: str, output_dir: str | os.PathLike | None = None) -> dict[str, Path]:
        """``output_dir/<case>/<case>_<postfix>.nii.gz`` (MONAI ``SaveImage``'s separate-folder layout, the case
        name kept whole: ``FolderLayout`` would cut it at its first dot), the overview and the DICOM outputs,
        each checked to lie in the case folder inside ``output_dir``."""
        names = {key: f"{post}.nii.gz" for key, post in self.postfixes.items()}
        if self.save_png:
            names["overview"] = "overview.png"
        names.update(DICOM_OUTPUTS[choice] for choice in self.dicom_outputs)
        names["run_record"] = RUN_RECORD  # written last, so a case folder with it is the complete set
        return case_output_paths(output_dir if output_dir is not None else self.output_dir, case, names)

    def write(self, case: str, item: Mapping[str, Any], out: Mapping[str, np.ndarray],
              output_dir: str | os.PathLike | None = None, metrics: Mapping[str, float] | None = None,
              reference: Any = None, source: Mapping[str, Any] | None = None,
              timings: Mapping[str, Any] | None = None) -> dict[str, Path]:
        """Write a case's outputs with the input MR's geometry (its NIfTI header when it is a file, else
        ``reference``: the input as a MetaTensor; DICOM outputs on the grid of the series ``item["dicom_mr"]``),
        whole or not at all: every file goes into a private temporary folder beside the case folder, which
        replaces the case folder only when all are written
        (:func:`publish_folder`). A killed run leaves only that temporary folder, which the next run removes.

        Every NIfTI's ``descrip`` names the package, model and weights (:mod:`mtl_med.inference.provenance`); the run
        record ``<case>_run.json``, written last into the same folder, holds the digests of the inputs
        (``source``: the item as given, before DICOM reading; default ``item``), the weights, the settings,
        the software, the machine and the seconds of each step (``timings``, added to those :meth:`predict_item`
        kept for this case)."""
        from mtl_med.inference import provenance

        t_write = time.perf_counter()
        ident = provenance.model_identity(self)
        descrip = ident.descrip()
        paths = self.output_paths(case, output_dir)
        case_dir = paths[next(iter(self.postfixes))].parent
        mr = item["mr"]
        if isinstance(mr, (str, os.PathLike)):
            ref = nib.load(str(mr))
            affine, header, shape = ref.affine, ref.header, tuple(ref.shape)
        else:
            ref_mt = reference if reference is not None else as_metatensor(mr)
            affine, header, shape = np.asarray(ref_mt.affine, float), None, tuple(ref_mt.shape[-3:])
        dtypes = {"sct": np.float32, "sct_std": np.float32, "seg": np.uint8, "seg_uncertainty": np.float32}
        tmp = private_temp(case_dir)
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # a dead run's, when a restarted host reuses our pid
            tmp.mkdir(parents=True)
            for key, path in paths.items():
                if key not in self.postfixes:
                    continue
                arr = out[key]
                if tuple(arr.shape) != shape:
                    raise RuntimeError(f"{key} has shape {arr.shape}, input has {shape}")
                arr = np.rint(arr).astype(dtypes[key]) if key == "seg" else arr.astype(dtypes[key])
                img = nib.Nifti1Image(arr, affine, header=header)
                img.set_data_dtype(dtypes[key])
                img.header.set_slope_inter(1.0, 0.0)
                img.header["descrip"] = descrip
                nib.save(img, str(tmp / path.name))
            if "overview" in paths:
                from mtl_med.inference.overview import save_overview

                mr_arr = np.asarray(ref.dataobj, dtype=np.float32) if header is not None else np.asarray(ref_mt[0])
                truth = _truth_on_input_grid(item) if header is not None and ("ct" in item or "label" in item) else {}
                save_overview(tmp / paths["overview"].name, mr_arr, out["sct"], out["seg"], out["seg_uncertainty"],
                              affine=affine, sct_std=out["sct_std"], ct=truth.get("ct"), label=truth.get("label"),
                              title=case, metrics=metrics, uncertainty_name=self.uncertainty)
            if self.dicom_outputs:
                self._write_dicom(item, out, {k: tmp / p.name for k, p in paths.items()}, identity=ident)
            info = getattr(self, "_case_info", None) or {}
            info = info if info.get("case") == case else {}
            steps = {**info.get("timings", {}), **dict(timings or {}), "writing": time.perf_counter() - t_write}
            record = provenance.run_record(self, case, source if source is not None else item,
                                           [p.name for p in paths.values()], timings=steps,
                                           passes=info.get("passes"), metrics=metrics, identity=ident)
            provenance.write_run_record(record, tmp / paths["run_record"].name)
            # DICOM outputs of an earlier run with other settings are ours too: never carried over stale
            ours = [p.name for p in paths.values()] + [f"{case}_{name}" for _, name in DICOM_OUTPUTS.values()]
            publish_folder(tmp, case_dir, ours)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return paths

    def _write_dicom(self, item: Mapping[str, Any], out: Mapping[str, np.ndarray], paths: Mapping[str, Path],
                     identity: Any = None) -> None:
        """The DICOM outputs, each naming the package, model and weights' MD5 (``identity``, a
        :class:`~mtl_med.inference.provenance.ModelIdentity`) as its contributing equipment."""
        from mtl_med.inference import dicom_outputs
        from mtl_med.inference.provenance import model_identity

        ident = identity if identity is not None else model_identity(self)

        src = item.get("dicom_mr")
        if src is None:
            raise InputError(item.get("mr", "<MR>"), "DICOM outputs need a DICOM MR series as input")
        seg = np.rint(out["seg"]).astype(np.uint8)
        if "dicom_ct" in paths:
            dicom_outputs.write_ct_series(out["sct"], src, paths["dicom_ct"], provenance=ident)
        if "dicom_seg" in paths:
            dicom_outputs.write_seg(seg, src, paths["dicom_seg"], provenance=ident)
        if "dicom_rtstruct" in paths:
            dicom_outputs.write_rtstruct(seg, src, paths["dicom_rtstruct"], provenance=ident)

    # ---- runs
    def predict_case(self, mr: Any, affine: Any = None, output_dir: str | os.PathLike | None = None,
                     case: str | None = None, **item: Any) -> dict[str, Any]:
        """Pipeline entry point. ``mr``: a NIfTI path, a DICOM MR series folder, a numpy array or tensor (with
        ``affine``, RAS+ mm; identity when None), a nibabel image, a MONAI MetaTensor (its affine) or a SimpleITK image; in-memory
        inputs stay in memory. Extra item keys (``ct=..., label=...``, same kinds) add metrics. Returns the
        outputs (``sct``, ``seg``, ``sct_std``, ``seg_uncertainty``) on the input's own grid and array layout
        (a SimpleITK image's is (z, y, x): ``sitk.GetImageFromArray(out["seg"])`` + ``CopyInformation``; a DICOM
        series' is (column, row, slice), slices ascending along the normal as ITK reads them),
        ``metrics``, and with ``output_dir`` the written ``paths``."""
        sitk_layout = type(mr).__module__.startswith("SimpleITK")
        if output_dir is not None:
            check_output_dir(output_dir)
        self.setup()
        if isinstance(mr, (str, os.PathLike)):
            mr_in: Any = str(Path(mr).expanduser().resolve())
            name = case or case_names([mr_in])[0]
        else:
            mr_in = as_metatensor(mr, affine, name="<in-memory MR>")
            name = case or "case"
        it = {"name": name, "mr": mr_in,
              **{k: (str(v) if isinstance(v, (str, os.PathLike)) else as_metatensor(v, name=f"<in-memory {k}>"))
                 for k, v in item.items()}}
        given = it
        t_read = time.perf_counter()
        it = self.read_dicom_inputs(it)
        t_read = time.perf_counter() - t_read
        with tqdm(total=None, desc=f"{name} slice passes", unit="img", leave=False, disable=None if self.progress else True) as bar:
            out, _, metrics, _ = self.predict_item(it, progress=bar)
        result: dict[str, Any] = dict(out)
        result["seg"] = np.rint(out["seg"]).astype(np.uint8)
        if output_dir is not None:
            ref = None if isinstance(it["mr"], str) else it["mr"]
            written = self.write(name, it, out, output_dir, metrics, ref, source=given, timings={"read_dicom": t_read})
            result["paths"] = {k: str(v) for k, v in written.items()}
        if sitk_layout:
            result = {k: np.ascontiguousarray(np.transpose(v, (2, 1, 0))) if isinstance(v, np.ndarray) else v
                      for k, v in result.items()}
        result["metrics"] = metrics
        return result

    def complete(self, case: str, output_dir: str | os.PathLike | None = None) -> bool:
        """Whether ``case`` has its complete output set in ``output_dir`` (every file this configuration writes;
        a case folder appears only whole, :meth:`write`)."""
        return all(p.exists() for p in self.output_paths(case, output_dir).values())

    def _prepared(self, items: Sequence[Mapping[str, Any]], num_workers: int):
        """``(item, loaded item, preprocessed data or None, error or None)`` per case, in order. With
        ``num_workers > 0`` DICOM reading and preprocessing (N4: seconds per case) run in DataLoader worker
        processes while this process runs the network; at most ``2 * num_workers`` cases wait in memory."""
        if num_workers <= 0:
            for item in items:
                yield (item, *_load_and_preprocess(self, item, portable=False))
            return
        loader = torch.utils.data.DataLoader(_PreprocessedCases(self, items), batch_size=None, shuffle=False,
                                             num_workers=int(num_workers), collate_fn=_identity, prefetch_factor=2,
                                             persistent_workers=False)
        for item, res in zip(items, loader):
            yield (item, *res)

    def run(self, input_dir: str | os.PathLike | None = None, datalist: Any = None, section: str = "test",
            pattern: str = "*.nii*", output_dir: str | os.PathLike | None = None, save_outputs: bool = True,
            raise_on_failure: bool = True, skip_existing: bool = False, num_workers: int = 0,
            summary_path: str | os.PathLike | None = None, done_cases: Sequence[str] | None = None,
            on_case: Any = None) -> dict[str, Any]:
        """Every case of ``datalist[section]`` or ``input_dir``: predict, write, report. Failed cases are logged
        with their message and skipped; at the end :class:`CaseFailures` is raised if any failed (non-zero exit
        of ``python -m monai.bundle run``).

        Under ``torch.distributed`` (torchrun, ``multi_gpu_inference.json``) the cases are dealt to the ranks in
        turn (``cases[rank::world_size]``: each case runs exactly once) and every rank's results and failures
        are gathered: each rank returns the whole run's result and only rank 0 writes ``summary_path`` and
        raises :class:`CaseFailures`.

        Args:
            skip_existing: skip (and report) a case whose complete output set is in ``output_dir`` already, or
                that is in ``done_cases`` (evaluation: a row in its CSV); resumes an interrupted cohort.
            num_workers: DataLoader worker processes for reading and preprocessing (0: in this process).
            summary_path: a JSON of done, skipped and failed cases (and which rank ran each), written atomically.
            on_case: called as ``on_case(case, {"paths", "metrics"})`` after each finished case (the evaluation
                writes its CSV as it goes).

        Returns ``{"cases": {name: {"paths", "metrics"}}, "failed": {name: message}, "skipped": [names],
        "ranks": {rank: [names it ran]}}``.
        """
        from mtl_med.errors import ConfigError

        items = list_cases(input_dir, datalist, section, pattern)
        out_root = Path(output_dir if output_dir is not None else self.output_dir).expanduser().resolve()
        skip_existing, num_workers = as_bool(skip_existing, "skip_existing"), int(num_workers)
        if num_workers < 0:
            raise ConfigError("num_workers", f"must be 0 or more, got {num_workers}")
        rank, world = _dist_rank_world()
        if save_outputs:
            check_output_dir(out_root)  # before the checkpoint is read or anything runs
        mine = items[rank::world]
        skipped: list[str] = []
        if skip_existing:  # this rank's share only: other ranks may be writing theirs already
            def finished(name: str) -> bool:
                if done_cases is not None and name not in done_cases:
                    return False
                return self.complete(name, out_root) if save_outputs else done_cases is not None

            skipped = [x["name"] for x in mine if finished(x["name"])]
            mine = [x for x in mine if x["name"] not in skipped]
        where = f" (rank {rank} of {world}: {len(mine)} case(s))" if world > 1 else ""
        logger.info("%d case(s) from %s%s; %d posterior samples (%s mode) on %s; outputs in %s", len(items),
                    datalist or input_dir, where, self.num_samples, self.inference_mode, self.device, out_root)
        for case in skipped:
            logger.info("case %s skipped: its outputs exist (skip_existing)", case)
        self.setup()
        done: dict[str, Any] = {}
        failed: dict[str, str] = {}
        bar = tqdm(total=len(mine), desc="cases", unit="case", disable=None if self.progress else True)
        t_wait = time.perf_counter()
        for item, loaded, data, error in self._prepared(mine, num_workers):
            # reading + preprocessing in this process, or (num_workers > 0) the wait for a worker's case
            waited = {"read_and_preprocess" if num_workers <= 0 else "waiting_for_workers": time.perf_counter() - t_wait}
            case = item["name"]
            bar.set_postfix_str(case)
            try:
                if error is not None:
                    raise error
                passes = tqdm(total=None, desc=f"{case} slice passes", unit="img", leave=False,
                              disable=None if self.progress else True)
                with passes:
                    out, maps, metrics, _ = self.predict_item(loaded, progress=passes, data=data)
                paths = self.write(case, loaded, out, out_root, metrics, source=item, timings=waited) if save_outputs else {}
                done[case] = {"paths": {k: str(v) for k, v in paths.items()}, "metrics": metrics}
                if on_case is not None:
                    on_case(case, done[case])
                if metrics:
                    logger.info("%s: %s", case, format_metrics(metrics))
                    tqdm.write(f"{case}: {format_metrics(metrics)}")
            except Exception as err:  # one bad case must not stop the others
                msg = str(err) if isinstance(err, InputError) else f"{type(err).__name__}: {err}"
                if not isinstance(err, InputError) and not str(item["mr"]) in msg:
                    msg = f"{item['mr']}: {msg}"
                failed[case] = msg
                logger.error("case %s failed: %s", case, msg)
                logger.debug("traceback of %s", case, exc_info=True)
            bar.update(1)
            t_wait = time.perf_counter()
        bar.close()
        logger.info("%d case(s) done, %d skipped, %d failed%s", len(done), len(skipped), len(failed),
                    f" on rank {rank}" if world > 1 else "")
        res = {"cases": done, "failed": failed, "skipped": skipped, "ranks": {rank: list(done) + list(failed)}}
        if world > 1:  # every rank's results, so that one summary and one failure report cover the run
            res = _gather_results(res, items)
        if summary_path and rank == 0:
            from mtl_med.io import atomic_write_json

            atomic_write_json({"num_cases": len(items), "world_size": world, "done": list(res["cases"]),
                               "skipped": res["skipped"], "failed": res["failed"],
                               "ranks": {str(r): v for r, v in res["ranks"].items()}}, summary_path)
        if res["failed"] and raise_on_failure and rank == 0:
            raise CaseFailures(res["failed"], len(items))
        return res


def _identity(x: Any) -> Any:
    return x


def _load_and_preprocess(predictor: "VolumePredictor", item: Mapping[str, Any],
                         portable: bool = True) -> tuple[Any, Any, Any]:
    """(loaded item, preprocessed data, None) or (item, None, the error): a worker hands its error back."""
    try:
        t0 = time.perf_counter()
        loaded = predictor.read_dicom_inputs(item)
        data = predictor.preprocess(loaded)
        logger.info("%s: read and preprocessed in %.1f s%s", item.get("name"), time.perf_counter() - t0,
                    " (DataLoader worker)" if portable else "")
        return loaded, data, None
    except Exception as err:
        if not portable:
            return dict(item), None, err
        user = unwrap_input_error(err)
        if user is None:  # keep it picklable and readable across the worker boundary
            user = RuntimeError(f"{type(err).__name__}: {err}")
        return dict(item), None, user


class _PreprocessedCases(torch.utils.data.Dataset):
    """Cases read and preprocessed in DataLoader workers (the predictor's preprocessing, forked with it)."""

    def __init__(self, predictor: "VolumePredictor", items: Sequence[Mapping[str, Any]]):
        self.predictor, self.items = predictor, list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, Any, Any]:
        return _load_and_preprocess(self.predictor, self.items[i])


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather_results(res: dict[str, Any], items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------------------------- output files
_TMP_TAG = ".mtl_med-"  # private folders: .<case>.mtl_med-<host>-<pid>.tmp (being written) / .old (replaced)


def private_temp(case_dir: Path, kind: str = "tmp") -> Path:
    """A folder beside ``case_dir`` that only this process writes, named so a later run can tell that its
    writer has died (same host, pid no longer running) and remove it."""
    return case_dir.parent / f".{case_dir.name}{_TMP_TAG}{socket.gethostname()}-{os.getpid()}.{kind}"


def publish_folder(tmp: Path, case_dir: Path, names: Sequence[str]) -> None:
    """Make the complete folder ``tmp`` the case folder in one rename. An existing case folder is moved aside
    first (rename) and removed after; other files the user kept in it are carried over first. ``tmp``, the
    case folder and the moved-aside copy are siblings in the output folder; nothing else is renamed or removed."""
    if tmp.parent != case_dir.parent or case_dir.name in ("", ".", "..") or not case_dir.parent.is_dir():
        raise InputError(case_dir, f"cannot publish {tmp.name}: not a case folder beside it in the output folder")
    old = None
    if case_dir.exists():
        for p in case_dir.iterdir():
            if p.name not in names and not (tmp / p.name).exists():
                os.link(p, tmp / p.name) if p.is_file() else shutil.copytree(p, tmp / p.name, symlinks=True)
        old = private_temp(case_dir, "old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(case_dir, old)
    try:
        os.rename(tmp, case_dir)
    except OSError:
        if old is not None:
            os.rename(old, case_dir)  # keep the earlier complete set
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_outputs(root: Path) -> list[Path]:
    """Remove the private folders that dead runs on this host left in ``root``; a case folder that was moved
    aside (``.old``) and never replaced is put back. Returns what was cleaned."""
    cleaned = []
    if not root.is_dir():
        return cleaned
    host = socket.gethostname()
    for p in root.glob(f".*{_TMP_TAG}*"):
        stem, _, kind = p.name.rpartition(".")
        case, _, owner = stem[1:].partition(_TMP_TAG)
        h, _, pid = owner.rpartition("-")
        if (kind not in ("tmp", "old") or h != host or not pid.isdigit() or _alive(int(pid))
                or case in ("", ".", "..")):
            continue
        final = root / case
        if kind == "old" and not final.exists() and p.is_dir():
            os.rename(p, final)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        cleaned.append(p)
        logger.info("removed %s, left by an interrupted run", p)
    return cleaned


def check_output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder and check it is writable, before any work; remove what dead runs left there.

    Raises:
        InputError: naming the output folder.
    """
    from mtl_med.io import refuse_shipped

    root = Path(path).expanduser().resolve()
    refuse_shipped(root, what="the outputs")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = private_temp(root / "write-check")
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        raise InputError(root, f"output folder cannot be created or written ({err.strerror or err})") from err
    clean_stale_outputs(root)
    return root


def format_metrics(m: Mapping[str, Any]) -> str:
    keys = [k for k in ("psnr_overall", "psnr_bones", "psnr_organs", "mae_overall", "dice_mean") if k in m]
    return ", ".join(f"{k} {m[k]:.2f}" if "dice" not in k else f"{k} {m[k]:.3f}" for k in keys)


def _truth_on_input_grid(item: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """True CT (HU) and labels on the MR's input grid, for the overview figure only."""
    from monai.transforms import LoadImaged, ResampleToMatchd

    keys = [k for k in ("ct", "label") if k in item]
    d = LoadImaged(["mr", *keys], ensure_channel_first=True, image_only=True)({"mr": item["mr"], **{k: item[k] for k in keys}})
    d = ResampleToMatchd(keys, key_dst="mr", mode=["bilinear" if k == "ct" else "nearest" for k in keys],
                         padding_mode="border")(d)
    return {k: np.asarray(d[k])[0] for k in keys}



def read_case_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a per-case metrics CSV (:func:`~mtl_med.metrics.medical.write_case_csv`), numbers as floats and
    empty cells left out; ``[]`` when the file does not exist."""
    import csv

    path = Path(path)
    if not path.is_file():
        return []

    def value(v: str) -> Any:
        try:
            return float(v)
        except ValueError:
            return v

    with open(path, newline="") as f:
        return [{k: (v if k == "case" else value(v)) for k, v in r.items() if v != "" and k is not None}
                for r in csv.DictReader(f)]


def evaluate_cases(
    predictor: VolumePredictor,
    datalist: Any,
    section: str = "test",
    output_dir: str | os.PathLike | None = None,
    metrics_dir: str | os.PathLike | None = None,
    save_outputs: bool = False,
    csv_name: str = "metrics.csv",
    summary_name: str = "metrics_summary.json",
    skip_existing: bool = False,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Table 2 evaluation over ``datalist[section]`` (items with "ct" and / or "label"; "bone" optional):
    per-case CSV and a summary JSON (mean and standard deviation over cases) in ``metrics_dir``. Metrics are
    computed on the preprocessed grid (A.3: MR, CT and labels resampled to 1.46 mm). Failed cases are reported,
    the others evaluated, then :class:`CaseFailures` is raised.

    The CSV is rewritten (atomically) after every case, so an interrupted run keeps its finished rows; with
    ``skip_existing`` the cases that have a row (and, with ``save_outputs``, their outputs) are not run again.
    The summary is computed from the CSV, earlier rows included. Under ``torch.distributed`` each rank writes
    ``<csv>.rank<r>.csv`` as it goes; rank 0 merges them into the CSV (in datalist order) and writes the summary.
    """
    from mtl_med.metrics.medical import write_case_csv, write_metrics_summary

    items = list_cases(datalist=datalist, section=section)
    missing = [x["name"] for x in items if "ct" not in x and "label" not in x]
    if missing:
        raise InputError(datalist, f'items without "ct" or "label" cannot be evaluated: {missing}')
    skip_existing = as_bool(skip_existing, "skip_existing")
    rank, world = _dist_rank_world()
    mdir = Path(metrics_dir if metrics_dir is not None else (output_dir or predictor.output_dir)).expanduser().resolve()
    check_output_dir(mdir)
    csv_path = mdir / csv_name
    parts = lambda: sorted(mdir.glob(f"{csv_path.stem}.rank*{csv_path.suffix}"))  # noqa: E731
    order = {x["name"]: i for i, x in enumerate(items)}
    earlier: dict[str, dict] = {}  # rows of an interrupted run (its CSV and any ranks' parts), kept on resume
    if skip_existing:
        for f in [csv_path, *parts()]:
            earlier.update({r["case"]: r for r in read_case_csv(f) if r.get("case") in order})
        if earlier:
            logger.info("%d case(s) have rows in %s already (skip_existing)", len(earlier), csv_path)
    if world > 1:
        torch.distributed.barrier()  # every rank has read the earlier rows before any rank rewrites a part
    mine_path = csv_path if world == 1 else mdir / f"{csv_path.stem}.rank{rank}{csv_path.suffix}"
    rows = {c: r for c, r in earlier.items() if world == 1 or order[c] % world == rank}

    def add_row(case: str, result: Mapping[str, Any]) -> None:
        rows[case] = {"case": case, **result["metrics"]}
        write_case_csv(sorted(rows.values(), key=lambda r: order[r["case"]]), mine_path)

    res = predictor.run(datalist=datalist, section=section, output_dir=output_dir, save_outputs=save_outputs,
                        raise_on_failure=False, skip_existing=skip_existing, num_workers=num_workers,
                        done_cases=set(earlier) if skip_existing else None, on_case=add_row)
    if rank != 0:
        return {"rows": [], "failed": res["failed"], "skipped": res["skipped"]}
    merged = dict(earlier)
    merged.update({c: {"case": c, **r["metrics"]} for c, r in res["cases"].items()})
    if world > 1 or merged:
        write_case_csv(sorted(merged.values(), key=lambda r: order[r["case"]]), csv_path)
        for f in parts():
            f.unlink(missing_ok=True)
    rows_all = read_case_csv(csv_path) if merged else []  # the summary is the CSV's
    if rows_all:
        summary = write_metrics_summary(
            rows_all, mdir / summary_name, section=section, num_samples=predictor.num_samples,
            inference_mode=predictor.inference_mode, failed=res["failed"], skipped=res["skipped"],
        )
        logger.info("metrics of %d case(s) written to %s", len(rows_all), mdir)
        for name in ("psnr_overall", "psnr_bones", "psnr_organs", "mae_overall", "dice_mean"):
            if name in summary["metrics"]:
                s = summary["metrics"][name]
                tqdm.write(f"{name}: {s['mean']:.4g} ({s['std']:.3g}) over {s['n']} case(s)")
    if res["failed"]:
        raise CaseFailures(res["failed"], len(items))
    return {"rows": rows_all, "failed": res["failed"], "skipped": res["skipped"]}
