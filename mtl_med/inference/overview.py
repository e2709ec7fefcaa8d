"""One PNG per case: MR, synthetic CT, labels, uncertainty (and true CT / labels when known), matplotlib Agg."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mtl_med.data.nifti import CT_RANGE_HU, LABEL_TABLE, atomic_write

__all__ = ["save_overview"]

# window of the CT panels (HU): soft tissue to bone
CT_WINDOW = (-400.0, 1200.0)


def _slice(vol: np.ndarray, k: int) -> np.ndarray:
    return np.rot90(np.asarray(vol)[:, :, k])  # x right, y up, as radiological viewers show an axial slice


def save_overview(
    path: str | os.PathLike,
    mr: np.ndarray,
    sct: np.ndarray,
    seg: np.ndarray,
    uncertainty: np.ndarray,
    *,
    sct_std: np.ndarray | None = None,
    ct: np.ndarray | None = None,
    label: np.ndarray | None = None,
    slice_index: int | None = None,
    title: str = "",
    metrics: Mapping[str, float] | None = None,
    uncertainty_name: str = "disagreement",
) -> Path:
    """Write the overview of one axial slice (default: the one with most labelled voxels) atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    ref = label if label is not None else seg
    if slice_index is None:
        counts = (np.asarray(ref) > 0).reshape(-1, np.asarray(ref).shape[2]).sum(0)
        slice_index = int(counts.argmax()) if counts.any() else np.asarray(mr).shape[2] // 2
    cmap = ListedColormap(["black", "gold", "orange", "red", "deepskyblue", "limegreen"][: len(LABEL_TABLE)])
    panels: list[tuple[str, np.ndarray, dict]] = [
        ("MR", _slice(mr, slice_index), {"cmap": "gray"}),
        ("synthetic CT (HU)", _slice(sct, slice_index), {"cmap": "gray", "vmin": CT_WINDOW[0], "vmax": CT_WINDOW[1]}),
    ]
    if sct_std is not None:
        panels.append(("sCT std (HU)", _slice(sct_std, slice_index), {"cmap": "magma", "vmin": 0}))
    panels.append(("labels (mode)", _slice(seg, slice_index), {"cmap": cmap, "vmin": 0, "vmax": len(LABEL_TABLE) - 1, "interpolation": "nearest"}))
    panels.append((f"label {uncertainty_name}", _slice(uncertainty, slice_index), {"cmap": "viridis", "vmin": 0}))
    if ct is not None:
        panels.append(("true CT (HU)", _slice(ct, slice_index), {"cmap": "gray", "vmin": CT_WINDOW[0], "vmax": CT_WINDOW[1]}))
    if label is not None:
        panels.append(("true labels", _slice(label, slice_index), {"cmap": cmap, "vmin": 0, "vmax": len(LABEL_TABLE) - 1, "interpolation": "nearest"}))
    cols = 4 if len(panels) > 4 else len(panels)
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, img, kw) in zip(axes.ravel(), panels):
        im = ax.imshow(img, **kw)
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    head = f"{title}  (axial slice {slice_index}; CT range {CT_RANGE_HU[0]:.0f}..{CT_RANGE_HU[1]:.0f} HU)"
    if metrics:
        parts = [f"{k} {v:.3g}" for k, v in metrics.items() if k in ("psnr_overall", "psnr_bones", "mae_overall", "dice_mean")]
        head += "\n" + ", ".join(parts)
    fig.suptitle(head, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
    finally:
        plt.close(fig)
    return path
