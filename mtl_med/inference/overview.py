"""One PNG per case: MR, synthetic CT, labels, uncertainty (and true CT / labels when known), matplotlib Agg.

The arrays may be stored in any NIfTI orientation (LPS, permuted, oblique), so each one is first reoriented to the
closest canonical RAS+ axes (a flip/transpose, never a resampling: this is a display) and then shown as an axial
slice in the radiological convention: anterior at the top, the patient's right on the viewer's left.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from mtl_med.io import atomic_write

__all__ = ["save_overview", "label_colours_for", "axial_view", "to_ras"]

# window of the CT panels (HU): soft tissue to bone
CT_WINDOW = (-400.0, 1200.0)

# where each orientation marker sits on a displayed axial panel (axes fraction); see axial_view
_MARKERS = {"R": (0.03, 0.5), "L": (0.97, 0.5), "A": (0.5, 0.97), "P": (0.5, 0.03)}


def to_ras(affine: np.ndarray | None, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Orientation taking arrays of ``shape`` stored with ``affine`` to the closest RAS+ axes, and their new affine."""
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
    ornt = ornt_transform(io_orientation(affine), axcodes2ornt("RAS"))
    return ornt, affine @ inv_ornt_aff(ornt, shape[:3])


def _display(ras: np.ndarray, k: int) -> np.ndarray:
    # ras[i, j, k]: i towards the patient's Right, j towards Anterior. Displayed row r (top = 0), column c must be
    # anterior at the top and the patient's right at the viewer's left, i.e. shown[r, c] = ras[nx-1-c, ny-1-r, k].
    return ras[::-1, ::-1, k].T


def axial_view(vol: np.ndarray, affine: np.ndarray | None = None, k: int | None = None) -> np.ndarray:
    """The axial slice ``k`` (index along the RAS inferior->superior axis; default the middle) as displayed."""
    vol = np.asarray(vol)
    ras = apply_orientation(vol, to_ras(affine, vol.shape)[0])
    return _display(ras, ras.shape[2] // 2 if k is None else k)


def label_colours_for(label_table: Mapping[int, str], label_colours: Sequence[str] | None = None) -> list[str]:
    """One matplotlib colour per label of ``label_table`` (0, 1, ...): ``label_colours`` (the application's, at
    least one per label), or black for the background and matplotlib's colour cycle ("C0", "C1", ...) for the others."""
    n_labels = len(label_table)
    if label_colours is None:
        return ["black", *(f"C{i % 10}" for i in range(n_labels - 1))]
    if len(label_colours) < n_labels:
        raise ValueError(f"label_colours has {len(label_colours)} colours for the {n_labels} labels of the label table")
    return list(label_colours)[:n_labels]


def _build_figure(mr, sct, seg, uncertainty, *, label_table, label_colours=None, affine=None, sct_std=None, ct=None, label=None,
                  slice_index=None, title="", metrics=None, uncertainty_name="disagreement"):
    """The overview figure (not saved), so tests can read its legends and title."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.patheffects as pe
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    shape = np.asarray(mr).shape
    ornt, ras_affine = to_ras(affine, shape)

    def ras(vol):
        vol = np.asarray(vol)
        if vol.shape != shape:
            raise ValueError(f"overview arrays must share the MR grid {shape}, got {vol.shape}")
        return apply_orientation(vol, ornt)

    ref = ras(label if label is not None else seg)
    n = ref.shape[2]
    if slice_index is None:
        counts = (ref > 0).reshape(-1, n).sum(0)
        slice_index = int(counts.argmax()) if counts.any() else n // 2
    k = int(slice_index)
    if not 0 <= k < n:
        raise ValueError(f"slice_index {k} outside the axial axis 0..{n - 1}")
    spacing = np.linalg.norm(ras_affine[:3, :3], axis=0)
    # world z of the slice centre (an oblique slice is not at one z)
    z_mm = (ras_affine @ np.array([(ref.shape[0] - 1) / 2, (ref.shape[1] - 1) / 2, k, 1.0]))[2]

    n_labels = len(label_table)
    colours = label_colours_for(label_table, label_colours)
    cmap = ListedColormap(colours)
    ct_kw = {"cmap": "gray", "vmin": CT_WINDOW[0], "vmax": CT_WINDOW[1]}
    label_kw = {"cmap": cmap, "vmin": 0, "vmax": n_labels - 1, "interpolation": "nearest"}
    panels: list[tuple[str, np.ndarray | None, dict]] = [("MR", mr, {"cmap": "gray"})]
    panels += [("synthetic CT (HU)", sct, ct_kw)]
    panels += [("sCT std (HU)", sct_std, {"cmap": "magma", "vmin": 0}), ("labels (mode)", seg, label_kw)]
    panels += [(f"label {uncertainty_name}", uncertainty, {"cmap": "viridis", "vmin": 0})]
    panels += [("true CT (HU)", ct, ct_kw), ("true labels", label, label_kw)]
    panels = [(name, vol, kw) for name, vol, kw in panels if vol is not None]

    cols = min(4, len(panels))
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.4 * rows + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    outline = [pe.withStroke(linewidth=2, foreground="black")]  # readable on bright and dark pixels alike
    handles = [Patch(facecolor=colours[i], edgecolor="white", label=label_table[i]) for i in range(1, n_labels)]
    for ax, (name, vol, kw) in zip(axes.ravel(), panels):
        # aspect: displayed rows run along RAS y, columns along RAS x, so anisotropic voxels keep their true shape
        im = ax.imshow(_display(ras(vol), k), aspect=spacing[1] / spacing[0], **kw)
        ax.set_title(name, fontsize=9)
        for text, (x, y) in _MARKERS.items():
            ax.text(x, y, text, transform=ax.transAxes, ha="center", va="center", color="white", fontsize=7,
                    fontweight="bold", path_effects=outline)
        if kw is label_kw:
            ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=6, frameon=False)
        else:
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    lo, hi = CT_WINDOW
    head = (f"{title}  (axial slice {k} of 0..{n - 1}, z = {z_mm:.1f} mm; "
            f"CT window {lo:.0f}..{hi:.0f} HU (W {hi - lo:.0f}, L {(lo + hi) / 2:.0f}))")
    if metrics:
        shown = ("psnr_overall", "psnr_bones", "mae_overall", "dice_mean")
        parts = [f"{m} {v:.3g}" for m, v in metrics.items() if m in shown]
        head += "\n" + ", ".join(parts)
    fig.suptitle(head.strip(), fontsize=9)
    fig.tight_layout()
    return fig


def save_overview(
    path: str | os.PathLike,
    mr: np.ndarray,
    sct: np.ndarray,
    seg: np.ndarray,
    uncertainty: np.ndarray,
    *,
    label_table: Mapping[int, str],
    label_colours: Sequence[str] | None = None,
    affine: np.ndarray | None = None,
    sct_std: np.ndarray | None = None,
    ct: np.ndarray | None = None,
    label: np.ndarray | None = None,
    slice_index: int | None = None,
    title: str = "",
    metrics: Mapping[str, float] | None = None,
    uncertainty_name: str = "disagreement",
) -> Path:
    """Write the overview of one axial slice atomically.

    All arrays lie on one voxel grid whose voxel-to-world RAS+ mm ``affine`` (nibabel convention) is given (None:
    identity, i.e. RAS storage). ``label_table``: label -> organ name of the legend (background 0 included);
    ``label_colours``: a matplotlib colour per label (see :func:`label_colours_for`).
    ``slice_index`` counts along the reoriented inferior->superior axis; default: the
    slice with most labelled voxels (``label`` if given, else ``seg``).
    """
    import matplotlib.pyplot as plt

    fig = _build_figure(mr, sct, seg, uncertainty, label_table=label_table, label_colours=label_colours, affine=affine,
                        sct_std=sct_std, ct=ct, label=label, slice_index=slice_index, title=title, metrics=metrics,
                        uncertainty_name=uncertainty_name)
    path = Path(path)
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
    finally:
        plt.close(fig)
    return path
