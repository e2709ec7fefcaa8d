"""Python entry points that use a bundle's inference config (the same pipeline as ``monai.bundle run``).

    from mtl_med.inference import Predictor, predict_case
    predictor = Predictor("bundles/sfg_highresnet_pelvis", num_samples=20)   # config ids as overrides
    out = predictor.predict_case("case/mr.nii.gz")                          # {"sct", "seg", "sct_std", ...}
    out = predictor.predict_case("case/t2_series/", output_dir="out")       # a DICOM MR series folder
    out = predict_case(mr_array, affine=aff, bundle="bundles/sfg_highresnet_pelvis", output_dir="out")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from mtl_med.inference.predictor import VolumePredictor

__all__ = ["Predictor", "predict_case", "bundle_parser", "default_bundle"]

BUNDLE_ENV = "MTL_MED_BUNDLE"


def default_bundle() -> Path:
    """The bundle used when none is given: ``$MTL_MED_BUNDLE``, else the flagship bundle of the source checkout the
    package runs from (an editable install). A wheel installed elsewhere has no checkout: then say so."""
    env = os.environ.get(BUNDLE_ENV)
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2] / "bundles" / "sfg_highresnet_pelvis"
    if not (checkout / "configs" / "inference.json").is_file():
        from mtl_med.errors import ConfigError

        raise ConfigError("bundle", f"no bundle folder given and none found beside the package ({checkout}); pass "
                                    f"bundle=<path of bundles/sfg_highresnet_pelvis> or set {BUNDLE_ENV}")
    return checkout


def bundle_parser(bundle: str | os.PathLike | None = None, config_file: Any = None, **overrides: Any) -> ConfigParser:
    """A ``ConfigParser`` of ``<bundle>/configs/inference.json`` (or ``config_file``: one file or a list merged
    in order) with ``bundle_root`` set to the bundle folder and ``overrides`` (config ids, ``a#b`` nested)."""
    root = Path(bundle) if bundle is not None else default_bundle()
    if config_file is None:
        config_file = root / "configs" / "inference.json"
    files = [str(f) for f in (config_file if isinstance(config_file, (list, tuple)) else [config_file])]
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"{f}: bundle config does not exist")
    parser = ConfigParser()
    parser.read_config(files)
    meta = root / "configs" / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))
    parser["bundle_root"] = str(root.resolve())
    for key, value in overrides.items():
        parser[key] = value
    return parser


def Predictor(bundle: str | os.PathLike | None = None, config_file: Any = None, **overrides: Any) -> VolumePredictor:
    """The bundle's ``predictor`` (a :class:`~mtl_med.inference.predictor.VolumePredictor`), checkpoint loaded.

    ``overrides`` are config ids, e.g. ``num_samples=10, ckpt_path="model.pt", device="cpu", seed=1``.
    """
    from mtl_med.inference.provenance import set_config_source

    parser = bundle_parser(bundle, config_file, **overrides)
    predictor = parser.get_parsed_content("predictor")
    root = Path(bundle) if bundle is not None else default_bundle()
    files = config_file if config_file is not None else root / "configs" / "inference.json"
    set_config_source(predictor, root, files if isinstance(files, (list, tuple)) else [files], overrides)
    predictor.setup()
    return predictor


def predict_case(mr: Any, affine: Any = None, *, bundle: str | os.PathLike | None = None, output_dir: Any = None,
                 config_file: Any = None, predictor: VolumePredictor | None = None, **overrides: Any) -> dict:
    """One volume through the bundle's inference: ``mr`` a NIfTI path, a DICOM MR series folder, a nibabel image
    or an array (+ ``affine``); ``dicom_outputs=["ct", "seg", "rtstruct"]`` with a series and ``output_dir`` adds
    the DICOM outputs (:mod:`mtl_med.data.dicom`).

    Returns ``{"sct", "seg", "sct_std", "seg_uncertainty"}`` (numpy, on the input grid; HU / uint8 labels),
    ``"metrics"`` (Table 2, when ``ct=`` and / or ``label=`` file paths are given) and, with ``output_dir``,
    ``"paths"`` of the written files. Other keyword arguments are config ids (``num_samples=10``, ...).
    Pass ``predictor=`` to reuse a loaded :func:`Predictor` across calls.
    """
    item = {k: overrides.pop(k) for k in ("ct", "label", "bone") if k in overrides}
    pred = predictor if predictor is not None else Predictor(bundle, config_file, **overrides)
    return pred.predict_case(mr, affine=affine, output_dir=output_dir, **item)
