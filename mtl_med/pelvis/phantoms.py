"""Synthetic male pelvis phantoms: paired MR / CT / label volumes with known ground truth.

No patient data can be shipped, so the project makes its own cases that behave like the SFG paper's data
(section 4 "Medical imaging dataset", appendix A.3) where it matters for the pipeline:

* anatomy defined in world coordinates (mm): body outline with subcutaneous fat and muscle, pelvic bone ring
  and two femoral heads (cortical shell around marrow), bladder, prostate, rectum (with gas in some cases),
  all varying in size, position and shape with the seed;
* CT in HU per tissue with texture and noise, background -1024 (A.3);
* T2-weighted-like MR whose contrast does not map one-to-one to CT (cortical bone and air are both dark),
  a smooth multiplicative bias field (saved as ground truth for N4) and Rician noise;
* labels 0..5 (DESIGN.md), a bone mask (region PSNR), a body mask and the tissue map;
* MR and CT on their own grids in the same physical space (anisotropic spacing, oblique directions).

:func:`generate_phantom` makes one case in memory, :func:`write_phantom` saves it as
``folder/{mr,ct,label,bone,body,bias,tissue}.nii.gz`` and :func:`generate_dataset` writes ``N`` cases and a
``datalist.json``. Same seed, same bytes. The command-line front end (argument checks, refusal of a non-empty
output folder) is a separate tool outside the library that calls :func:`generate_dataset`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from mtl_med.io import atomic_save_nifti, atomic_write_json
from mtl_med.pelvis.constants import LABEL_TABLE

__all__ = [
    "PRESETS",
    "DEFAULT_SPACING",
    "PAPER_MR_SPACING",
    "PAPER_CT_SPACING",
    "TISSUES",
    "CT_HU",
    "MR_T2",
    "MR_SCALE",
    "Phantom",
    "grid_affine",
    "VARIATION",
    "generate_phantom",
    "varied_phantom_kwargs",
    "write_phantom",
    "generate_dataset",
    "split_cases",
]

logger = logging.getLogger(__name__)

# reference grid (isotropic) of each preset; "paper" is A.3's 288x288x62 at 1.46 mm. The anatomy is drawn relative
# to the field of view, so the presets are scale models: "small" is a 7 cm pelvis (70 x 70 x 23 mm), "medium" a
# 14 cm one, and only "paper" (420 x 420 x 91 mm, a body about 36 cm wide) has an adult's size
# (bundles/sfg_highresnet_pelvis/docs/phantoms.md).
PRESETS: dict[str, tuple[int, int, int]] = {
    "small": (48, 48, 16),
    "medium": (96, 96, 32),
    "paper": (288, 288, 62),
}
DEFAULT_SPACING = 1.46  # A.3: isotropic 1.46 mm
PAPER_MR_SPACING = (1.46, 1.46, 5.0)  # A.3: T2 MR voxel size
PAPER_CT_SPACING = (0.98, 0.98, 1.5)  # A.3: CT voxel size

TISSUES: dict[int, str] = {
    0: "air",
    1: "fat",
    2: "muscle",
    3: "cortical bone",
    4: "marrow",
    5: "urine",
    6: "prostate",
    7: "rectal wall",
    8: "rectal gas",
}
# mean HU per tissue (cortical bone gets up to +-400 HU of texture on top: about 900 to 1700)
CT_HU: dict[int, float] = {0: -1024.0, 1: -100.0, 2: 45.0, 3: 1300.0, 4: 380.0, 5: 10.0, 6: 40.0, 7: 35.0, 8: -1000.0}
# T2-weighted signal (relative): urine and fat bright, muscle dark, cortical bone and gas nearly black
MR_T2: dict[int, float] = {0: 0.0, 1: 0.75, 2: 0.28, 3: 0.04, 4: 0.6, 5: 1.0, 6: 0.5, 7: 0.35, 8: 0.03}
MR_SCALE = 1000.0


def grid_affine(shape: Sequence[int], spacing: Sequence[float], *, oblique_deg: float = 0.0,
                orientation: str = "RAS", center: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Voxel-to-world (RAS mm) affine of a grid centred on ``center``.

    ``oblique_deg`` rotates the grid about the superior axis (non-identity direction cosines); ``orientation``
    "LPS" flips the first two axes as DICOM-derived volumes often are.
    """
    if orientation not in ("RAS", "LPS"):
        raise ValueError(f"orientation must be 'RAS' or 'LPS', got {orientation!r}")
    t = math.radians(oblique_deg)
    rot = np.array([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0], [0.0, 0.0, 1.0]])
    flip = np.diag([-1.0, -1.0, 1.0] if orientation == "LPS" else [1.0, 1.0, 1.0])
    lin = rot @ flip @ np.diag(np.asarray(spacing, dtype=float))
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = np.asarray(center, float) - lin @ ((np.asarray(shape, float) - 1) / 2)
    return aff


def _world(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ijk = np.indices(tuple(shape), dtype=np.float32)
    lin = affine[:3, :3].astype(np.float32)
    off = affine[:3, 3].astype(np.float32)
    return tuple(lin[r, 0] * ijk[0] + lin[r, 1] * ijk[1] + lin[r, 2] * ijk[2] + off[r] for r in range(3))


class _Fourier:
    """Smooth random field in world coordinates (sum of cosines): the same function on every grid, |f| <= 1."""

    def __init__(self, rng: np.random.Generator, n: int, wavelength: tuple[float, float]):
        direc = rng.normal(size=(n, 3))
        direc /= np.linalg.norm(direc, axis=1, keepdims=True)
        lam = rng.uniform(*wavelength, size=n)
        self.w = (2 * np.pi / lam)[:, None] * direc
        self.phase = rng.uniform(0, 2 * np.pi, size=n)
        amp = rng.uniform(0.5, 1.0, size=n)
        self.amp = amp / amp.sum()

    def __call__(self, x, y, z) -> np.ndarray:
        out = np.zeros_like(x)
        for (wx, wy, wz), p, a in zip(self.w, self.phase, self.amp):
            out += np.float32(a) * np.cos(np.float32(wx) * x + np.float32(wy) * y + np.float32(wz) * z + np.float32(p))
        return out


@dataclass
class _Anatomy:
    """Random anatomy of one case, in mm relative to the phantom centre."""

    center: np.ndarray
    half_fov: np.ndarray
    body: tuple[float, float]
    body_modes: list[tuple[int, float, float]]
    fat: float
    ring: tuple[float, float, float]  # radius x, radius y, centre y
    ring_t: float
    cortex: float
    symphysis_z: float
    femur_r: float
    femur_c: tuple[float, float, float]  # |x|, y, z
    bladder_c: tuple[float, float, float]
    bladder_r: tuple[float, float, float]
    bladder_modes: list[tuple[int, float, float]]
    prostate_c: tuple[float, float, float]
    prostate_r: tuple[float, float, float]
    rectum: tuple[float, float, float, float, float]  # y, rx, ry, wiggle amplitude, wiggle period
    rectum_top: float
    gas: tuple[float, float] | None  # z range of gas
    hu: dict[int, float] = field(default_factory=dict)
    mr: dict[int, float] = field(default_factory=dict)


def _random_anatomy(rng: np.random.Generator, half_fov: np.ndarray, gas: bool | None) -> _Anatomy:
    W, D, H = half_fov
    u = rng.uniform
    ax = 0.86 * W * u(0.92, 1.04)
    ay = 0.62 * D * u(0.9, 1.06)
    rx, ry = 0.56 * ax * u(0.93, 1.07), 0.55 * ay * u(0.93, 1.07)
    has_gas = bool(rng.random() < 0.5) if gas is None else gas
    gz0 = u(-0.9, 0.0) * H
    anat = _Anatomy(
        center=np.array([u(-0.03, 0.03) * W, u(-0.03, 0.03) * D, u(-0.05, 0.05) * H]),
        half_fov=np.asarray(half_fov, float),
        body=(ax, ay),
        body_modes=[(k, u(0, 0.035), u(0, 2 * np.pi)) for k in (2, 3, 4)],
        fat=u(0.08, 0.16),
        ring=(rx, ry, -0.08 * ay),
        ring_t=u(0.12, 0.16),
        cortex=0.4,
        symphysis_z=u(-0.2, 0.1) * H,
        femur_r=0.13 * ax * u(0.9, 1.1),
        femur_c=(rx * u(1.02, 1.1), u(-0.05, 0.1) * ay, u(-0.5, -0.25) * H),
        bladder_c=(u(-0.05, 0.05) * ax, u(0.18, 0.28) * ay, u(0.2, 0.4) * H),
        bladder_r=(0.22 * ax * u(0.75, 1.2), 0.2 * ay * u(0.75, 1.2), 0.45 * H * u(0.8, 1.1)),
        bladder_modes=[(k, u(0, 0.08), u(0, 2 * np.pi)) for k in (2, 3)],
        prostate_c=(u(-0.03, 0.03) * ax, u(0.0, 0.1) * ay, u(-0.6, -0.4) * H),
        prostate_r=(0.12 * ax * u(0.8, 1.2), 0.11 * ay * u(0.8, 1.2), 0.3 * H * u(0.8, 1.1)),
        rectum=(-u(0.26, 0.34) * ay, 0.09 * ax * u(0.85, 1.15), 0.08 * ay * u(0.85, 1.15), u(0, 0.04) * ax,
                u(1.0, 3.0) * H),
        rectum_top=u(0.4, 0.8) * H,
        gas=(gz0, gz0 + u(0.3, 0.7) * H) if has_gas else None,
    )
    # per-case tissue values, jittered inside the ranges real scans show
    jit_hu = {1: 10, 2: 5, 3: 60, 4: 40, 5: 3, 6: 5, 7: 5, 8: 10}
    anat.hu = {k: v + (rng.uniform(-jit_hu[k], jit_hu[k]) if k in jit_hu else 0.0) for k, v in CT_HU.items()}
    anat.mr = {k: v * (rng.uniform(0.93, 1.07) if k else 1.0) for k, v in MR_T2.items()}
    return anat


def _angular(theta: np.ndarray, modes) -> np.ndarray:
    out = np.ones_like(theta)
    for k, a, p in modes:
        out += np.float32(a) * np.cos(k * theta + np.float32(p))
    return out


def _segment(anat: _Anatomy, x, y, z) -> tuple[np.ndarray, np.ndarray]:
    """Tissue map and label map (DESIGN.md table) of the anatomy sampled at world points."""
    x = x - np.float32(anat.center[0])
    y = y - np.float32(anat.center[1])
    z = z - np.float32(anat.center[2])
    H = anat.half_fov[2]
    tissue = np.zeros(x.shape, np.uint8)
    label = np.zeros(x.shape, np.uint8)

    # body: perturbed ellipse, slightly wider towards the top (iliac crests)
    ax, ay = anat.body
    widen = np.float32(1.0) + np.float32(0.06) * z / np.float32(H)
    theta = np.arctan2(y / ay, x / ax)
    rho = np.sqrt((x / (ax * widen)) ** 2 + (y / ay) ** 2) / _angular(theta, anat.body_modes)
    body = rho <= 1.0
    tissue[body] = 2  # muscle
    tissue[body & (rho > 1.0 - anat.fat)] = 1  # subcutaneous fat
    # pelvic cavity is fat-filled around the organs
    rx, ry, cy = anat.ring
    q = np.sqrt((x / rx) ** 2 + ((y - cy) / ry) ** 2)
    tissue[body & (q < 1.0 - anat.ring_t)] = 1

    # pelvic bone ring, open anteriorly above the symphysis
    band = np.abs(q - 1.0)
    ring = body & (band < anat.ring_t) & ((z < anat.symphysis_z) | (y - cy < 0.35 * ry))
    tissue[ring] = 4
    tissue[ring & (band > anat.ring_t * (1 - anat.cortex))] = 3

    # femoral heads (1 = left = -x in RAS, 2 = right = +x)
    fx, fy, fz = anat.femur_c
    for lab, sx in ((1, -1.0), (2, 1.0)):
        d = np.sqrt((x - sx * fx) ** 2 + (y - fy) ** 2 + (z - fz) ** 2)
        head = body & (d <= anat.femur_r)
        tissue[head] = 4
        tissue[head & (d > anat.femur_r * 0.72)] = 3
        label[head] = lab

    # rectum: tube along z, posterior, wiggling left-right
    yr, rrx, rry, amp, period = anat.rectum
    xc = np.float32(amp) * np.sin(np.float32(2 * np.pi / period) * z)
    dr = np.sqrt(((x - xc) / rrx) ** 2 + ((y - yr) / rry) ** 2)
    rect = body & (dr <= 1.0) & (z <= anat.rectum_top)
    tissue[rect] = 7
    label[rect] = 5
    if anat.gas is not None:
        gas = rect & (dr <= 0.55) & (z >= anat.gas[0]) & (z <= anat.gas[1])
        tissue[gas] = 8

    # bladder: ellipsoid with a lobulated outline
    bx, by, bz = anat.bladder_c
    brx, bry, brz = anat.bladder_r
    th = np.arctan2((y - by) / bry, (x - bx) / brx)
    db = np.sqrt(((x - bx) / brx) ** 2 + ((y - by) / bry) ** 2 + ((z - bz) / brz) ** 2) / _angular(th, anat.bladder_modes)
    blad = body & (db <= 1.0) & (label == 0)
    tissue[blad] = 5
    label[blad] = 4

    # prostate below the bladder
    px, py, pz = anat.prostate_c
    prx, pry, prz = anat.prostate_r
    dp = np.sqrt(((x - px) / prx) ** 2 + ((y - py) / pry) ** 2 + ((z - pz) / prz) ** 2)
    pro = body & (dp <= 1.0) & (label == 0)
    tissue[pro] = 6
    label[pro] = 3
    return tissue, label


@dataclass
class Phantom:
    """One generated case: arrays (x, y, z voxel order) with their affines."""

    mr: np.ndarray
    ct: np.ndarray
    label: np.ndarray
    bone: np.ndarray
    body: np.ndarray
    bias: np.ndarray
    tissue: np.ndarray
    mr_clean: np.ndarray  # bias-free, noise-free MR (ground truth for N4)
    ct_tissue: np.ndarray  # tissue map on the CT grid
    mr_affine: np.ndarray
    ct_affine: np.ndarray

    def images(self) -> dict[str, nib.Nifti1Image]:
        """NIfTI images of the saved volumes (MR grid except "ct")."""
        out = {}
        for name, arr, aff in (
            ("mr", self.mr, self.mr_affine),
            ("ct", self.ct, self.ct_affine),
            ("label", self.label, self.mr_affine),
            ("bone", self.bone, self.mr_affine),
            ("body", self.body, self.mr_affine),
            ("bias", self.bias, self.mr_affine),
            ("tissue", self.tissue, self.mr_affine),
        ):
            img = nib.Nifti1Image(arr, aff)
            img.header.set_xyzt_units("mm")
            img.set_qform(aff, code=1)
            img.set_sform(aff, code=1)
            out[name] = img
        return out


def _as3(v, name: str) -> tuple[float, float, float]:
    t = (float(v),) * 3 if np.isscalar(v) else tuple(float(a) for a in v)
    if len(t) != 3 or any(not math.isfinite(a) or a <= 0 for a in t):
        raise ValueError(f"{name} must be a positive number or three positive numbers, got {v!r}")
    return t


def generate_phantom(
    seed: int,
    *,
    shape: Sequence[int] = PRESETS["small"],
    spacing: float | Sequence[float] = DEFAULT_SPACING,
    mr_spacing: float | Sequence[float] | None = None,
    ct_spacing: float | Sequence[float] | None = None,
    oblique_deg: float = 0.0,
    orientation: str = "RAS",
    mr_noise: float = 0.02,
    ct_noise: float = 12.0,
    bias_strength: float = 0.4,
    gas: bool | None = None,
    body_scale: float = 1.0,
) -> Phantom:
    """Generate one pelvis phantom.

    Args:
        seed: case seed; same seed and arguments give identical arrays.
        shape: reference grid size (voxels); with ``spacing`` it fixes the field of view (mm).
        spacing: reference grid spacing (mm), 1.46 isotropic by default (A.3).
        mr_spacing: MR grid spacing (default ``spacing``), e.g. (1.46, 1.46, 5) as acquired in A.3. Labels, bone,
            body, bias and tissue maps are on the MR grid.
        ct_spacing: CT grid spacing (default ``spacing``), e.g. (0.98, 0.98, 1.5) as in A.3.
        oblique_deg: rotation of both grids about the superior axis (non-identity direction cosines);
            the CT grid is rotated by half of it more, so MR and CT grids differ.
        orientation: "RAS" or "LPS" axis directions.
        mr_noise: Rician noise sigma relative to the brightest tissue.
        ct_noise: Gaussian CT noise sigma in HU.
        bias_strength: maximum |log| of the multiplicative MR bias field (0 disables it).
        gas: force rectal gas on / off (None: random per case).
        body_scale: size of the anatomy relative to the preset's (1.0: the body fills the field of view as the
            preset draws it; 0.85 / 1.15: a body 15 % smaller / larger on the same grid). Applied after the
            random draws, so the seed gives the same anatomy, scaled.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be three sizes >= 4, got {shape}")
    spacing = _as3(spacing, "spacing")
    mr_sp = _as3(mr_spacing if mr_spacing is not None else spacing, "mr_spacing")
    ct_sp = _as3(ct_spacing if ct_spacing is not None else spacing, "ct_spacing")
    if mr_noise < 0 or ct_noise < 0 or bias_strength < 0:
        raise ValueError("mr_noise, ct_noise and bias_strength must be >= 0")
    if not (math.isfinite(body_scale) and 0.5 <= body_scale <= 1.5):
        raise ValueError(f"body_scale must be in [0.5, 1.5], got {body_scale!r}")
    fov = np.asarray(shape) * np.asarray(spacing)
    rng = np.random.default_rng(seed)
    anat = _random_anatomy(rng, fov / 2 * body_scale, gas)
    tex = _Fourier(rng, 6, (25.0, 80.0))
    tex_bone = _Fourier(rng, 6, (15.0, 40.0))
    bias_f = _Fourier(rng, 4, (0.8 * float(fov.max()), 1.6 * float(fov.max())))
    noise_seed = int(rng.integers(2**31))

    mr_shape = tuple(max(1, int(round(f / s))) for f, s in zip(fov, mr_sp))
    ct_shape = tuple(max(1, int(round(f / s))) for f, s in zip(fov, ct_sp))
    mr_aff = grid_affine(mr_shape, mr_sp, oblique_deg=oblique_deg, orientation=orientation)
    ct_aff = grid_affine(ct_shape, ct_sp, oblique_deg=1.5 * oblique_deg, orientation=orientation)
    nrng = np.random.default_rng(noise_seed)

    # MR grid
    x, y, z = _world(mr_shape, mr_aff)
    tissue, label = _segment(anat, x, y, z)
    t = tex(x, y, z)
    mr_clean = np.zeros(mr_shape, np.float32)
    for k, v in anat.mr.items():
        sel = tissue == k
        mr_clean[sel] = v
    mr_clean *= np.float32(MR_SCALE) * (np.float32(1.0) + np.float32(0.06) * t)
    mr_clean[tissue == 0] = 0.0
    bias = np.exp(np.float32(bias_strength) * bias_f(x, y, z)).astype(np.float32)
    sigma = np.float32(mr_noise * MR_SCALE)
    n1 = nrng.standard_normal(mr_shape, dtype=np.float32)
    n2 = nrng.standard_normal(mr_shape, dtype=np.float32)
    if mr_noise > 0:
        # magnitude of a complex signal with Gaussian noise in both channels: Rician
        mr = np.sqrt((bias * mr_clean + sigma * n1) ** 2 + (sigma * n2) ** 2).astype(np.float32)
    else:
        mr = (bias * mr_clean).astype(np.float32)
    bone = np.isin(tissue, (3, 4)).astype(np.uint8)
    body = (tissue > 0).astype(np.uint8)
    del x, y, z, t, n1, n2

    # CT grid (same physical space, own sampling)
    x, y, z = _world(ct_shape, ct_aff)
    ct_tissue, _ = _segment(anat, x, y, z)
    t = tex(x, y, z)
    tb = tex_bone(x, y, z)
    ct = np.full(ct_shape, CT_HU[0], np.float32)
    for k, v in anat.hu.items():
        if k:
            ct[ct_tissue == k] = v
    soft = ct_tissue > 0
    ct[soft] += np.float32(8.0) * t[soft]
    cort = ct_tissue == 3
    ct[cort] += np.float32(400.0) * tb[cort]
    marrow = ct_tissue == 4
    ct[marrow] += np.float32(60.0) * tb[marrow]
    ct[soft] += np.float32(ct_noise) * nrng.standard_normal(int(soft.sum()), dtype=np.float32)
    ct = np.clip(np.round(ct), -1024, 3071).astype(np.int16)  # A.3: background -1024
    return Phantom(mr=mr, ct=ct, label=label, bone=bone, body=body, bias=bias, tissue=tissue, mr_clean=mr_clean,
                   ct_tissue=ct_tissue, mr_affine=mr_aff, ct_affine=ct_aff)


# ranges of the varied cohort (:func:`varied_phantom_kwargs`): what inference meets beyond one seed
VARIATION: dict[str, object] = {
    "body_scale": (0.85, 1.15),  # +-15 % around the preset's body size
    "bias_strength": (0.1, 0.6),  # max |log bias|: a bias field from mild to strong (the default is 0.4)
    "mr_noise": (0.01, 0.04),  # Rician sigma relative to the brightest tissue (default 0.02)
    "ct_noise": (6.0, 20.0),  # HU (default 12)
    "oblique_fraction": 0.5,  # share of cases on an oblique grid ...
    "oblique_deg": (5.0, 20.0),  # ... rotated by this many degrees about the superior axis, either sign
    "lps_fraction": 0.5,  # share of cases stored LPS (the axis order DICOM-derived volumes have)
}


def varied_phantom_kwargs(seed: int | Sequence[int]) -> dict:
    """Keyword arguments of :func:`generate_phantom` for one case of a varied cohort, drawn from ``seed``.

    Body size (``body_scale``), bias field, MR and CT noise, orientation (oblique grid or not) and storage
    ("RAS" or "LPS") vary inside :data:`VARIATION`; the anatomy itself varies with the phantom's own seed.
    Same seed, same arguments (plain floats and strings, JSON-ready).
    """
    rng = np.random.default_rng(seed)
    v = VARIATION
    oblique = 0.0
    if rng.random() < v["oblique_fraction"]:
        oblique = float(rng.uniform(*v["oblique_deg"])) * (1.0 if rng.random() < 0.5 else -1.0)
    return {
        "body_scale": round(float(rng.uniform(*v["body_scale"])), 4),
        "bias_strength": round(float(rng.uniform(*v["bias_strength"])), 4),
        "mr_noise": round(float(rng.uniform(*v["mr_noise"])), 5),
        "ct_noise": round(float(rng.uniform(*v["ct_noise"])), 3),
        "oblique_deg": round(oblique, 3),
        "orientation": "LPS" if rng.random() < v["lps_fraction"] else "RAS",
    }


def write_phantom(ph: Phantom, folder: str | Path) -> dict[str, str]:
    """Write a phantom's volumes as ``folder/<name>.nii.gz`` (each atomically); returns name -> path."""
    folder = Path(folder)
    paths = {}
    for name, img in ph.images().items():
        paths[name] = str(atomic_save_nifti(img, folder / f"{name}.nii.gz"))
    return paths


def split_cases(n: int, seed: int, val_fraction: float = 0.2, test_fraction: float = 0.2) -> dict[str, list[int]]:
    """Deterministic split of case indices into training / validation / test (at least one training case)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")
    order = np.random.default_rng([seed, 7919]).permutation(n).tolist()
    n_test = min(int(round(n * test_fraction)), max(n - 1, 0))
    n_val = min(int(round(n * val_fraction)), max(n - 1 - n_test, 0))
    return {
        "training": sorted(order[n_test + n_val:]),
        "validation": sorted(order[n_test:n_test + n_val]),
        "test": sorted(order[:n_test]),
    }


def generate_dataset(
    out: str | Path,
    cases: int,
    seed: int,
    *,
    preset: str = "small",
    shape: Sequence[int] | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    progress: bool = False,
    varied: bool = False,
    **phantom_kwargs,
) -> tuple[dict, list[str]]:
    """Generate ``cases`` phantoms under ``out`` and write ``out/datalist.json`` (relative paths).

    Case ``i`` uses seed ``[seed, i]``, so adding cases never changes the earlier ones. A case that fails is
    logged and left out of the datalist; returns (datalist, failed case names).

    With ``varied`` each case also draws its body size, bias field, noise, orientation and storage with
    :func:`varied_phantom_kwargs` (seed ``[seed, i, 1]``; ``phantom_kwargs`` given explicitly win), and the
    datalist's ``"variations"`` records what each case got.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(shape) if shape is not None else PRESETS[preset]
    splits = split_cases(cases, seed, val_fraction, test_fraction)
    section_of = {i: sec for sec, idx in splits.items() for i in idx}
    datalist: dict = {
        "name": "mtl_med pelvis phantoms",
        "description": f"synthetic pelvis phantoms, seed {seed}, preset {preset}, shape {list(shape)}",
        "labels": {str(k): v for k, v in LABEL_TABLE.items()},
        "training": [], "validation": [], "test": [],
    }
    if varied:
        datalist["description"] += ", varied (body size, bias field, noise, orientation, storage)"
        datalist["variations"] = {}
    failed = []
    iterator = range(cases)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="phantoms", unit="case")
    for i in iterator:
        name = f"case_{i:03d}"
        kwargs = dict(phantom_kwargs)
        if varied:
            kwargs = {**varied_phantom_kwargs([seed, i, 1]), **phantom_kwargs}
            datalist["variations"][name] = kwargs
        try:
            logger.info("generating %s (seed [%d, %d], shape %s)", name, seed, i, shape)
            ph = generate_phantom(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]), shape=shape,
                                  **kwargs)
            write_phantom(ph, out / name)
        except (OSError, ValueError, MemoryError) as err:
            logger.error("%s failed: %s", name, err)
            failed.append(name)
            continue
        item = {k: f"{name}/{k}.nii.gz" for k in ("mr", "ct", "label", "bone", "body", "bias")}
        datalist[section_of[i]].append(item)
    atomic_write_json(datalist, out / "datalist.json")
    return datalist, failed
