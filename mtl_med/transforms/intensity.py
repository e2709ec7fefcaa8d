"""CT intensity scaling: HU clipped to a CT range, network scale ``CT / scale + 1``, and back to HU.

Every range and scale is the caller's: the pelvis application's (A.3: [-1024, 2500] HU, scale 1024) are
``CT_RANGE_HU`` and ``CT_SCALE`` of the package's ``pelvis`` module, which its bundle configs pass.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import InvertibleTransform, MapTransform
from monai.utils.type_conversion import convert_to_tensor

from mtl_med.data.nifti import check_array, source_name

__all__ = ["hu_to_network", "network_to_hu", "ScaleCTd", "CTToHUd"]


def hu_to_network(x: Any, clip: tuple[float, float] | None, scale: float) -> Any:
    """HU -> network scale: clip to ``clip`` (None: no clipping) then ``x / scale + 1`` (pelvis, A.3: clip
    [-1024, 2500], scale 1024, so -1024 HU -> 0)."""
    if clip is not None:
        x = x.clip(clip[0], clip[1])
    return x / scale + 1.0


def network_to_hu(x: Any, clip: tuple[float, float] | None, scale: float) -> Any:
    """Network scale -> HU: ``(x - 1) * scale``, clipped to ``clip`` (outputs stay in the CT range; None: no
    clipping)."""
    y = (x - 1.0) * scale
    if clip is not None:
        y = y.clip(clip[0], clip[1])
    return y


class ScaleCTd(MapTransform, InvertibleTransform):
    """Clip CT to a HU range and scale it for the network (A.3); ``inverse`` returns HU.

    The inverse is traced, so ``Invertd`` with ``orig_keys="ct"`` converts a predicted CT back to HU together
    with the spatial inverses.

    Args:
        keys: CT keys (usually "ct").
        clip: HU range kept, keyword only (pelvis, A.3: [-1024, 2500], ``pelvis.CT_RANGE_HU``); None:
            no clipping.
        scale: divisor, keyword only (pelvis, A.3: 1024, ``pelvis.CT_SCALE``).
        check: reject NaN / inf voxels with an error naming the file.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(self, keys: KeysCollection = "ct", *, clip: tuple[float, float] | None, scale: float,
                 check: bool = True, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.clip = tuple(clip) if clip is not None else None
        self.scale = float(scale)
        self.check = check

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = convert_to_tensor(d[key], track_meta=True)
            if self.check:
                check_array(img, source_name(img), role="ct", spatial_ndim=None)
            out = hu_to_network(img.float(), self.clip, self.scale)
            d[key] = out
            self.push_transform(d, key)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            self.pop_transform(d, key)
            d[key] = network_to_hu(d[key], self.clip, self.scale)
        return d


class CTToHUd(MapTransform):
    """Convert network-scale CT (e.g. a synthesised CT) back to HU, clipped to the CT range (A.3).

    Args:
        keys: keys of network-scale CT images.
        clip: HU range of the output, keyword only (pelvis: ``pelvis.CT_RANGE_HU``); None: no clipping.
        scale: the divisor used for the forward scaling, keyword only (pelvis: ``pelvis.CT_SCALE``).
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(self, keys: KeysCollection = "pred_ct", *, clip: tuple[float, float] | None, scale: float,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.clip = tuple(clip) if clip is not None else None
        self.scale = float(scale)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            d[key] = network_to_hu(x.float() if isinstance(x, torch.Tensor) else x, self.clip, self.scale)
        return d
