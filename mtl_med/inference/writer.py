"""Writing one case's outputs: the NIfTI maps with the input MR's geometry, the overview figure and the DICOM
outputs, whole or not at all (:mod:`mtl_med.inference.publish`), the run record last.

Every NIfTI's ``descrip`` names the package, model and weights (:mod:`mtl_med.inference.provenance`); the run
record ``<case>_run.json``, written last into the same folder, is what its caller builds (the predictor: inputs,
weights, settings, software, machine, seconds of each step)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from mtl_med.errors import InputError, as_bool
from mtl_med.inference.cases import case_output_paths
from mtl_med.inference.provenance import RUN_RECORD, write_run_record
from mtl_med.inference.publish import private_temp, publish_folder
from mtl_med.transforms.io import as_metatensor

__all__ = ["OUTPUT_POSTFIXES", "DICOM_OUTPUTS", "check_dicom_outputs", "CaseWriter"]

OUTPUT_POSTFIXES = {"sct": "sct", "seg": "seg", "sct_std": "sct_std", "seg_uncertainty": "seg_uncertainty"}
# dicom_outputs choice -> (output key, name after "<case>_"): a CT series folder, a SEG file, an RTSTRUCT file
DICOM_OUTPUTS = {"ct": ("dicom_ct", "sct_dicom"), "seg": ("dicom_seg", "seg.dcm"),
                 "rtstruct": ("dicom_rtstruct", "rtstruct.dcm")}
# NIfTI data type of each output map
DTYPES = {"sct": np.float32, "sct_std": np.float32, "seg": np.uint8, "seg_uncertainty": np.float32}


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


def _truth_on_input_grid(item: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """True CT (HU) and labels on the MR's input grid, for the overview figure only."""
    from monai.transforms import LoadImaged, ResampleToMatchd

    keys = [k for k in ("ct", "label") if k in item]
    d = LoadImaged(["mr", *keys], ensure_channel_first=True, image_only=True)({"mr": item["mr"], **{k: item[k] for k in keys}})
    d = ResampleToMatchd(keys, key_dst="mr", mode=["bilinear" if k == "ct" else "nearest" for k in keys],
                         padding_mode="border")(d)
    return {k: np.asarray(d[k])[0] for k in keys}


class _Geometry:
    """The input MR's grid: its NIfTI header when it is a file, else the in-memory input (``reference``)."""

    def __init__(self, mr: Any, reference: Any = None):
        self.from_file = isinstance(mr, (str, os.PathLike))
        if self.from_file:
            self._ref = nib.load(str(mr))
            self.affine, self.header, self.shape = self._ref.affine, self._ref.header, tuple(self._ref.shape)
        else:
            self._ref = reference if reference is not None else as_metatensor(mr)
            self.affine, self.header, self.shape = np.asarray(self._ref.affine, float), None, tuple(self._ref.shape[-3:])

    def mr_array(self) -> np.ndarray:
        return np.asarray(self._ref.dataobj, dtype=np.float32) if self.from_file else np.asarray(self._ref[0])


class CaseWriter:
    """Writes ``output_dir/<case>/<case>_<postfix>.nii.gz`` (MONAI ``SaveImage``'s separate-folder layout, the case
    name kept whole: ``FolderLayout`` would cut it at its first dot), the overview (``save_png``) and the DICOM
    outputs (``dicom_outputs``, :func:`check_dicom_outputs`), each checked to lie in the case folder inside
    ``output_dir``; ``label_table`` (label -> organ name) names the organs of the overview and the DICOM SEG /
    RTSTRUCT, ``uncertainty`` the uncertainty map of the overview. The application's presentation of its labels:
    ``label_colours`` (a matplotlib colour per label, for the overview), ``model_name`` (the maker the DICOM outputs
    name), ``organ_codes`` (label -> SNOMED CT code and meaning, DICOM SEG) and ``organ_colours`` (label -> RGB,
    RTSTRUCT); left out, the overview and :mod:`~mtl_med.inference.dicom_outputs` use their neutral defaults."""

    def __init__(self, label_table: Mapping[int, str], output_dir: str | os.PathLike = "./output",
                 postfixes: Mapping[str, str] | None = None, save_png: bool = True, dicom_outputs: Sequence[str] = (),
                 uncertainty: str = "disagreement", label_colours: Sequence[str] | None = None,
                 model_name: str | None = None, organ_codes: Mapping[int, Sequence[str]] | None = None,
                 organ_colours: Mapping[int, Sequence[int]] | None = None, body_part: str | None = None):
        self.label_table = {int(k): str(v) for k, v in dict(label_table).items()}
        self.label_colours = list(label_colours) if label_colours is not None else None
        # what the DICOM writers take beside the label table (absent: their defaults)
        self.dicom_names: dict[str, Any] = {}
        if model_name is not None:
            self.dicom_names["model_name"] = str(model_name)
        if organ_codes is not None:
            self.dicom_names["organ_codes"] = {int(k): tuple(v) for k, v in dict(organ_codes).items()}
        if organ_colours is not None:
            self.dicom_names["organ_colours"] = {int(k): tuple(v) for k, v in dict(organ_colours).items()}
        if body_part is not None:
            self.dicom_names["body_part"] = str(body_part)
        self.output_dir = output_dir
        self.postfixes = {**OUTPUT_POSTFIXES, **dict(postfixes or {})}
        self.save_png = as_bool(save_png, "save_png")
        self.dicom_outputs = check_dicom_outputs(dicom_outputs)
        self.uncertainty = uncertainty

    def paths(self, case: str, output_dir: str | os.PathLike | None = None) -> dict[str, Path]:
        """Every file this configuration writes for ``case``, the run record last."""
        names = {key: f"{post}.nii.gz" for key, post in self.postfixes.items()}
        if self.save_png:
            names["overview"] = "overview.png"
        names.update(DICOM_OUTPUTS[choice] for choice in self.dicom_outputs)
        names["run_record"] = RUN_RECORD  # written last, so a case folder with it is the complete set
        return case_output_paths(output_dir if output_dir is not None else self.output_dir, case, names)

    def complete(self, case: str, output_dir: str | os.PathLike | None = None) -> bool:
        """Whether ``case`` has its complete output set in ``output_dir`` (a case folder appears only whole)."""
        return all(p.exists() for p in self.paths(case, output_dir).values())

    def write(self, case: str, item: Mapping[str, Any], out: Mapping[str, np.ndarray],
              output_dir: str | os.PathLike | None = None, metrics: Mapping[str, float] | None = None,
              reference: Any = None, identity: Any = None,
              record: Callable[[list[str]], Mapping[str, Any]] | None = None) -> dict[str, Path]:
        """Write a case's outputs with the input MR's geometry (its NIfTI header when it is a file, else
        ``reference``: the input as a MetaTensor; DICOM outputs on the grid of the series ``item["dicom_mr"]``),
        whole or not at all: every file goes into a private temporary folder beside the case folder, which
        replaces the case folder only when all are written (:func:`~mtl_med.inference.publish.publish_folder`).
        ``identity``: the :class:`~mtl_med.inference.provenance.ModelIdentity` the files name; ``record(names)``:
        the run record, given the names of the case's files."""
        paths = self.paths(case, output_dir)
        case_dir = paths[next(iter(self.postfixes))].parent
        geometry = _Geometry(item["mr"], reference)
        tmp = private_temp(case_dir)
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # a dead run's, when a restarted host reuses our pid
            tmp.mkdir(parents=True)
            self._write_nifti(tmp, paths, out, geometry, identity.descrip() if identity is not None else "")
            if "overview" in paths:
                self._write_overview(tmp / paths["overview"].name, case, item, out, geometry, metrics)
            if self.dicom_outputs:
                write_dicom(item, out, {k: tmp / p.name for k, p in paths.items()}, self.label_table, identity=identity,
                            **self.dicom_names)
            if record is not None:
                write_run_record(record([p.name for p in paths.values()]), tmp / paths["run_record"].name)
            # DICOM outputs of an earlier run with other settings are ours too: never carried over stale
            ours = [p.name for p in paths.values()] + [f"{case}_{name}" for _, name in DICOM_OUTPUTS.values()]
            publish_folder(tmp, case_dir, ours)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return paths

    def _write_nifti(self, tmp: Path, paths: Mapping[str, Path], out: Mapping[str, np.ndarray], geometry: _Geometry,
                     descrip: str) -> None:
        for key, path in paths.items():
            if key not in self.postfixes:
                continue
            arr = out[key]
            if tuple(arr.shape) != geometry.shape:
                raise RuntimeError(f"{key} has shape {arr.shape}, input has {geometry.shape}")
            arr = np.rint(arr).astype(DTYPES[key]) if key == "seg" else arr.astype(DTYPES[key])
            img = nib.Nifti1Image(arr, geometry.affine, header=geometry.header)
            img.set_data_dtype(DTYPES[key])
            img.header.set_slope_inter(1.0, 0.0)
            img.header["descrip"] = descrip
            nib.save(img, str(tmp / path.name))

    def _write_overview(self, path: Path, case: str, item: Mapping[str, Any], out: Mapping[str, np.ndarray],
                        geometry: _Geometry, metrics: Mapping[str, float] | None) -> None:
        from mtl_med.inference.overview import save_overview

        truth = _truth_on_input_grid(item) if geometry.from_file and ("ct" in item or "label" in item) else {}
        save_overview(path, geometry.mr_array(), out["sct"], out["seg"], out["seg_uncertainty"],
                      affine=geometry.affine, sct_std=out["sct_std"], ct=truth.get("ct"), label=truth.get("label"),
                      title=case, metrics=metrics, uncertainty_name=self.uncertainty, label_table=self.label_table,
                      label_colours=self.label_colours)


def write_dicom(item: Mapping[str, Any], out: Mapping[str, np.ndarray], paths: Mapping[str, Path],
                label_table: Mapping[int, str], identity: Any = None, model_name: str | None = None,
                organ_codes: Mapping[int, tuple[str, str]] | None = None,
                organ_colours: Mapping[int, tuple[int, int, int]] | None = None, body_part: str | None = None) -> None:
    """The DICOM outputs of ``paths`` (keys of :data:`DICOM_OUTPUTS`; organs named by ``label_table``, coded by
    ``organ_codes`` and drawn in ``organ_colours``), each naming ``model_name`` and the package, model and weights'
    MD5 (``identity``, a :class:`~mtl_med.inference.provenance.ModelIdentity`) as its contributing equipment (None:
    the defaults of :mod:`~mtl_med.inference.dicom_outputs`)."""
    from mtl_med.inference import dicom_outputs

    src = item.get("dicom_mr")
    if src is None:
        raise InputError(item.get("mr", "<MR>"), "DICOM outputs need a DICOM MR series as input")
    seg = np.rint(out["seg"]).astype(np.uint8)
    named = {"model_name": model_name} if model_name is not None else {}
    if "dicom_ct" in paths:
        dicom_outputs.write_ct_series(out["sct"], src, paths["dicom_ct"], provenance=identity, body_part=body_part, **named)
    if "dicom_seg" in paths:
        dicom_outputs.write_seg(seg, src, paths["dicom_seg"], label_table=label_table, provenance=identity,
                                organ_codes=organ_codes, **named)
    if "dicom_rtstruct" in paths:
        dicom_outputs.write_rtstruct(seg, src, paths["dicom_rtstruct"], label_table=label_table,
                                     provenance=identity, organ_colours=organ_colours, **named)
