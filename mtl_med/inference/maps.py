"""The posterior sampler's statistic maps made outputs: synthetic CT and its standard deviation in HU, the label
map and its uncertainty, on the preprocessed grid and then back on the input's own grid (MONAI ``Invertd``,
labels nearest)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from mtl_med.transforms.intensity import network_to_hu
from mtl_med.transforms.spatial import invert_to_input

__all__ = ["UNCERTAINTIES", "OutputMaps"]

logger = logging.getLogger("mtl_med.inference")

UNCERTAINTIES = ("disagreement", "entropy")


class OutputMaps:
    """Outputs of the regression task ``sct_key`` (network scale ``HU = ct_scale * (x - 1)``, clipped to
    ``ct_clip``) and the label task ``seg_key``, with ``uncertainty`` ``"disagreement"`` (1 - votes(mode) / S) or
    ``"entropy"`` (of the vote frequencies, nats) as the label uncertainty map."""

    def __init__(self, sct_key: str, seg_key: str, ct_clip: Sequence[float], ct_scale: float,
                 uncertainty: str = "disagreement"):
        if uncertainty not in UNCERTAINTIES:
            raise ValueError(f"uncertainty must be 'disagreement' or 'entropy', got {uncertainty!r}")
        self.sct_key, self.seg_key = sct_key, seg_key
        self.ct_clip = tuple(float(v) for v in ct_clip)
        self.ct_scale = float(ct_scale)
        self.uncertainty = uncertainty

    def to_hu(self, x: torch.Tensor) -> torch.Tensor:
        """Network scale -> HU, clipped to the CT range."""
        return network_to_hu(x, self.ct_clip, self.ct_scale)

    def from_statistics(self, maps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``sct`` (mean, HU), ``sct_std`` (HU), ``seg`` (mode), ``seg_disagreement``, ``seg_entropy``,
        ``seg_votes`` (frequencies), each ``(C, *spatial)``, from the sampler's maps of one volume."""
        mean = maps[f"{self.sct_key}_mean"][0].float()
        std = maps[f"{self.sct_key}_std"][0].float()
        freq = maps[f"{self.seg_key}_votes"][0].float()
        freq = freq / freq.sum(0, keepdim=True).clamp_min(1e-12)  # blending (overlapping windows) keeps it a distribution
        return {
            "sct": self.to_hu(mean),
            "sct_std": std * self.ct_scale,  # d(HU) = scale * d(network scale), A.3
            "seg": freq.argmax(0, keepdim=True),
            "seg_disagreement": 1.0 - freq.amax(0, keepdim=True),
            "seg_entropy": torch.special.entr(freq).sum(0, keepdim=True),
            "seg_votes": freq,
        }

    def to_input_grid(self, data: Mapping[str, Any], maps: Mapping[str, torch.Tensor],
                      preprocessing: Any) -> dict[str, np.ndarray]:
        """Resample the output maps back to the input MR grid (``Invertd`` of ``preprocessing``; labels nearest)
        -> numpy (spatial)."""
        mr = data["mr"]
        unc = maps[f"seg_{self.uncertainty}"]
        outputs = {"sct": maps["sct"], "sct_std": maps["sct_std"], "seg": maps["seg"].float(), "seg_uncertainty": unc}
        if not isinstance(mr, MetaTensor) or not mr.applied_operations:
            return {k: v[0].cpu().numpy() for k, v in outputs.items()}
        d = {"mr": mr}
        for k, v in outputs.items():
            d[k] = MetaTensor(v.detach().cpu(), meta=dict(mr.meta), applied_operations=list(mr.applied_operations))
        keys = list(outputs)
        inv = invert_to_input(keys, preprocessing, orig_key="mr", nearest_interp=[k == "seg" for k in keys])
        d = inv(d)
        res = {k: np.asarray(d[k].detach().cpu() if isinstance(d[k], torch.Tensor) else d[k])[0] for k in keys}
        res["sct"] = np.clip(res["sct"], *self.ct_clip)
        res["sct_std"] = np.maximum(res["sct_std"], 0.0)
        res["seg_uncertainty"] = np.maximum(res["seg_uncertainty"], 0.0)
        return res

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
