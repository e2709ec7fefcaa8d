"""Seeded synthetic indoor scenes for dense multi-task learning: segmentation, depth, surface normals, edges.

From the repository root::

    python -m data_prep.synthetic_scenes --out DIR --n 200 --val 50 --seed 0 [--size 64 64] [--edges] [--overwrite]

Each scene is a box room (floor, walls, ceiling, paintings on the back wall) holding random spheres and
boxes, seen by a pinhole camera from inside. Every pixel's centre ray is cast analytically (ray-plane,
ray-sphere, ray-slab), so depth and normals are exact, not rendered approximations; the RGB image is
Lambertian shading of per-class albedos (a checkered floor) under a point light, plus Gaussian noise.

Written in the mtan / LibMTL NYUv2 npy layout (``lorenmt/mtan/im2im_pred/create_dataset.py``)::

    DIR/{train,val}/image/{i}.npy   float32 (H, W, 3) in [0, 1]
    DIR/{train,val}/label/{i}.npy   float32 (H, W), class ids, -1 ignore
    DIR/{train,val}/depth/{i}.npy   float32 (H, W, 1), z-depth in metres, 0 invalid
    DIR/{train,val}/normal/{i}.npy  float32 (H, W, 3), unit vectors in the camera frame, 0 invalid
    DIR/{train,val}/edge/{i}.npy    float32 (H, W), 1 on surface boundaries (with --edges)
    DIR/scenes.json                 classes, intrinsics, seed and arguments

Why that layout: it is the simplest of the real ones (one npy per sample and task, no image codecs, no
index file), it already holds float depth and unit normals (AdaShare's PNG normals would quantise the exact
ones), and one reader (:func:`mtl_med.data.dense.read_mtan_nyuv2`) then serves the synthetic scenes and a
local copy of mtan's NYUv2. The extra ``edge`` folder is ignored by mtan-style readers.

Conventions: camera frame x right, y down, z forward (OpenCV, as NYUv2's intrinsics); depth is the z
coordinate (NYUv2 depth maps are z-depth, not ray length); normals point towards the camera. Optional
``holes`` blank small discs of depth and normals (value 0, as missing Kinect returns) but keep the label.
Scene ``i`` of a split depends only on ``(seed, split, i)``: same seed, same bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["CLASSES", "IGNORE_INDEX", "Scene", "render_scene", "intrinsics", "write_split", "generate", "build_parser", "main"]

logger = logging.getLogger("data_prep.synthetic_scenes")

#: class names in label order; a painting lies on the back wall, so its class is not a geometric one
CLASSES = ("floor", "wall", "ceiling", "sphere", "box", "painting")
IGNORE_INDEX = -1
#: base albedo per class (RGB), jittered per scene
_ALBEDO = np.array([[0.55, 0.40, 0.25], [0.80, 0.78, 0.70], [0.92, 0.92, 0.95], [0.85, 0.20, 0.20], [0.20, 0.45, 0.80],
                    [0.20, 0.60, 0.30]])
_SPLIT_SALT = {"train": 0, "val": 1, "test": 2}


class Scene(dict):
    """One rendered scene: ``image`` (H, W, 3), ``label`` (H, W) int64, ``depth`` (H, W), ``normal``
    (H, W, 3), ``surface`` (H, W) id of the surface hit, ``edge`` (H, W) bool, ``K`` (3, 3)."""


def intrinsics(height: int, width: int, fov_deg: float = 60.0) -> np.ndarray:
    """Pinhole matrix with horizontal field of view ``fov_deg``, square pixels, centred principal point."""
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    """Camera-to-world rotation: pitch about x (positive looks down: y is down), then yaw about y."""
    cp, sp, cy, sy = math.cos(pitch), math.sin(pitch), math.cos(yaw), math.sin(yaw)
    rx = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return ry @ rx


def _update(best, t, n, cls, sid):
    """Keep, per ray, the nearest positive hit: ``best`` = (t, normal, class, surface id)."""
    bt, bn, bc, bs = best
    hit = np.isfinite(t) & (t > 1e-6) & (t < bt)
    bt[hit] = t[hit]
    bn[hit] = n[hit] if n.ndim == 2 else n
    bc[hit] = cls[hit] if np.ndim(cls) else cls
    bs[hit] = sid


def render_scene(rng: np.random.Generator, height: int = 64, width: int = 64, fov_deg: float = 60.0,
                 n_spheres: tuple[int, int] = (1, 3), n_boxes: tuple[int, int] = (1, 3), holes: int = 0,
                 noise: float = 0.02) -> Scene:
    """Draw a room, its objects, a camera and a light from ``rng`` and cast one ray per pixel centre."""
    K = intrinsics(height, width, fov_deg)
    floor_y, ceil_y = rng.uniform(1.0, 1.5), -rng.uniform(1.0, 1.5)
    half_w, back_z, front_z = rng.uniform(1.6, 2.5), rng.uniform(4.0, 7.0), -1.0
    R = _rotation(math.radians(rng.uniform(-20, 20)), math.radians(rng.uniform(-5, 25)))

    v, u = np.mgrid[0:height, 0:width]
    d_cam = np.stack([(u + 0.5 - K[0, 2]) / K[0, 0], (v + 0.5 - K[1, 2]) / K[1, 1], np.ones(u.shape)], -1).reshape(-1, 3)
    d = d_cam @ R.T  # world directions whose camera z is 1, so the ray parameter t is the z-depth
    o = np.zeros(3)
    n_pix = d.shape[0]
    best = (np.full(n_pix, np.inf), np.zeros((n_pix, 3)), np.zeros(n_pix, np.int64), np.zeros(n_pix, np.int64))

    # room: six planes n . x = c with inward normals; from inside, the nearest positive hit is the room
    planes = [((0, -1, 0), -floor_y, 0), ((0, 1, 0), ceil_y, 2), ((1, 0, 0), -half_w, 1), ((-1, 0, 0), -half_w, 1),
              ((0, 0, -1), -back_z, 1), ((0, 0, 1), front_z, 1)]
    sid = 1
    back_wall_id = None
    for normal, c, cls in planes:
        nrm = np.asarray(normal, float)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (c - o @ nrm) / (d @ nrm)
        if normal == (0, 0, -1):
            back_wall_id = sid
        _update(best, t, nrm, cls, sid)
        sid += 1
    # paintings: rectangles on the back wall, class "painting", same plane and normal as the wall
    hit_back = best[3] == back_wall_id
    p = o + best[0][:, None] * d
    for _ in range(int(rng.integers(0, 3))):
        cx, cy = rng.uniform(-half_w + 0.6, half_w - 0.6), rng.uniform(ceil_y + 0.5, floor_y - 0.9)
        hw, hh = rng.uniform(0.2, 0.5), rng.uniform(0.15, 0.35)
        inside = hit_back & (np.abs(p[:, 0] - cx) < hw) & (np.abs(p[:, 1] - cy) < hh)
        best[2][inside] = CLASSES.index("painting")
        best[3][inside] = sid
        sid += 1

    albedo_of = {}
    # spheres resting on the floor, in front of the camera (the camera is never inside one)
    for _ in range(int(rng.integers(n_spheres[0], n_spheres[1] + 1))):
        r = rng.uniform(0.25, 0.6)
        centre = np.array([rng.uniform(-half_w + r, half_w - r), floor_y - r, rng.uniform(1.8, back_z - r)])
        oc = o - centre
        b = d @ oc
        a = np.einsum("ij,ij->i", d, d)
        disc = b * b - a * (oc @ oc - r * r)
        with np.errstate(invalid="ignore"):
            t = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
        n = (o + t[:, None] * d - centre) / r
        _update(best, t, np.nan_to_num(n), CLASSES.index("sphere"), sid)
        albedo_of[sid] = np.clip(_ALBEDO[3] + rng.normal(0, 0.08, 3), 0.05, 1)
        sid += 1
    # boxes resting on the floor, turned about the vertical axis: a slab test in the box's frame
    for _ in range(int(rng.integers(n_boxes[0], n_boxes[1] + 1))):
        half = rng.uniform(0.15, 0.5, 3)
        centre = np.array([rng.uniform(-half_w + 0.5, half_w - 0.5), floor_y - half[1], rng.uniform(1.8, back_z - 0.5)])
        B = _rotation(rng.uniform(0, math.pi / 2), 0.0)  # box-to-world
        ol, dl = (o - centre) @ B, d @ B
        with np.errstate(divide="ignore", invalid="ignore"):
            t1, t2 = (-half - ol) / dl, (half - ol) / dl
        tmin, tmax = np.minimum(t1, t2), np.maximum(t1, t2)
        tmin = np.nan_to_num(tmin, nan=-np.inf)
        tmax = np.nan_to_num(tmax, nan=np.inf)
        axis = np.argmax(tmin, 1)
        t_near, t_far = tmin.max(1), tmax.min(1)
        t = np.where((t_near <= t_far) & (t_near > 0), t_near, np.inf)
        nl = np.zeros_like(dl)
        rows = np.arange(n_pix)
        nl[rows, axis] = -np.sign(dl[rows, axis])  # the entered face faces the ray
        face_ids = sid + axis  # one surface per face orientation: creases become edges
        bt_before = best[0].copy()
        _update(best, t, nl @ B.T, CLASSES.index("box"), 0)
        won = best[0] < bt_before
        best[3][won] = face_ids[won]
        colour = np.clip(_ALBEDO[4] + rng.normal(0, 0.08, 3), 0.05, 1)
        for k in range(3):
            albedo_of[sid + k] = colour
        sid += 3

    t, n_world, label, surface = best
    points = o + t[:, None] * d
    n_world = n_world / np.linalg.norm(n_world, axis=1, keepdims=True)
    flip = np.einsum("ij,ij->i", n_world, d) > 0
    n_world[flip] *= -1

    # shading: per-class albedo (jittered per scene), a checkered floor, a point light near the ceiling
    albedo = np.clip(_ALBEDO + rng.normal(0, 0.05, _ALBEDO.shape), 0.05, 1)[label]
    for s, col in albedo_of.items():
        albedo[surface == s] = col
    floor = label == CLASSES.index("floor")
    checker = (np.floor(points[:, 0] / 0.5) + np.floor(points[:, 2] / 0.5)) % 2
    albedo[floor] *= np.where(checker[floor] > 0, 1.0, 0.75)[:, None]
    light = np.array([rng.uniform(-half_w + 0.3, half_w - 0.3), ceil_y + 0.2, rng.uniform(1.0, back_z - 1.0)])
    to_light = light - points
    dist = np.linalg.norm(to_light, axis=1)
    lambert = np.maximum(0.0, np.einsum("ij,ij->i", n_world, to_light / dist[:, None]))
    shade = 0.3 + 0.9 * lambert / (1 + 0.05 * dist * dist)
    image = albedo * shade[:, None] + rng.normal(0, noise, (n_pix, 3)) if noise else albedo * shade[:, None]

    shape = (height, width)
    depth = t.reshape(shape)
    normal = (n_world @ R).reshape(height, width, 3)  # world -> camera frame
    label = label.reshape(shape)
    surface = surface.reshape(shape)
    edge = np.zeros(shape, bool)
    dv, dh = surface[1:] != surface[:-1], surface[:, 1:] != surface[:, :-1]
    edge[1:] |= dv
    edge[:-1] |= dv
    edge[:, 1:] |= dh
    edge[:, :-1] |= dh
    for _ in range(int(holes)):
        cy, cx, rad = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(1.5, max(2.0, min(shape) / 10))
        disc = (v + 0.5 - cy) ** 2 + (u + 0.5 - cx) ** 2 < rad * rad
        depth = np.where(disc, 0.0, depth)
        normal = np.where(disc[..., None], 0.0, normal)
    return Scene(image=np.clip(image, 0, 1).reshape(height, width, 3).astype(np.float32), label=label,
                 depth=depth.astype(np.float32), normal=normal.astype(np.float32), surface=surface, edge=edge, K=K)


def write_split(out: str | Path, split: str, n: int, seed: int, edges: bool = False, **kwargs) -> list[int]:
    """Render ``n`` scenes of ``split`` into ``out/split/{image,label,depth,normal[,edge]}/{i}.npy``."""
    out = Path(out) / split
    folders = ["image", "label", "depth", "normal"] + (["edge"] if edges else [])
    for f in folders:
        (out / f).mkdir(parents=True, exist_ok=True)
    for i in range(int(n)):
        s = render_scene(np.random.default_rng([int(seed), _SPLIT_SALT[split], i]), **kwargs)
        arrays = {"image": s["image"], "label": s["label"].astype(np.float32), "depth": s["depth"][..., None],
                  "normal": s["normal"], "edge": s["edge"].astype(np.float32)}
        for f in folders:
            np.save(out / f / f"{i}.npy", arrays[f])
    return list(range(int(n)))


def generate(out: str | Path, n_train: int, n_val: int, seed: int, height: int = 64, width: int = 64, edges: bool = False,
             holes: int = 0, noise: float = 0.02, fov_deg: float = 60.0) -> dict:
    """Both splits and ``scenes.json``; returns the metadata written."""
    out = Path(out)
    kwargs = dict(height=int(height), width=int(width), holes=int(holes), noise=float(noise), fov_deg=float(fov_deg))
    write_split(out, "train", n_train, seed, edges, **kwargs)
    write_split(out, "val", n_val, seed, edges, **kwargs)
    meta = {"layout": "mtan_nyuv2", "classes": list(CLASSES), "num_classes": len(CLASSES), "ignore_index": IGNORE_INDEX,
            "K": intrinsics(height, width, fov_deg).tolist(), "seed": int(seed), "splits": {"train": int(n_train), "val": int(n_val)},
            "edges": bool(edges), **kwargs,
            "conventions": "camera frame x right, y down, z forward; depth = z in metres, 0 invalid; normals face the camera, 0 invalid"}
    (out / "scenes.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _size(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
    if not 16 <= v <= 1024:
        raise argparse.ArgumentTypeError(f"image sizes must be in [16, 1024], got {v}")
    return v


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.synthetic_scenes",
                                description="Render seeded synthetic rooms (RGB, labels, depth, normals, edges) in the mtan NYUv2 npy layout.")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--n", required=True, type=_count, help="training scenes")
    p.add_argument("--val", type=_count, default=None, help="validation scenes (default: a quarter of --n, at least 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--size", type=_size, nargs=2, default=(64, 64), metavar=("H", "W"), help="image height and width")
    p.add_argument("--fov", type=float, default=60.0, help="horizontal field of view in degrees")
    p.add_argument("--noise", type=float, default=0.02, help="sigma of the Gaussian image noise")
    p.add_argument("--holes", type=_count, default=0, help="discs of missing depth and normals per scene")
    p.add_argument("--edges", action="store_true", help="also write edge/{i}.npy (surface boundaries)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 10 <= args.fov <= 150:
        parser.error(f"--fov must be in [10, 150] degrees, got {args.fov}")
    if not 0 <= args.noise < 1:
        parser.error(f"--noise must be in [0, 1), got {args.noise}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        parser.error(f"--out {args.out} is not empty; pass --overwrite to write into it")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    n_val = max(1, args.n // 4) if args.val is None else args.val
    meta = generate(args.out, args.n, n_val, args.seed, *args.size, edges=args.edges, holes=args.holes, noise=args.noise, fov_deg=args.fov)
    logger.info("wrote %d training and %d validation scenes of %dx%d to %s", args.n, n_val, *args.size, args.out)
    return 0 if meta else 1


if __name__ == "__main__":
    sys.exit(main())
