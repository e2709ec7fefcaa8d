"""Readers for the dense multi-task benchmarks (segmentation, depth, surface normals, edges, keypoints) in the
on-disk formats of the code bases that publish numbers on them.

Every reader returns a :class:`DenseDataset`; an item is ``{"image": float32 (3, H, W) RGB in [0, 1],
"targets": {task: tensor}, "index": int}`` (and ``"weights": {"seg": (H, W)}`` for Taskonomy's rebalanced
segmentation). One convention for all formats, whatever the file stores:

* ``seg``: int64 ``(H, W)`` class ids, :data:`IGNORE_INDEX` (-1) where unlabelled;
* ``depth``: float32 ``(1, H, W)``, 0 where invalid;
* ``normal``: float32 ``(3, H, W)`` unit vectors, 0 where invalid;
* ``edge``, ``keypoint``: float32 ``(1, H, W)``.

Nothing is downloaded. A missing file raises :class:`DenseFileNotFoundError`, a malformed one
:class:`DenseFormatError`; both name the file and the problem. Formats (see the research notes, section 3.1):

* :func:`read_mtan_nyuv2`: ``root/{train,val}/{image,label,depth,normal}/{i}.npy`` (mtan, LibMTL; 13 classes),
  also what :mod:`data_prep.synthetic_scenes` writes (its ``scenes.json`` gives the class count);
* :func:`read_mtan_cityscapes`: ``root/{train,val}/{image,depth,label|label_7|label_19}/{i}.npy`` (7 or 19 classes,
  inverse depth as stored);
* :func:`read_adashare_nyuv2`: AdaShare's ``nyu_v2_3task.json`` (40 classes, normals in uint8 PNGs);
* :func:`read_nyud_mt`: Multi-Task-Learning-PyTorch's ``NYUD_MT`` (40 classes, ``gt_sets/{split}.txt``);
* :func:`read_taskonomy`: AdaShare's ``taskonomy.json`` (seg, normal, depth, keypoint, edge).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Randomizable
from torch.utils.data import Dataset

from mtl_med.errors import InputError

__all__ = [
    "IGNORE_INDEX",
    "DENSE_TASKS",
    "DenseFormatError",
    "DenseFileNotFoundError",
    "DenseDataset",
    "DenseRandomCropFlip",
    "read_mtan_nyuv2",
    "read_mtan_cityscapes",
    "read_adashare_nyuv2",
    "read_nyud_mt",
    "read_taskonomy",
    "DENSE_DATASETS",
]

IGNORE_INDEX = -1
DENSE_TASKS = ("seg", "depth", "normal", "edge", "keypoint")
#: AdaShare's valid-depth threshold for NYU v2 (metres)
ADASHARE_DEPTH_MIN = 3e-5
#: Taskonomy depth PNGs: values >= this are missing returns (AdaShare's ``make_depth_mask``)
TASKONOMY_DEPTH_INVALID = 64500


class DenseFormatError(InputError):
    """A data set file exists but cannot be parsed or has the wrong shape or values; ``path`` names it."""


class DenseFileNotFoundError(InputError, FileNotFoundError):
    """A file or folder the format requires is missing; ``path`` names it."""

    def __init__(self, path, problem: str = "not found"):
        super().__init__(os.fspath(path), problem)


# --- file readers: one clear error per bad file -------------------------------------------------


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DenseFileNotFoundError(path, f"{what} not found")
    return path


def _npy(path: Path) -> np.ndarray:
    _need(path, "file")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError / OSError / EOFError for bad files
        raise DenseFormatError(path, f"not a readable .npy array ({type(e).__name__}: {e})") from None


def _png(path: Path, mode: str | None = None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    _need(path, "image file")
    try:
        with Image.open(path) as im:
            return np.array(im.convert(mode) if mode else im)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DenseFormatError(path, f"not a readable image ({e})") from None


def _shape(arr: np.ndarray, path: Path, what: str, hw: tuple | None, channels: int | None) -> np.ndarray:
    """``arr`` as ``(H, W)`` (``channels=None``) or ``(H, W, C)``; a trailing 1 of a single channel is dropped."""
    if channels is None and arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    want = 2 if channels is None else 3
    if arr.ndim != want or (channels is not None and arr.shape[-1] != channels):
        shape = "(H, W)" if channels is None else f"(H, W, {channels})"
        raise DenseFormatError(path, f"{what} must have shape {shape}, got {arr.shape}")
    if hw is not None and tuple(arr.shape[:2]) != tuple(hw):
        raise DenseFormatError(path, f"{what} is {arr.shape[0]}x{arr.shape[1]} but the image is {hw[0]}x{hw[1]}")
    if arr.dtype.kind not in "biuf":
        raise DenseFormatError(path, f"{what} must be numeric, got dtype {arr.dtype}")
    return arr


def _labels(arr: np.ndarray, path: Path, num_classes: int, ignore: Sequence[int] = (IGNORE_INDEX,)) -> torch.Tensor:
    """Class ids with every value of ``ignore`` mapped to :data:`IGNORE_INDEX`; others must lie in [0, C)."""
    a = np.asarray(arr, dtype=np.float64)
    if not np.isfinite(a).all() or (a != np.round(a)).any():
        raise DenseFormatError(path, "labels must be whole numbers")
    a = a.astype(np.int64)
    ign = np.isin(a, list(ignore))
    bad = ~ign & ((a < 0) | (a >= num_classes))
    if bad.any():
        raise DenseFormatError(path, f"labels must be in [0, {num_classes}) or {sorted(set(ignore))}, found {sorted(set(np.unique(a[bad]).tolist()))[:5]}")
    a[ign] = IGNORE_INDEX
    return torch.from_numpy(a)


def _image(arr: np.ndarray, path: Path) -> torch.Tensor:
    arr = _shape(arr, path, "image", None, 3)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    a = arr.astype(np.float32)
    if not np.isfinite(a).all() or a.min() < -1e-3 or a.max() > 1 + 1e-3:
        raise DenseFormatError(path, f"image values must be finite and in [0, 1] (or uint8), found [{a.min():.3g}, {a.max():.3g}]")
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def _depth(arr: np.ndarray, path: Path, hw, valid_min: float = 0.0) -> torch.Tensor:
    a = _shape(arr, path, "depth", hw, None).astype(np.float32)
    if np.isnan(a).all():
        raise DenseFormatError(path, "depth has no finite value")
    a = np.where(np.isfinite(a) & (a > valid_min), a, 0.0).astype(np.float32)
    return torch.from_numpy(a)[None]


def _unit_normals(a: np.ndarray, path: Path) -> torch.Tensor:
    """``(H, W, 3)`` in [-1, 1] -> ``(3, H, W)`` unit vectors, 0 where the vector is 0 or not finite."""
    a = np.asarray(a, np.float64)
    if np.isfinite(a).any() and np.nanmax(np.abs(a[np.isfinite(a)])) > 1.01:
        raise DenseFormatError(path, f"normals must be vectors with components in [-1, 1], found magnitude {np.nanmax(np.abs(a)):.3g}")
    a = np.where(np.isfinite(a), a, 0.0)
    norm = np.linalg.norm(a, axis=-1, keepdims=True)
    a = np.where(norm > 1e-6, a / np.maximum(norm, 1e-12), 0.0)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32))


def _channel(arr: np.ndarray, path: Path, what: str, hw) -> torch.Tensor:
    return torch.from_numpy(_shape(arr, path, what, hw, None).astype(np.float32))[None]


# --- data set ------------------------------------------------------------------------------------


class DenseDataset(Dataset):
    """Samples of a dense multi-task data set, read lazily, each by ``load(sample, tasks)`` ->
    ``(image, targets, weights)``. The first sample is read at construction so that a wrong layout
    fails at once, naming the file.

    Args:
        samples: one record per sample (file paths), as the format's reader lists them.
        load: reads one record.
        tasks: the tasks to return, a subset of what the format holds.
        transform: applied to each item (e.g. :class:`DenseRandomCropFlip`).
        num_classes: segmentation classes (``None`` when the format has no segmentation).
        name: the format, for messages.
    """

    def __init__(self, samples: Sequence, load: Callable, tasks: Sequence[str], transform: Callable | None = None,
                 num_classes: int | None = None, name: str = "dense", available: Sequence[str] = DENSE_TASKS):
        self.tasks = [str(t) for t in tasks]
        unknown = [t for t in self.tasks if t not in available]
        if not self.tasks or unknown:
            raise ValueError(f"{name} holds the tasks {list(available)}; asked for {self.tasks}")
        self.samples, self._load, self.transform = list(samples), load, transform
        self.num_classes, self.name = num_classes, name
        if self.samples:
            self._read(0)

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, i: int) -> dict:
        image, targets, weights = self._load(self.samples[i], self.tasks)
        item = {"image": image, "targets": targets, "index": int(i)}
        if weights:
            item["weights"] = weights
        return item

    def __getitem__(self, i: int) -> dict:
        item = self._read(int(i))
        return self.transform(item) if self.transform is not None else item


class DenseRandomCropFlip(Randomizable):
    """Random crop (zero / ignore padding where the image is smaller) and horizontal flip of an item,
    all tasks alike; a flip negates the normals' x component (mtan's ``RandomScaleCrop`` and AdaShare's
    ``__mirror__`` do the same for camera-frame normals)."""

    def __init__(self, size: Sequence[int] | None = None, flip: bool = True, seed: int | None = None):
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.flip = bool(flip)
        if seed is not None:  # MONAI's shared default stream is not reseeded by set_determinism
            self.set_random_state(int(seed))

    def randomize(self, hw) -> None:
        h, w = hw
        ch, cw = self.size or (h, w)
        self._top = int(self.R.randint(0, max(h - ch, 0) + 1))
        self._left = int(self.R.randint(0, max(w - cw, 0) + 1))
        self._flip = self.flip and bool(self.R.rand() < 0.5)

    def _crop(self, x: torch.Tensor, fill: float) -> torch.Tensor:
        if self.size is None:
            return x
        ch, cw = self.size
        h, w = x.shape[-2:]
        out = x.new_full((*x.shape[:-2], max(h, ch), max(w, cw)), fill)
        out[..., :h, :w] = x
        return out[..., self._top : self._top + ch, self._left : self._left + cw]

    def __call__(self, item: dict) -> dict:
        self.randomize(item["image"].shape[-2:])
        out = dict(item)
        out["image"] = self._crop(item["image"], 0.0)
        out["targets"] = {t: self._crop(v, IGNORE_INDEX if t == "seg" else 0.0) for t, v in item["targets"].items()}
        if "weights" in item:
            out["weights"] = {t: self._crop(v, 0.0) for t, v in item["weights"].items()}
        if self._flip:
            out["image"] = out["image"].flip(-1)
            out["targets"] = {t: v.flip(-1) for t, v in out["targets"].items()}
            if "normal" in out["targets"]:
                n = out["targets"]["normal"].clone()
                n[0] = -n[0]
                out["targets"]["normal"] = n
            if "weights" in out:
                out["weights"] = {t: v.flip(-1) for t, v in out["weights"].items()}
        return out


# --- mtan / LibMTL npy layout ------------------------------------------------------------------


def _indexed_npy(folder: Path) -> list[Path]:
    """``folder/{0..n-1}.npy``, in index order; a gap is an error naming the missing file."""
    _need(folder, "folder")
    idx = sorted(int(m.group(1)) for f in folder.iterdir() if (m := re.fullmatch(r"(\d+)\.npy", f.name)))
    if not idx:
        raise DenseFileNotFoundError(folder, "no {i}.npy files")
    missing = sorted(set(range(idx[-1] + 1)) - set(idx))
    if missing:
        raise DenseFileNotFoundError(folder / f"{missing[0]}.npy", f"missing: the folder holds indices up to {idx[-1]}")
    return [folder / f"{i}.npy" for i in idx]


def _npy_layout(root, split: str, folders: dict[str, str], tasks: Sequence[str], num_classes: int | None, name: str,
                transform=None, depth_valid_min: float = 0.0) -> DenseDataset:
    base = _need(Path(root), f"{name} root") / split
    _need(base, f"split folder {split!r}")
    images = _indexed_npy(base / "image")
    lists = {}
    for t in tasks:
        if t not in folders:
            raise ValueError(f"{name} holds the tasks {sorted(folders)}; asked for {list(tasks)}")
        files = _indexed_npy(base / folders[t])
        if len(files) != len(images):
            raise DenseFormatError(base / folders[t], f"{len(files)} files but {len(images)} images in {base / 'image'}")
        lists[t] = files
    samples = [{"image": img, **{t: lists[t][i] for t in tasks}} for i, img in enumerate(images)]

    def load(s, tasks):
        image = _image(_npy(s["image"]), s["image"])
        hw = tuple(image.shape[-2:])
        targets = {}
        for t in tasks:
            arr, p = _npy(s[t]), s[t]
            if t == "seg":
                targets[t] = _labels(_shape(arr, p, "label", hw, None), p, num_classes)
            elif t == "depth":
                targets[t] = _depth(arr, p, hw, depth_valid_min)
            elif t == "normal":
                targets[t] = _unit_normals(_shape(arr, p, "normal", hw, 3), p)
            else:
                targets[t] = _channel(arr, p, t, hw)
        return image, targets, None

    return DenseDataset(samples, load, tasks, transform, num_classes, name, available=tuple(folders))


def read_mtan_nyuv2(root: str | os.PathLike, split: str = "train", tasks: Sequence[str] = ("seg", "depth", "normal"),
                    num_classes: int | None = None, transform: Callable | None = None) -> DenseDataset:
    """mtan / LibMTL NYUv2 (``lorenmt/mtan/im2im_pred/create_dataset.py``): ``root/{split}/{image,label,depth,
    normal[,edge]}/{i}.npy``; image (H, W, 3) in [0, 1], label (H, W) with -1 ignore, depth (H, W, 1) 0
    invalid, normal (H, W, 3) 0 invalid. ``num_classes``: 13 for NYUv2; by default ``root/scenes.json``'s
    (the synthetic scenes), else 13."""
    root = Path(root)
    if num_classes is None:
        meta = root / "scenes.json"
        if meta.is_file():
            try:
                num_classes = int(json.loads(meta.read_text())["num_classes"])
            except (ValueError, KeyError, TypeError) as e:
                raise DenseFormatError(meta, f"no integer 'num_classes' ({e})") from None
        else:
            num_classes = 13
    folders = {"seg": "label", "depth": "depth", "normal": "normal", "edge": "edge"}
    return _npy_layout(root, split, folders, tasks, int(num_classes), "mtan NYUv2", transform)


def read_mtan_cityscapes(root: str | os.PathLike, split: str = "train", tasks: Sequence[str] = ("seg", "depth"),
                         num_classes: int = 7, transform: Callable | None = None) -> DenseDataset:
    """mtan / LibMTL Cityscapes: ``root/{split}/{image,depth,...}/{i}.npy`` with labels in ``label_{C}``
    (mtan: ``label_2``, ``label_7``, ``label_19``) or, for 7 classes, ``label`` (LibMTL). Depth is kept as
    stored (inverse depth in these archives), 0 invalid; label -1 ignore."""
    base = Path(root) / split
    folder = f"label_{int(num_classes)}"
    if not (base / folder).is_dir() and int(num_classes) == 7 and (base / "label").is_dir():
        folder = "label"
    return _npy_layout(root, split, {"seg": folder, "depth": "depth"}, tasks, int(num_classes), "mtan Cityscapes", transform)


# --- AdaShare NYU v2 json -------------------------------------------------------------------------


def _json_groups(path: Path, split: str, width: int) -> list:
    _need(path, "index file")
    try:
        info = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DenseFormatError(path, f"not valid JSON ({e})") from None
    if not isinstance(info, dict) or split not in info:
        raise DenseFormatError(path, f"no split {split!r}; holds {sorted(info) if isinstance(info, dict) else type(info).__name__}")
    groups = info[split]
    if not isinstance(groups, list) or not all(isinstance(g, list) and len(g) == width and all(isinstance(x, str) for x in g) for g in groups):
        raise DenseFormatError(path, f"split {split!r} must be a list of [{width} relative paths] entries")
    return groups


def read_adashare_nyuv2(root: str | os.PathLike, split: str = "train", tasks: Sequence[str] = ("seg", "normal", "depth"),
                        json_name: str = "nyu_v2_3task.json", adashare_compat: bool = False,
                        transform: Callable | None = None) -> DenseDataset:
    """AdaShare's NYU v2 (``sunxm2357/AdaShare/dataloaders/nyu_v2_dataloader.py``): ``root/json_name`` =
    ``{split: [[img.png, seg.png, normal.png, depth.npy], ...]}`` (splits ``train``, ``train1``, ``train2``,
    ``test``); 40 classes, 255 ignore; normals as uint8 RGB ``n = x / 127.5 - 1``, (255, 255, 255) invalid;
    depth metres, valid where > 3e-5.

    ``adashare_compat``: normals as AdaShare's metric code sees them, ``normalize`` of the raw 0-255 values
    in cv2's BGR order (not true normals: compare only with AdaShare's tables); the invalid (255, 255, 255)
    pixels stay 0.
    """
    root = Path(root)
    groups = _json_groups(root / json_name, split, 4)
    samples = [dict(zip(("image", "seg", "normal", "depth"), (root / p for p in g))) for g in groups]

    def load(s, tasks):
        image = _image(_png(s["image"], "RGB"), s["image"])
        hw = tuple(image.shape[-2:])
        targets = {}
        for t in tasks:
            p = s[t]
            if t == "seg":
                seg = _png(p)
                targets[t] = _labels(_shape(seg, p, "segmentation", hw, None), p, 40, ignore=(255,))
            elif t == "normal":
                raw = _shape(_png(p, "RGB"), p, "normal image", hw, 3).astype(np.float64)
                invalid = (raw == 255).all(-1)
                n = raw[..., ::-1] if adashare_compat else raw / 127.5 - 1.0
                n[invalid] = 0.0
                norm = np.linalg.norm(n, axis=-1, keepdims=True)
                n = np.where(norm > 1e-6, n / np.maximum(norm, 1e-12), 0.0)
                targets[t] = torch.from_numpy(np.ascontiguousarray(n.transpose(2, 0, 1), dtype=np.float32))
            else:
                targets[t] = _depth(_npy(p), p, hw, ADASHARE_DEPTH_MIN)
        return image, targets, None

    return DenseDataset(samples, load, tasks, transform, 40, "AdaShare NYU v2", available=("seg", "normal", "depth"))


# --- Multi-Task-Learning-PyTorch NYUD_MT ---------------------------------------------------------


def read_nyud_mt(root: str | os.PathLike, split: str = "train", tasks: Sequence[str] = ("seg", "depth", "normal", "edge"),
                 transform: Callable | None = None) -> DenseDataset:
    """Multi-Task-Learning-PyTorch's NYUD_MT (``data/nyud.py``): ``root/gt_sets/{split}.txt`` lists ids;
    ``images/{id}.jpg``, ``segmentation/{id}.png`` (0 void, 1..40 -> classes 0..39), ``depth/{id}.npy``
    (metres), ``normals/{id}.npy`` ((H, W, 3) in [-1, 1]), ``edge/{id}.npy`` (H, W)."""
    root = Path(root)
    ids_file = _need(root / "gt_sets" / f"{split}.txt", "split list")
    ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise DenseFormatError(ids_file, "lists no images")
    files = {"image": ("images", ".jpg"), "seg": ("segmentation", ".png"), "depth": ("depth", ".npy"),
             "normal": ("normals", ".npy"), "edge": ("edge", ".npy")}
    samples = []
    for i in ids:
        s = {k: root / d / f"{i}{ext}" for k, (d, ext) in files.items() if k == "image" or k in tasks}
        for k, p in s.items():
            _need(p, f"{k} file of id {i!r} (listed in {ids_file.name})")
        samples.append(s)

    def load(s, tasks):
        image = _image(_png(s["image"], "RGB"), s["image"])
        hw = tuple(image.shape[-2:])
        targets = {}
        for t in tasks:
            p = s[t]
            if t == "seg":
                raw = _shape(_png(p), p, "segmentation", hw, None).astype(np.int64)
                targets[t] = _labels(raw - 1, p, 40)  # 0 (void) -> -1
            elif t == "depth":
                targets[t] = _depth(_npy(p), p, hw)
            elif t == "normal":
                targets[t] = _unit_normals(_shape(_npy(p), p, "normals", hw, 3), p)
            else:
                targets[t] = _channel(_npy(p), p, "edge", hw)
        return image, targets, None

    return DenseDataset(samples, load, tasks, transform, 40, "NYUD_MT", available=("seg", "depth", "normal", "edge"))


# --- Taskonomy as AdaShare reads it -------------------------------------------------------------


def read_taskonomy(root: str | os.PathLike, split: str = "train", tasks: Sequence[str] = ("seg", "normal", "depth", "keypoint", "edge"),
                   json_name: str = "taskonomy.json", num_classes: int = 17, transform: Callable | None = None) -> DenseDataset:
    """Tiny Taskonomy as AdaShare reads it (``dataloaders/taskonomy_dataloader.py``): ``root/json_name`` =
    ``{split: [[img, seg, normal, depth, keypoint, edge], ...]}`` (PNG paths) and
    ``root/semseg_prior_factor.npy``. Values as AdaShare feeds its losses (its Table 4 is in this space):

    * seg: PNG ids, 0 unlabelled (-> -1), ``k`` -> class ``k - 1``; ``weights["seg"]`` = the prior factor of
      each pixel's class (0 where unlabelled): AdaShare's rebalanced mask;
    * normal: ``2 x / 255 - 1``, 0 where the depth is missing (AdaShare masks normals with the depth mask);
    * depth: 16-bit PNG, ``log(1 + d) / log(2^16)``, 0 where ``d >= 64500``;
    * keypoint, edge: 16-bit PNGs ``/ 2^16``, clipped to (0, 0.005) and (0, 0.08) and rescaled to [-1, 1].

    Images are returned at their stored size (AdaShare resizes to 256 x 256 with nearest neighbours).
    """
    root = Path(root)
    groups = _json_groups(root / json_name, split, 6)
    prior_path = _need(root / "semseg_prior_factor.npy", "segmentation prior factors")
    prior = np.asarray(_npy(prior_path), np.float64).reshape(-1)
    if prior.size < num_classes:
        raise DenseFormatError(prior_path, f"holds {prior.size} factors for {num_classes} classes")
    keys = ("image", "seg", "normal", "depth", "keypoint", "edge")
    samples = [dict(zip(keys, (root / p for p in g))) for g in groups]

    def rescale(x, lo, hi):
        return (np.clip(x, lo, hi) - lo) / (hi - lo) * 2.0 - 1.0

    def load(s, tasks):
        image = _image(_png(s["image"], "RGB"), s["image"])
        hw = tuple(image.shape[-2:])
        targets, weights = {}, {}
        depth_valid = None
        if "depth" in tasks or "normal" in tasks:
            raw_d = _shape(_png(s["depth"]), s["depth"], "depth", hw, None).astype(np.float64)
            depth_valid = raw_d < TASKONOMY_DEPTH_INVALID
        for t in tasks:
            p = s[t]
            if t == "seg":
                raw = _shape(_png(p), p, "segmentation", hw, None).astype(np.int64)
                seg = _labels(raw - 1, p, num_classes)
                targets[t] = seg
                weights[t] = torch.from_numpy(np.where(raw > 0, prior[np.clip(raw - 1, 0, None)], 0.0).astype(np.float32))
            elif t == "normal":
                n = _shape(_png(p, "RGB"), p, "normal", hw, 3).astype(np.float64) / 255.0 * 2.0 - 1.0
                n[~depth_valid] = 0.0
                targets[t] = torch.from_numpy(np.ascontiguousarray(n.transpose(2, 0, 1), dtype=np.float32))
            elif t == "depth":
                d = np.where(depth_valid, np.log1p(raw_d) / np.log(2.0**16), 0.0)
                targets[t] = torch.from_numpy(d.astype(np.float32))[None]
            else:
                x = _shape(_png(p), p, t, hw, None).astype(np.float64) / 2.0**16
                lo, hi = (0.0, 0.005) if t == "keypoint" else (0.0, 0.08)
                targets[t] = torch.from_numpy(rescale(x, lo, hi).astype(np.float32))[None]
        return image, targets, weights

    return DenseDataset(samples, load, tasks, transform, num_classes, "Taskonomy", available=keys[1:])


#: format name -> reader (the bundle's ``dataset`` config value)
DENSE_DATASETS = {
    "synthetic": read_mtan_nyuv2,
    "mtan_nyuv2": read_mtan_nyuv2,
    "mtan_cityscapes": read_mtan_cityscapes,
    "adashare_nyuv2": read_adashare_nyuv2,
    "nyud_mt": read_nyud_mt,
    "taskonomy": read_taskonomy,
}
