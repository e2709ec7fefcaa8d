"""Resampling MR, CT and labels onto one grid (A.3: isotropic 1.46 mm) and back to the input grid.

Built from MONAI's invertible ``Spacingd`` (the reference image, usually MR, to the target spacing) and
``ResampleToMatchd`` (everything else onto the reference's new grid): labels and masks use nearest
neighbour, images bilinear. Outputs computed on the common grid go back to the MR's input grid with
:func:`invert_to_input` (MONAI ``Invertd``), so they keep the input's shape and affine.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.transforms import Compose, Invertd, ResampleToMatchd, Spacingd

__all__ = ["CANONICAL_AXCODES", "DEFAULT_PIXDIM", "LABEL_KEYS", "resample_transforms", "invert_to_input"]

DEFAULT_PIXDIM = (1.46, 1.46, 1.46)  # A.3: resampled to isotropic 1.46 mm
# the orientation every volume is brought to first (the phantoms' and the demo weights' training data):
# array axes towards patient Right, Anterior, Superior, so axial slices run along axis 2
CANONICAL_AXCODES = "RAS"
LABEL_KEYS = ("label", "bone", "body", "mask")


def resample_transforms(
    keys: Sequence[str] = ("mr", "ct", "label", "bone", "body"),
    ref_key: str = "mr",
    pixdim: float | Sequence[float] | None = DEFAULT_PIXDIM,
    label_keys: Sequence[str] = LABEL_KEYS,
    image_mode: str = "bilinear",
    padding_mode: str = "border",
    allow_missing_keys: bool = True,
    diagonal: bool = False,
) -> Compose:
    """Transforms that resample ``ref_key`` to ``pixdim`` and bring every other key onto its grid.

    Args:
        keys: all keys to bring onto the common grid (missing ones are skipped when ``allow_missing_keys``).
        ref_key: the image that defines the grid (its direction and extent are kept).
        pixdim: target spacing in mm; None keeps the reference's own grid (other keys are still matched to it).
        label_keys: keys resampled with nearest neighbour.
        image_mode: interpolation of the other keys.
        padding_mode: values outside an image's field of view ("border" repeats the edge, e.g. CT air).
        diagonal: resample the reference onto a grid aligned with the world (RAS+) axes, straightening an
            oblique volume (MONAI ``Spacingd(diagonal=True)``); otherwise its direction cosines are kept.

    Returns:
        an invertible ``Compose``; pass it to :func:`invert_to_input` to map outputs back.
    """
    mode = lambda k: "nearest" if k in label_keys else image_mode  # noqa: E731
    xforms = []
    if pixdim is not None:
        pix = (float(pixdim),) * 3 if np.isscalar(pixdim) else tuple(float(p) for p in pixdim)
        xforms.append(Spacingd(keys=ref_key, pixdim=pix, diagonal=diagonal, mode=mode(ref_key),
                               padding_mode=padding_mode, dtype=np.float32))
    others = [k for k in keys if k != ref_key]
    if others:
        xforms.append(ResampleToMatchd(keys=others, key_dst=ref_key, mode=[mode(k) for k in others],
                                       padding_mode=padding_mode, dtype=np.float32,
                                       allow_missing_keys=allow_missing_keys))
    return Compose(xforms)


def invert_to_input(
    keys: Sequence[str] | str,
    transform: Compose,
    orig_key: str = "mr",
    nearest_interp: bool | Sequence[bool] = False,
) -> Invertd:
    """``Invertd`` mapping outputs (``keys``) on the common grid back to ``orig_key``'s input grid.

    Use ``nearest_interp=True`` for label outputs (exact label values are kept).
    """
    return Invertd(keys=keys, transform=transform, orig_keys=orig_key, nearest_interp=nearest_interp)
