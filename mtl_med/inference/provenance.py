"""Provenance of the pelvis predictor's outputs: which model, weights, inputs, settings, software and machine
made them.

Three places carry it:

* every NIfTI output's ``descrip`` (80 bytes): ``mtl_med 0.1.0 sfg_highresnet_pelvis 0.1.0 md5:9f2809f3`` (the
  package version, the bundle's folder name and ``configs/metadata.json`` version, or the network class when the
  predictor knows no bundle, and the first 8 hex digits of the weights' MD5), :meth:`ModelIdentity.descrip`;
* the case's run record ``<case>/<case>_run.json``, written with the case's other outputs (and published with
  them, whole): :func:`run_record`;
* the DICOM outputs' Contributing Equipment Sequence and the SEG's Algorithm Identification
  (:mod:`mtl_med.data.dicom`, from :meth:`ModelIdentity.software_versions`).

The predictor knows its bundle when it was built from one with :func:`set_config_source` called on it (the
bundle folder, config files and overrides, recorded as given), else from the checkpoint's place: a checkpoint (or
landmarks file) inside ``<bundle>/models/`` names the bundle whose ``configs/metadata.json`` is above it.

An input's digest is the SHA-256 of its file; a DICOM series folder's is the SHA-256 of the ``sha256sum``
listing of its DICOM files sorted by name (``cd series && sha256sum $(ls | sort) | sha256sum`` when the folder
holds nothing else), each file's digest listed beside it. An input given in memory has the SHA-256 of its
array's bytes (C order, its dtype).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "RUN_RECORD",
    "PACKAGES",
    "ModelIdentity",
    "model_identity",
    "package_identity",
    "package_versions",
    "device_info",
    "file_digest",
    "input_digest",
    "input_digests",
    "predictor_settings",
    "set_config_source",
    "run_record",
    "write_run_record",
]

RUN_RECORD = "run.json"  # <case>_run.json in the case folder
DESCRIP_BYTES = 80  # NIfTI-1 descrip field
LO_CHARS = 64  # DICOM LO value (Manufacturer's Model Name, Software Versions, Device Serial Number)
# distributions whose versions a run record lists (when installed), as pip names them
PACKAGES = ("mtl_med", "torch", "monai", "numpy", "nibabel", "SimpleITK", "itk", "pydicom", "highdicom")
_SECTIONS = ("mr", "ct", "label", "bone")  # the item keys that are inputs


# ----------------------------------------------------------------------------------------------- digests
@functools.lru_cache(maxsize=64)
def _digest(path: str, algo: str, size: int, mtime_ns: int) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | os.PathLike, algo: str = "md5") -> str:
    """Hex digest of a file, remembered while its size and modification time stay the same (the weights are
    hashed once per process, not once per case)."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return _digest(str(p), algo, st.st_size, st.st_mtime_ns)


def _series_files(folder: Path) -> list[Path]:
    from mtl_med.data.dicom import _is_dicom_file

    return sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and _is_dicom_file(p)),
                  key=lambda p: p.name)


def input_digest(value: Any) -> dict[str, Any]:
    """``{"path", "kind", "sha256", ...}`` of one input: a file (``kind`` "file"), a DICOM series folder ("dicom
    series": ``sha256`` of the sorted files' ``sha256sum`` listing, ``files`` name -> sha256) or an in-memory
    array ("in memory": ``sha256`` of its bytes, with ``shape`` and ``dtype``). A MetaTensor read from a file or
    a series (its ``filename_or_obj``) is that file or series."""
    path = None
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
    else:
        name = getattr(value, "meta", {}).get("filename_or_obj") if hasattr(value, "meta") else None
        if isinstance(name, (str, os.PathLike)) and str(name) and Path(name).exists():
            path = Path(name)
    if path is not None:
        path = path.expanduser().resolve()
        if path.is_dir():
            files = _series_files(path)
            listing = "".join(f"{file_digest(f, 'sha256')}  {f.name}\n" for f in files)
            return {"path": str(path), "kind": "dicom series", "sha256": hashlib.sha256(listing.encode()).hexdigest(),
                    "files": {f.name: file_digest(f, "sha256") for f in files}}
        return {"path": str(path), "kind": "file", "sha256": file_digest(path, "sha256"), "bytes": path.stat().st_size}
    arr = value
    if hasattr(arr, "detach"):
        arr = arr.detach().cpu().numpy()
    elif hasattr(arr, "dataobj"):  # a nibabel image
        arr = np.asarray(arr.dataobj)
    elif type(arr).__module__.startswith("SimpleITK"):
        import SimpleITK as sitk

        arr = sitk.GetArrayViewFromImage(arr)
    arr = np.ascontiguousarray(np.asarray(arr))
    return {"path": None, "kind": "in memory", "sha256": hashlib.sha256(arr.tobytes()).hexdigest(),
            "shape": list(arr.shape), "dtype": str(arr.dtype)}


def input_digests(item: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """:func:`input_digest` of every input of a datalist item (``mr``, ``ct``, ``label``, ``bone``)."""
    return {k: input_digest(item[k]) for k in _SECTIONS if item.get(k) is not None}


# ----------------------------------------------------------------------------------------------- the model
def _bundle_above(path: Any, levels: int = 4) -> Path | None:
    """The bundle folder (holding ``configs/metadata.json``) at most ``levels`` folders above ``path``."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        return None
    p = Path(path).expanduser().resolve()
    for folder in list(p.parents)[:levels]:
        if (folder / "configs" / "metadata.json").is_file():
            return folder
    return None


def _metadata(bundle: Path) -> dict[str, Any]:
    try:
        meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


@dataclass(frozen=True)
class ModelIdentity:
    """What made an output: the package, the model (bundle, or network class) and its weights."""

    package_version: str
    name: str  # the bundle's folder name, else the network's class name
    version: str | None = None  # the bundle's configs/metadata.json "version"
    bundle_root: str | None = None
    network: str | None = None
    weights_path: str | None = None
    weights_md5: str | None = None
    landmarks_path: str | None = None
    landmarks_md5: str | None = None

    @property
    def model(self) -> str:
        """``name`` and ``version``, e.g. ``sfg_highresnet_pelvis 0.1.0``."""
        return f"{self.name} {self.version}" if self.version else self.name

    def descrip(self) -> str:
        """The NIfTI ``descrip``: ``mtl_med <version> <model> md5:<8 hex digits of the weights>`` (``weights
        unsaved`` for a network not loaded from a file), at most 80 ASCII bytes (the model name is cut first)."""
        tail = f" md5:{self.weights_md5[:8]}" if self.weights_md5 else " weights unsaved"
        head = f"mtl_med {self.package_version} "
        model = self.model.encode("ascii", "replace").decode()
        return head + model[: max(0, DESCRIP_BYTES - len(head) - len(tail))] + tail

    def software_versions(self) -> list[str]:
        """DICOM Software Versions values (LO, 64 characters each): the package, the model, the weights' MD5."""
        vals = [f"mtl_med {self.package_version}", self.model,
                f"weights md5 {self.weights_md5}" if self.weights_md5 else "weights unsaved"]
        return [v[:LO_CHARS] for v in vals]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "descrip": self.descrip()}


def package_identity() -> ModelIdentity:
    """The package alone (DICOM writers called without a predictor)."""
    from mtl_med import __version__

    return ModelIdentity(package_version=__version__, name="mtl_med")


def _landmarks_path(predictor: Any) -> str | None:
    pre = getattr(predictor, "_preprocessing", None)
    value = pre.keywords.get("landmarks") if isinstance(pre, functools.partial) else None
    return str(value) if isinstance(value, (str, os.PathLike)) else None


def model_identity(predictor: Any) -> ModelIdentity:
    """The :class:`ModelIdentity` of a :class:`~mtl_med.inference.predictor.VolumePredictor`: its bundle (from
    :func:`set_config_source`, else above its checkpoint or landmarks), network, weights and landmarks with
    their MD5 (computed once per file)."""
    from mtl_med import __version__

    source = getattr(predictor, "config_source", None) or {}
    ckpt = getattr(predictor, "ckpt_path", None)
    landmarks = _landmarks_path(predictor)
    bundle = Path(source["bundle_root"]) if source.get("bundle_root") else (_bundle_above(ckpt) or _bundle_above(landmarks))
    meta = _metadata(bundle) if bundle is not None else {}
    net = getattr(predictor, "network", None)
    network = type(net).__name__ if net is not None else None
    ok = lambda p: p is not None and Path(p).is_file()  # noqa: E731
    return ModelIdentity(
        package_version=__version__,
        name=bundle.resolve().name if bundle is not None else (network or "network"),
        version=str(meta["version"]) if meta.get("version") else None,
        bundle_root=str(bundle.resolve()) if bundle is not None else None,
        network=network,
        weights_path=str(Path(ckpt).expanduser().resolve()) if ckpt is not None else None,
        weights_md5=file_digest(ckpt, "md5") if ok(ckpt) else None,
        landmarks_path=str(Path(landmarks).expanduser().resolve()) if landmarks is not None else None,
        landmarks_md5=file_digest(landmarks, "md5") if ok(landmarks) else None,
    )


# ----------------------------------------------------------------------------------------------- settings, machine
def set_config_source(predictor: Any, bundle_root: str | os.PathLike | None = None,
                      config_files: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
                      overrides: Mapping[str, Any] | None = None) -> Any:
    """Tell ``predictor`` the bundle config it was built from (the bundle folder, the config files merged in
    order, the overrides), for its run records and its outputs' model name. Returns ``predictor``."""
    files = [config_files] if isinstance(config_files, (str, os.PathLike)) else list(config_files or [])
    predictor.config_source = {
        "bundle_root": str(Path(bundle_root).expanduser().resolve()) if bundle_root is not None else None,
        "config_files": [str(Path(f).expanduser().resolve()) for f in files],
        "overrides": _jsonable(dict(overrides or {})),
    }
    return predictor


def predictor_settings(predictor: Any) -> dict[str, Any]:
    """The settings that decide a predictor's outputs: sampling, compute, post-processing and outputs, and the
    preprocessing's (N4, working grid, orientation) where it is a config's ``_mode_: callable`` partial."""
    from mtl_med.inference.posterior import compute_dtype

    s = predictor.sampler
    try:
        used_dtype = str(compute_dtype(s.dtype, predictor.device, s.amp)).replace("torch.", "")
    except Exception:  # noqa: BLE001 - a record, not a check
        used_dtype = None
    out = {
        "num_samples": "auto" if s.adaptive else s.requested_samples,
        "inference_mode": s.mode,
        "seed": predictor.seed,
        "engine": s.engine,
        "dtype": str(s.dtype).replace("torch.", ""),
        "compute_dtype": used_dtype,
        "amp": s.amp,
        "margin": s.margin,
        "max_batch": s.max_batch,
        "uncertainty": predictor.uncertainty,
        "ct_clip": list(predictor.ct_clip),
        "dicom_outputs": list(predictor.dicom_outputs),
        "postfixes": dict(predictor.postfixes),
        "save_png": predictor.save_png,
        "bone_threshold_hu": predictor.bone_threshold_hu,
        "device": str(predictor.device),
        "inferer": type(predictor.inferer).__name__,
    }
    if s.adaptive:
        out.update(max_samples=s.requested_samples, min_samples=s.min_samples,
                   regression_tol=s.regression_tol, label_tol=s.label_tol)
    pre = getattr(predictor, "_preprocessing", None)
    if isinstance(pre, functools.partial):
        keep = ("n4", "n4_shrink_factor", "pixdim", "axcodes", "truth_geometry", "n4_cache_dir")
        out["preprocessing"] = {k: _jsonable(pre.keywords[k]) for k in keep if k in pre.keywords}
    return out


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str]:
    """Installed versions of ``names`` (pip's names); those not installed are left out."""
    from mtl_med import __version__

    found = {}
    for name in names:
        if name == "mtl_med":
            found[name] = __version__
            continue
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


@functools.lru_cache(maxsize=1)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: Any) -> dict[str, Any]:
    """The compute device, the CPU model, the GPU's name on CUDA, the platform and torch's CPU threads."""
    import torch

    dev = torch.device(device)
    info: dict[str, Any] = {"device": str(dev), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                            "python": platform.python_version()}
    if dev.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    return info


# ----------------------------------------------------------------------------------------------- the record
def _jsonable(obj: Any) -> Any:
    """``obj`` as JSON values: numpy scalars and arrays, tensors, paths and tuples converted; NaN / inf None."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "detach"):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, os.PathLike):
        return str(obj)
    return repr(obj)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def run_record(predictor: Any, case: str, source: Mapping[str, Any], outputs: Sequence[str], *,
               timings: Mapping[str, Any] | None = None, passes: Mapping[str, Any] | None = None,
               metrics: Mapping[str, Any] | None = None, identity: ModelIdentity | None = None) -> dict[str, Any]:
    """The run record of one case: inputs (:func:`input_digests` of the item as given, before any reading),
    model (:func:`model_identity`), settings (:func:`predictor_settings`, and the bundle config the predictor
    was built from), software (:func:`package_versions`), machine (:func:`device_info`), ``timings`` (seconds
    per step), ``passes``, ``metrics``, the output file names and the UTC time."""
    ident = identity if identity is not None else model_identity(predictor)
    return _jsonable({
        "record": "mtl_med run record",
        "record_version": 1,
        "case": case,
        "created_utc": utc_now(),
        "outputs": list(outputs),
        "inputs": input_digests(source),
        "model": ident.as_dict(),
        "settings": predictor_settings(predictor),
        "config_source": getattr(predictor, "config_source", None),
        "command_line": list(sys.argv),
        "software": package_versions(),
        "machine": device_info(predictor.device),
        "timings_s": dict(timings or {}),
        "passes": dict(passes or {}),
        "metrics": dict(metrics or {}),
    })


def write_run_record(record: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``record`` as JSON at ``path`` (a file in the case's private folder: the folder, not this file, is
    what is published atomically), readable like the other outputs (0666 & ~umask)."""
    path = Path(path)
    path.write_text(json.dumps(_jsonable(record), indent=2) + "\n")
    return path
