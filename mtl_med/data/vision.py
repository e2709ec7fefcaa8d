"""Readers for the vision benchmarks of the papers, from their published on-disk formats.

Every reader returns a :class:`MultiTaskImageDataset`; an item is
``{"image": float tensor (C, H, W) in [0, 1], "targets": {task: tensor}, "index": int}``.
Binary targets are ``int64`` 0/1, regression targets ``float32``. Nothing is downloaded: point the
readers at local copies. A missing file raises :class:`VisionFileNotFoundError`, a malformed one
:class:`VisionFormatError`; both name the file and the problem.

* :func:`load_digits_tasks`: scikit-learn's bundled 8x8 digits as ten one-vs-all tasks (the default).
* :func:`load_placed_digits`: the digits pasted at random places; a heterogeneous (or duplicate) task pair.
* :func:`read_utkface`: age (divided by 100, SFG appendix A.2) and gender from the file names.
* :func:`read_celeba`: 40 binary attributes, official partition.
* :func:`read_cifar10`: python pickled batches, ten one-vs-all tasks.
* :func:`read_mnist`: (Fashion-)MNIST IDX files, ten one-vs-all tasks.
* :func:`read_cub`: CUB-200-2011, 312 binary attributes, official train/test split.
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import struct
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mtl_med.errors import InputError

__all__ = [
    "VisionFormatError",
    "VisionFileNotFoundError",
    "MultiTaskImageDataset",
    "seeded_split",
    "load_digits_tasks",
    "load_placed_digits",
    "read_utkface",
    "parse_utkface_name",
    "read_celeba",
    "read_cifar10",
    "read_idx",
    "read_mnist",
    "read_cub",
    "FASHION_MNIST_CLASSES",
    "VISION_DATASETS",
    "load_vision_tasks",
    "as_ranking",
]

#: in-memory data sets keep their transformed images when they fit in this many bytes
CACHE_BYTES = 1 << 30

FASHION_MNIST_CLASSES = (
    "t_shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # fmt: skip
SPLITS = ("train", "val", "test")


class VisionFormatError(InputError):
    """A data set file exists but cannot be parsed; ``path`` names it."""


class VisionFileNotFoundError(InputError, FileNotFoundError):
    """A file or folder the data set format requires is missing; ``path`` names it."""

    def __init__(self, path, problem: str = "not found"):
        super().__init__(os.fspath(path), problem)


# --- data set ----------------------------------------------------------------------------------


def _read_image(path: str | os.PathLike, mode: str = "RGB", size: Sequence[int] | None = None) -> torch.Tensor:
    """An image file as a float tensor ``(C, H, W)`` in [0, 1] (Pillow; ``size`` is ``(H, W)``)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise VisionFileNotFoundError(path, "image file not found")
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size is not None:
                im = im.resize((int(size[1]), int(size[0])), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise VisionFormatError(path, f"cannot decode image ({e})") from e
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class MultiTaskImageDataset(Dataset):
    """Images with a dict of per-task targets.

    Args:
        images: a tensor ``(N, C, H, W)`` (``uint8`` scaled by 1/255, float used as is) or ``N``
            image paths, read lazily with Pillow.
        targets: task name -> ``(N,)`` array of targets.
        task_types: task name -> ``"binary"``, ``"regression"`` or ``"ranking"`` (graded
            targets; pairs of images are ordered by them).
        transform: optional callable applied to each image tensor.
        image_mode: Pillow mode for files (``"RGB"`` or ``"L"``).
        image_size: ``(H, W)`` to resize files to (``None``: as stored).
        cache_bytes: in-memory images under a deterministic transform are transformed once, here,
            when the result fits in this many bytes (0: transform every time an item is read).
    """

    def __init__(
        self,
        images: torch.Tensor | np.ndarray | Sequence[str | os.PathLike],
        targets: Mapping[str, np.ndarray | torch.Tensor],
        task_types: Mapping[str, str],
        transform: Callable | None = None,
        image_mode: str = "RGB",
        image_size: Sequence[int] | None = None,
        cache_bytes: int = CACHE_BYTES,
    ):
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        self.images = images if isinstance(images, torch.Tensor) else [os.fspath(p) for p in images]
        n = len(self.images)
        self.task_names = list(targets)
        self.task_types = {t: task_types[t] for t in self.task_names}
        self.targets = {}
        for t, v in targets.items():
            v = torch.as_tensor(np.asarray(v))
            if v.shape[0] != n:
                raise ValueError(f"task {t!r} has {v.shape[0]} targets for {n} images")
            self.targets[t] = v.long() if self.task_types[t] == "binary" else v.float()
        self.transform, self.image_mode, self.image_size = transform, image_mode, image_size
        self.cache_bytes, self.cached = int(cache_bytes), None
        if self.cache_bytes > 0 and isinstance(self.images, torch.Tensor) and n and _deterministic(transform):
            from monai.data import get_track_meta, set_track_meta

            # in-memory images under a deterministic transform: transform each image once, not every epoch.
            # They carry no metadata to track, and MONAI's tracking is most of a small image's cost (6x).
            tracking = get_track_meta()
            set_track_meta(False)
            try:
                first = self._load(0)
                if first.numel() * first.element_size() * n <= self.cache_bytes:
                    self.cached = torch.stack([first, *(self._load(i) for i in range(1, n))])
            finally:
                set_track_meta(tracking)

    def _load(self, i: int) -> torch.Tensor:
        x = self.image(i)
        return x if self.transform is None else self.transform(x)

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> torch.Tensor:
        if isinstance(self.images, torch.Tensor):
            x = self.images[i]
            return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
        return _read_image(self.images[i], self.image_mode, self.image_size)

    def __getitem__(self, i: int) -> dict:
        x = self.cached[i] if self.cached is not None else self._load(i)
        return {"image": x, "targets": {t: v[i] for t, v in self.targets.items()}, "index": int(i)}

    def subset(self, indices: Sequence[int] | np.ndarray) -> MultiTaskImageDataset:
        """A new data set holding ``indices`` (keeps tensors in memory, paths lazy)."""
        idx = np.asarray(indices, dtype=np.int64)
        imgs = self.images[torch.from_numpy(idx)] if isinstance(self.images, torch.Tensor) else [self.images[i] for i in idx]
        out = MultiTaskImageDataset(
            imgs, {t: v[torch.from_numpy(idx)] for t, v in self.targets.items()}, self.task_types, self.transform, self.image_mode,
            self.image_size, 0 if self.cached is not None else self.cache_bytes,
        )
        if self.cached is not None:  # the transformed images are already at hand
            out.cache_bytes, out.cached = self.cache_bytes, self.cached[torch.from_numpy(idx)]
        return out


def _deterministic(transform: Callable | None) -> bool:
    """True when ``transform`` draws nothing at random (no MONAI ``Randomizable`` inside)."""
    from monai.transforms import Compose, Randomizable

    if transform is None:
        return True
    parts = transform.flatten().transforms if isinstance(transform, Compose) else (transform,)
    return not any(isinstance(t, Randomizable) for t in parts)


def seeded_split(n: int, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0) -> dict[str, np.ndarray]:
    """Disjoint ``train``/``val``/``test`` index arrays from a seeded permutation of ``range(n)``."""
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or (f < 0).any() or not np.isclose(f.sum(), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    perm = np.random.default_rng(seed).permutation(n)
    n_train, n_val = int(round(f[0] * n)), int(round(f[1] * n))
    n_val = min(n_val, n - n_train)
    return {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _official_with_val(train_idx: np.ndarray, test_idx: np.ndarray, split: str, val_fraction: float, seed: int) -> np.ndarray:
    """Official train/test split; ``val`` is a seeded ``val_fraction`` of the training part."""
    _check_split(split)
    if split == "test":
        return test_idx
    if val_fraction <= 0:
        if split == "val":
            raise ValueError("this data set has no official validation split: pass val_fraction > 0")
        return train_idx
    perm = np.random.default_rng(seed).permutation(len(train_idx))
    n_val = int(round(val_fraction * len(train_idx)))
    return np.sort(train_idx[perm[:n_val]] if split == "val" else train_idx[perm[n_val:]])


def _one_vs_all(labels: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    return {name: (labels == k).astype(np.int64) for k, name in enumerate(names)}


def _find(root: Path, candidates: Sequence[str], what: str) -> Path:
    for c in candidates:
        p = root / c
        if p.exists():
            return p
    raise VisionFileNotFoundError(root / candidates[0], f"{what} not found (looked for {', '.join(candidates)} under {root})")


def _root(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise VisionFileNotFoundError(root, "data set folder not found")
    return root


# --- scikit-learn digits -----------------------------------------------------------------------


def load_digits_tasks(
    split: str = "train",
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    transform: Callable | None = None,
    digits: Sequence[int] | None = None,
) -> MultiTaskImageDataset:
    """scikit-learn's bundled 8x8 digits (1797 images, no download) as ten binary one-vs-all tasks
    ``digit_0`` .. ``digit_9`` (the homogeneous set-up of Task Routing / Selective Sharing), with a
    seeded ``train``/``val``/``test`` split. Images are ``(1, 8, 8)`` in [0, 1]. ``digits`` keeps the
    tasks of those digits only (every image stays)."""
    from sklearn.datasets import load_digits

    _check_split(split)
    digits = list(range(10)) if digits is None else [int(k) for k in digits]
    if not digits or len(set(digits)) != len(digits) or not all(0 <= k <= 9 for k in digits):
        raise ValueError(f"digits must be distinct digits 0-9, got {digits}")
    d = load_digits()
    idx = np.sort(seeded_split(len(d.target), fractions, seed)[split])
    images = torch.from_numpy(d.images[idx].astype(np.float32) / 16.0).unsqueeze(1)
    targets = {f"digit_{k}": (d.target[idx] == k).astype(np.int64) for k in digits}
    return MultiTaskImageDataset(images, targets, dict.fromkeys(targets, "binary"), transform)


#: tasks of :func:`load_placed_digits`: name -> (type, target from (digit, column offset, row offset, free offsets))
PLACED_TASKS = {
    "column": ("regression", lambda d, c, r, m: c / m),
    "row": ("regression", lambda d, c, r, m: r / m),
    "odd": ("binary", lambda d, c, r, m: d % 2),
    "large": ("binary", lambda d, c, r, m: (d >= 5).astype(np.int64)),
    # where as a yes/no question, so a set of "where" and "what" tasks shares one accuracy metric
    "left": ("binary", lambda d, c, r, m: (2 * c < m).astype(np.int64)),
    "top": ("binary", lambda d, c, r, m: (2 * r < m).astype(np.int64)),
}


def load_placed_digits(
    split: str = "train",
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    transform: Callable | None = None,
    tasks: Sequence[str] = ("column", "odd"),
    canvas: int = 16,
) -> MultiTaskImageDataset:
    """scikit-learn's digits pasted at a random place of a ``canvas`` x ``canvas`` image: a pair of
    heterogeneous tasks like the SFG paper's age + gender (a regression and a classification that
    share strokes and edges but need different deep features: where the digit is is translation
    equivariant, what it is translation invariant).

    ``tasks`` picks from :data:`PLACED_TASKS` (``column``/``row``: the offset divided by the largest
    offset, in [0, 1]; ``left``/``top``: whether that offset is below half the largest; ``odd``,
    ``large``: binary); ``"name_k"`` is a duplicate of ``name`` (SFG
    appendix E trains two copies of one task). Offsets are drawn once per image (seed 1234 +
    ``seed``), so the splits agree."""
    from sklearn.datasets import load_digits

    _check_split(split)
    kinds = [t.split("_")[0] for t in tasks]
    if len(set(tasks)) != len(tasks) or not tasks or any(k not in PLACED_TASKS for k in kinds):
        raise ValueError(f"tasks must be distinct names of {sorted(PLACED_TASKS)} (a '_k' suffix duplicates one), got {list(tasks)}")
    if canvas < 9:
        raise ValueError(f"canvas must be at least 9 pixels (the digits are 8x8), got {canvas}")
    d, free = load_digits(), canvas - 8
    offsets = np.random.default_rng(1234 + seed).integers(0, free + 1, size=(len(d.target), 2))
    idx = np.sort(seeded_split(len(d.target), fractions, seed)[split])
    images = np.zeros((len(idx), 1, canvas, canvas), np.float32)
    for j, i in enumerate(idx):
        r, c = offsets[i]
        images[j, 0, r : r + 8, c : c + 8] = d.images[i] / 16.0
    digit, col, row = d.target[idx], offsets[idx, 1].astype(np.float32), offsets[idx, 0].astype(np.float32)
    targets = {t: PLACED_TASKS[k][1](digit, col, row, free) for t, k in zip(tasks, kinds)}
    return MultiTaskImageDataset(torch.from_numpy(images), targets, {t: PLACED_TASKS[k][0] for t, k in zip(tasks, kinds)}, transform)


# --- UTKFace -----------------------------------------------------------------------------------

_UTK_RE = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)")


def parse_utkface_name(name: str) -> tuple[int, int, int]:
    """``[age]_[gender]_[race]_[date&time].jpg`` -> ``(age, gender, race)``; gender 0 male, 1 female,
    race 0..4. Raises ``ValueError`` for other names."""
    m = _UTK_RE.match(name)
    if not m:
        raise ValueError(f"file name {name!r} is not [age]_[gender]_[race]_[date&time].jpg")
    age, gender, race = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if gender not in (0, 1) or not 0 <= race <= 4 or not 0 <= age <= 130:
        raise ValueError(f"file name {name!r}: age {age}, gender {gender} or race {race} out of range")
    return age, gender, race


def read_utkface(
    root: str | os.PathLike,
    split: str = "train",
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    age_scale: float = 100.0,
    image_size: Sequence[int] | None = None,
    strict: bool = True,
    transform: Callable | None = None,
) -> MultiTaskImageDataset:
    """UTKFace: tasks ``age`` (regression, years / ``age_scale``; SFG appendix A.2 divides by 100)
    and ``gender`` (binary, 1 = female), parsed from the ``.jpg`` file names in ``root``; a seeded
    70/15/15 split (SFG section 4). A malformed name raises :class:`VisionFormatError`, or is
    skipped with a warning when ``strict`` is False (the public release has a few)."""
    _check_split(split)
    root = _root(root)
    files = sorted(p for p in root.iterdir() if p.is_file() and p.name.lower().endswith((".jpg", ".jpeg", ".png")))
    if not files:
        raise VisionFileNotFoundError(root, "no UTKFace images (*.jpg) in folder")
    paths, ages, genders = [], [], []
    for p in files:
        try:
            age, gender, _ = parse_utkface_name(p.name)
        except ValueError as e:
            if strict:
                raise VisionFormatError(p, str(e)) from None
            warnings.warn(f"skipping {p}: {e}", stacklevel=2)
            continue
        paths.append(p)
        ages.append(age / age_scale)
        genders.append(gender)
    idx = np.sort(seeded_split(len(paths), fractions, seed)[split])
    targets = {"age": np.asarray(ages, np.float32)[idx], "gender": np.asarray(genders, np.int64)[idx]}
    return MultiTaskImageDataset(
        [paths[i] for i in idx], targets, {"age": "regression", "gender": "binary"}, transform, "RGB", image_size
    )


# --- CelebA ------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[str]:
    try:
        with open(path) as f:
            return [ln.strip() for ln in f if ln.strip()]
    except UnicodeDecodeError as e:
        raise VisionFormatError(path, f"not a text file ({e})") from e


def read_celeba(
    root: str | os.PathLike,
    split: str = "train",
    attributes: Sequence[str] | None = None,
    image_dir: str | None = None,
    image_size: Sequence[int] | None = None,
    transform: Callable | None = None,
) -> MultiTaskImageDataset:
    """CelebA: 40 binary attributes from ``list_attr_celeba.txt`` (``-1``/``1`` -> 0/1), official
    partition from ``list_eval_partition.txt`` (0 train, 1 val, 2 test). Files are looked up in
    ``root`` and in the release's ``Anno/``, ``Eval/``, ``Img/`` folders; ``attributes`` selects
    tasks (default all 40, in file order)."""
    _check_split(split)
    root = _root(root)
    attr_path = _find(root, ["list_attr_celeba.txt", "Anno/list_attr_celeba.txt"], "CelebA attribute file")
    part_path = _find(root, ["list_eval_partition.txt", "Eval/list_eval_partition.txt"], "CelebA partition file")
    img_dir = root / image_dir if image_dir else _find(root, ["img_align_celeba", "Img/img_align_celeba"], "CelebA image folder")

    lines = _read_lines(attr_path)
    if len(lines) < 2:
        raise VisionFormatError(attr_path, "expected a count line and an attribute-name line")
    try:
        count = int(lines[0])
    except ValueError:
        raise VisionFormatError(attr_path, f"first line must be the image count, got {lines[0]!r}") from None
    names = lines[1].split()
    rows = lines[2:]
    if len(rows) != count:
        raise VisionFormatError(attr_path, f"header says {count} images, found {len(rows)} rows")
    files, values = [], np.empty((len(rows), len(names)), np.int64)
    for i, row in enumerate(rows):
        parts = row.split()
        if len(parts) != len(names) + 1:
            raise VisionFormatError(attr_path, f"line {i + 3}: expected a file name and {len(names)} values, got {len(parts)} fields")
        try:
            v = [int(x) for x in parts[1:]]
        except ValueError:
            raise VisionFormatError(attr_path, f"line {i + 3}: attribute values must be -1 or 1") from None
        if any(x not in (-1, 1) for x in v):
            raise VisionFormatError(attr_path, f"line {i + 3}: attribute values must be -1 or 1")
        files.append(parts[0])
        values[i] = v
    partition = {}
    for i, row in enumerate(_read_lines(part_path)):
        parts = row.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise VisionFormatError(part_path, f"line {i + 1}: expected '<file> <0|1|2>', got {row!r}")
        partition[parts[0]] = int(parts[1])
    missing = [f for f in files if f not in partition]
    if missing:
        raise VisionFormatError(part_path, f"no partition for {len(missing)} images, e.g. {missing[0]}")
    want = SPLITS.index(split)
    idx = np.array([i for i, f in enumerate(files) if partition[f] == want], dtype=np.int64)
    attributes = list(attributes) if attributes is not None else names
    unknown = [a for a in attributes if a not in names]
    if unknown:
        raise ValueError(f"unknown CelebA attributes {unknown}; {attr_path} has {names}")
    targets = {a: (values[idx, names.index(a)] > 0).astype(np.int64) for a in attributes}
    return MultiTaskImageDataset(
        [img_dir / files[i] for i in idx], targets, dict.fromkeys(attributes, "binary"), transform, "RGB", image_size
    )


# --- CIFAR-10 ----------------------------------------------------------------------------------


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise VisionFileNotFoundError(path, "CIFAR-10 batch file not found")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # pickle raises many types for corrupt input
        raise VisionFormatError(path, f"not a CIFAR-10 python pickle ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise VisionFormatError(path, "not a CIFAR-10 python pickle (no dictionary)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def read_cifar10(
    root: str | os.PathLike,
    split: str = "train",
    val_fraction: float = 0.0,
    seed: int = 0,
    transform: Callable | None = None,
) -> MultiTaskImageDataset:
    """CIFAR-10 from the python batches (``data_batch_1..5``, ``test_batch``, ``batches.meta``, in
    ``root`` or ``root/cifar-10-batches-py``) as ten binary one-vs-all tasks named after
    ``label_names``. ``val`` is a seeded ``val_fraction`` of the training batches."""
    _check_split(split)
    root = _root(root)
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    meta_path = folder / "batches.meta"
    meta = _unpickle(meta_path)
    if "label_names" not in meta:
        raise VisionFormatError(meta_path, "no 'label_names' entry")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"]]
    files = [f"data_batch_{i}" for i in range(1, 6)] if split != "test" else ["test_batch"]
    images, labels = [], []
    for name in files:
        p = folder / name
        d = _unpickle(p)
        if "data" not in d or "labels" not in d:
            raise VisionFormatError(p, "missing 'data' or 'labels' entry")
        data, lab = np.asarray(d["data"]), np.asarray(d["labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != lab.shape[0]:
            raise VisionFormatError(p, f"'data' must be (N, 3072) uint8 with N labels, got {data.shape} and {lab.shape[0]} labels")
        if lab.size and (lab.min() < 0 or lab.max() >= len(names)):
            raise VisionFormatError(p, f"labels outside 0..{len(names) - 1}")
        images.append(data.astype(np.uint8).reshape(-1, 3, 32, 32))
        labels.append(lab)
    x, y = np.concatenate(images), np.concatenate(labels)
    all_idx = np.arange(len(y))
    idx = all_idx if split == "test" else _official_with_val(all_idx, all_idx[:0], split, val_fraction, seed)
    return MultiTaskImageDataset(torch.from_numpy(x[idx]), _one_vs_all(y[idx], names), dict.fromkeys(names, "binary"), transform)


# --- (Fashion-)MNIST ---------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (LeCun's MNIST format; gzip-compressed when the name ends in ``.gz``)."""
    path = Path(path)
    if not path.is_file():
        raise VisionFileNotFoundError(path, "IDX file not found")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise VisionFormatError(path, f"cannot read ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise VisionFormatError(path, "bad IDX magic number")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise VisionFormatError(path, "truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise VisionFormatError(path, f"header gives shape {shape} ({expected} bytes) but the file holds {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def read_mnist(
    root: str | os.PathLike,
    split: str = "train",
    variant: str = "fashion",
    val_fraction: float = 0.0,
    seed: int = 0,
    transform: Callable | None = None,
) -> MultiTaskImageDataset:
    """Fashion-MNIST (``variant="fashion"``, tasks named after the classes) or MNIST
    (``variant="mnist"``, tasks ``digit_0``..``digit_9``) from the IDX files
    ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` in ``root`` (or ``root/raw``), as ten
    binary one-vs-all tasks. ``val`` is a seeded ``val_fraction`` of the training set."""
    _check_split(split)
    if variant not in ("fashion", "mnist"):
        raise ValueError(f"variant must be 'fashion' or 'mnist', got {variant!r}")
    root = _root(root)
    folder = root / "raw" if (root / "raw").is_dir() else root
    prefix = "t10k" if split == "test" else "train"
    img_path = _find(folder, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images-idx3-ubyte.gz"], f"{prefix} image IDX file")
    lab_path = _find(folder, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels-idx1-ubyte.gz"], f"{prefix} label IDX file")
    x, y = read_idx(img_path), read_idx(lab_path).astype(np.int64)
    if x.ndim != 3:
        raise VisionFormatError(img_path, f"expected (N, H, W) images, got shape {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise VisionFormatError(lab_path, f"expected {x.shape[0]} labels, got shape {y.shape}")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise VisionFormatError(lab_path, "labels outside 0..9")
    names = list(FASHION_MNIST_CLASSES) if variant == "fashion" else [f"digit_{k}" for k in range(10)]
    all_idx = np.arange(len(y))
    idx = all_idx if split == "test" else _official_with_val(all_idx, all_idx[:0], split, val_fraction, seed)
    images = torch.from_numpy(x[idx].astype(np.uint8)).unsqueeze(1)
    return MultiTaskImageDataset(images, _one_vs_all(y[idx], names), dict.fromkeys(names, "binary"), transform)


# --- CUB-200-2011 ------------------------------------------------------------------------------


def _int_table(path: Path, min_fields: int, what: str) -> list[list[str]]:
    if not path.is_file():
        raise VisionFileNotFoundError(path, f"{what} not found")
    out = []
    for i, row in enumerate(_read_lines(path)):
        parts = row.split()
        if len(parts) < min_fields:
            raise VisionFormatError(path, f"line {i + 1}: expected at least {min_fields} fields, got {row!r}")
        out.append(parts)
    return out


def _to_int(path: Path, line: int, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise VisionFormatError(path, f"line {line}: expected an integer, got {text!r}") from None


def read_cub(
    root: str | os.PathLike,
    split: str = "train",
    num_attributes: int | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    image_size: Sequence[int] | None = None,
    transform: Callable | None = None,
    ranking: bool = False,
) -> MultiTaskImageDataset:
    """CUB-200-2011 (``root`` = the ``CUB_200_2011`` folder): 312 binary attributes from
    ``attributes/image_attribute_labels.txt`` (``<image_id> <attribute_id> <is_present> ...``),
    images from ``images.txt`` under ``images/``, the official split of ``train_test_split.txt``
    (1 = train). Tasks follow the annotation file order (Task Routing, section 4.1);
    ``num_attributes`` keeps the first ones. ``ranking=True`` poses each attribute as a ranking
    task (Selective Sharing, section 4: pairs of images ordered by the attribute's presence): the
    target grades presence with the annotator's certainty (4th column: 1 not visible, 2 guessing,
    3 probably, 4 definitely), ``+(c - 1)`` when present and ``-(c - 1)`` when absent, so a definite
    presence outranks a guess and "not visible" is 0. The paper does not say how it orders pairs;
    this is our reading. Names come from ``attributes.txt`` when present
    (in ``root``, ``root/attributes`` or the parent folder), else ``attr_001``..."""
    _check_split(split)
    root = _root(root)
    images_txt, split_txt = root / "images.txt", root / "train_test_split.txt"
    labels_txt = root / "attributes" / "image_attribute_labels.txt"
    img_rows = _int_table(images_txt, 2, "CUB images.txt")
    ids = [_to_int(images_txt, i + 1, r[0]) for i, r in enumerate(img_rows)]
    paths = {i: root / "images" / r[1] for i, r in zip(ids, img_rows)}
    is_train = {}
    for i, r in enumerate(_int_table(split_txt, 2, "CUB train_test_split.txt")):
        flag = _to_int(split_txt, i + 1, r[1])
        if flag not in (0, 1):
            raise VisionFormatError(split_txt, f"line {i + 1}: split flag must be 0 or 1, got {flag}")
        is_train[_to_int(split_txt, i + 1, r[0])] = flag == 1
    missing = [i for i in ids if i not in is_train]
    if missing:
        raise VisionFormatError(split_txt, f"no split for {len(missing)} images, e.g. image id {missing[0]}")
    fields = 4 if ranking else 3
    rows = _int_table(labels_txt, fields, "CUB attribute labels")
    triples = np.array([[_to_int(labels_txt, i + 1, x) for x in r[:fields]] for i, r in enumerate(rows)], dtype=np.int64)
    n_attr = int(triples[:, 1].max()) if len(triples) else 0
    if not set(np.unique(triples[:, 2]).tolist()) <= {0, 1}:
        raise VisionFormatError(labels_txt, "is_present must be 0 or 1")
    row_of = {img: k for k, img in enumerate(ids)}
    unknown = set(np.unique(triples[:, 0]).tolist()) - set(row_of)
    if unknown:
        raise VisionFormatError(labels_txt, f"image ids not in images.txt, e.g. {min(unknown)}")
    if triples[:, 1].min() < 1:
        raise VisionFormatError(labels_txt, "attribute ids start at 1")
    labels = np.full((len(ids), n_attr), -1, dtype=np.int64)
    labels[[row_of[i] for i in triples[:, 0]], triples[:, 1] - 1] = triples[:, 2]
    if ranking:
        if not set(np.unique(triples[:, 3]).tolist()) <= {1, 2, 3, 4}:
            raise VisionFormatError(labels_txt, "certainty_id must be 1, 2, 3 or 4")
        grades = np.zeros((len(ids), n_attr), dtype=np.float32)
        grades[[row_of[i] for i in triples[:, 0]], triples[:, 1] - 1] = (2 * triples[:, 2] - 1) * (triples[:, 3] - 1)
    if (labels < 0).any():
        r, c = np.argwhere(labels < 0)[0]
        raise VisionFormatError(labels_txt, f"no label for image id {ids[r]}, attribute {c + 1}")

    names = [f"attr_{k + 1:03d}" for k in range(n_attr)]
    for cand in (root / "attributes.txt", root / "attributes" / "attributes.txt", root.parent / "attributes.txt"):
        if cand.is_file():
            named = {}
            for row in _read_lines(cand):
                parts = row.split(maxsplit=1)
                if len(parts) == 2 and parts[0].isdigit():
                    named[int(parts[0])] = parts[1]
            named_list = [named.get(k + 1, names[k]) for k in range(n_attr)]
            if len(set(named_list)) == n_attr:  # unique names only, else keep attr_###
                names = named_list
            break
    keep = n_attr if num_attributes is None else int(num_attributes)
    if not 1 <= keep <= n_attr:
        raise ValueError(f"num_attributes must be in [1, {n_attr}], got {num_attributes}")
    order = np.arange(len(ids))
    train_idx = order[[is_train[i] for i in ids]]
    test_idx = order[[not is_train[i] for i in ids]]
    idx = _official_with_val(train_idx, test_idx, split, val_fraction, seed)
    targets = {names[a]: (grades if ranking else labels)[idx, a] for a in range(keep)}
    return MultiTaskImageDataset(
        [paths[ids[i]] for i in idx], targets, dict.fromkeys(targets, "ranking" if ranking else "binary"), transform, "RGB", image_size
    )


# --- one entry point for configs ---------------------------------------------------------------

#: dataset name -> (reader, needs ``data_root``, default keyword arguments)
VISION_DATASETS: dict[str, tuple[Callable, bool, dict]] = {
    "digits": (load_digits_tasks, False, {}),
    "placed_digits": (load_placed_digits, False, {}),
    "utkface": (read_utkface, True, {}),
    "celeba": (read_celeba, True, {}),
    "cifar10": (read_cifar10, True, {"val_fraction": 0.1}),
    "mnist": (read_mnist, True, {"variant": "mnist", "val_fraction": 0.1}),
    "fashion_mnist": (read_mnist, True, {"variant": "fashion", "val_fraction": 0.1}),
    "cub": (read_cub, True, {"val_fraction": 0.1}),
}


def load_vision_tasks(
    dataset: str,
    split: str = "train",
    data_root: str | os.PathLike | None = None,
    transform: Callable | None = None,
    ranking_tasks: Sequence[str] | None = None,
    **kwargs,
) -> MultiTaskImageDataset:
    """The ``split`` of a vision benchmark by name (a key of :data:`VISION_DATASETS`).

    ``data_root`` is the local copy's folder (not used by ``digits``, which scikit-learn bundles);
    ``kwargs`` go to the reader (e.g. ``seed``, ``image_size``, ``num_attributes``) over the
    defaults of :data:`VISION_DATASETS` (a 10% validation part for the sets without an official one).
    ``ranking_tasks`` names tasks to pose as ranking tasks (eq. 7 of Selective Sharing: their targets
    order pairs of images; e.g. UTKFace's ``age``).
    """
    if dataset not in VISION_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(VISION_DATASETS)}")
    reader, needs_root, defaults = VISION_DATASETS[dataset]
    args = {**defaults, **kwargs}
    if needs_root:
        if not data_root:
            raise ValueError(f"dataset {dataset!r} needs data_root (the folder of a local copy; nothing is downloaded)")
        ds = reader(data_root, split=split, transform=transform, **args)
    else:
        ds = reader(split=split, transform=transform, **args)
    return as_ranking(ds, ranking_tasks or ())


def as_ranking(ds: MultiTaskImageDataset, tasks: Sequence[str]) -> MultiTaskImageDataset:
    """``ds`` with ``tasks`` posed as ranking tasks (targets as floats; they order image pairs)."""
    unknown = [t for t in tasks if t not in ds.task_types]
    if unknown:
        raise ValueError(f"ranking tasks {unknown} are not tasks of the data set; its tasks: {ds.task_names}")
    for t in tasks:
        ds.task_types[t] = "ranking"
        ds.targets[t] = ds.targets[t].float()
    return ds
