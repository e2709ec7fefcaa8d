"""Readers of the vision benchmarks, on miniature files in each published format."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from mtl_med.data.vision import (
    FASHION_MNIST_CLASSES,
    VisionFileNotFoundError,
    VisionFormatError,
    load_digits_tasks,
    load_placed_digits,
    load_vision_tasks,
    parse_utkface_name,
    read_celeba,
    read_cifar10,
    read_cub,
    read_idx,
    read_mnist,
    read_utkface,
    seeded_split,
)


def _png(path, value, size=(4, 5)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


# --- digits ------------------------------------------------------------------------------------


def test_digits_ten_binary_tasks_with_a_seeded_split():
    tr, va, te = (load_digits_tasks(s, seed=1) for s in ("train", "val", "test"))
    assert len(tr) + len(va) + len(te) == 1797
    assert tr.task_names == [f"digit_{k}" for k in range(10)]
    item = tr[0]
    assert item["image"].shape == (1, 8, 8) and 0 <= item["image"].min() and item["image"].max() <= 1
    onehot = torch.stack([item["targets"][t] for t in tr.task_names])
    assert int(onehot.sum()) == 1  # one-vs-all: exactly one positive task per image
    assert torch.equal(load_digits_tasks("val", seed=1).images, va.images)
    assert not torch.equal(load_digits_tasks("val", seed=2).images, va.images)
    split = seeded_split(100, seed=0)
    assert sum(len(v) for v in split.values()) == 100
    assert len(set(split["train"]) & set(split["test"])) == 0



def test_placed_digits_pair_targets_follow_where_and_what_the_digit_is():
    ds = load_placed_digits("train", seed=0, tasks=["column", "odd", "odd_2"], canvas=12)
    assert ds.task_types == {"column": "regression", "odd": "binary", "odd_2": "binary"}
    for i in range(20):
        item = ds[i]
        img = item["image"][0]
        assert img.shape == (12, 12)
        cols = torch.nonzero(img.sum(0)).flatten()
        # the digit's ink lies inside its 8-wide box, which starts at column * 4
        start = round(float(item["targets"]["column"]) * 4)
        assert start <= int(cols.min()) and int(cols.max()) < start + 8
        assert torch.equal(item["targets"]["odd"], item["targets"]["odd_2"])  # a duplicate task
    # the offsets are drawn per image, so the same image is at the same place in every split's seed
    assert torch.equal(load_placed_digits("val", seed=0).images, load_placed_digits("val", seed=0).images)
    assert load_vision_tasks("placed_digits", "test", tasks=["row", "large"]).task_names == ["row", "large"]
    with pytest.raises(ValueError, match="distinct names"):
        load_placed_digits(tasks=["odd", "odd"])
    with pytest.raises(ValueError, match="distinct names"):
        load_placed_digits(tasks=["colour"])


def test_placed_digits_where_as_yes_no_agrees_with_the_offsets():
    ds = load_placed_digits("val", seed=1, tasks=["column", "row", "left", "top"], canvas=16)
    assert set(ds.task_types.values()) == {"regression", "binary"} and ds.task_types["left"] == "binary"
    col, row = (torch.stack([ds[i]["targets"][t] for i in range(len(ds))]) for t in ("column", "row"))
    left, top = (torch.stack([ds[i]["targets"][t] for i in range(len(ds))]) for t in ("left", "top"))
    assert torch.equal(left, (col < 0.5).long()) and torch.equal(top, (row < 0.5).long())
    assert 0.3 < left.float().mean() < 0.6 and 0.3 < top.float().mean() < 0.6  # both answers occur

# --- UTKFace -----------------------------------------------------------------------------------


def test_utkface_parses_names_scales_age_and_splits(tmp_path):
    names = [f"{age}_{g}_{r}_2017011{i}.jpg.chip.jpg" for i, (age, g, r) in enumerate([(25, 0, 1), (40, 1, 2), (1, 1, 0), (90, 0, 4), (33, 1, 3), (60, 0, 0)])]
    for i, n in enumerate(names):
        _png(tmp_path / n, 40 * i)
    ds = {s: read_utkface(tmp_path, s, seed=0, fractions=(0.5, 0.25, 0.25)) for s in ("train", "val", "test")}
    assert sum(len(d) for d in ds.values()) == 6
    everything = read_utkface(tmp_path, "train", fractions=(1.0, 0.0, 0.0))
    ages = sorted(round(float(a) * 100) for a in everything.targets["age"])
    assert ages == [1, 25, 33, 40, 60, 90]
    assert everything.task_types == {"age": "regression", "gender": "binary"}
    item = everything[0]
    assert item["image"].shape == (3, 4, 5) and item["targets"]["age"].dtype == torch.float32
    assert parse_utkface_name("25_1_3_20170116174525125.jpg") == (25, 1, 3)


def test_utkface_malformed_name_and_missing_folder(tmp_path):
    _png(tmp_path / "25_0_1_20170110.jpg", 10)
    _png(tmp_path / "39_1_20170116174525125.jpg.chip.jpg", 10)  # race missing
    with pytest.raises(VisionFormatError, match="39_1_20170116174525125"):
        read_utkface(tmp_path)
    with pytest.warns(UserWarning, match="skipping"):
        ds = read_utkface(tmp_path, fractions=(1.0, 0.0, 0.0), strict=False)
    assert len(ds) == 1
    with pytest.raises(VisionFileNotFoundError, match="nowhere"):
        read_utkface(tmp_path / "nowhere")


# --- CelebA ------------------------------------------------------------------------------------


def _celeba(root, attr_rows=None):
    names = ["5_o_Clock_Shadow", "Smiling", "Young"]
    rows = attr_rows or ["000001.jpg  1 -1  1", "000002.jpg -1  1  1", "000003.jpg -1 -1 -1"]
    (root / "Anno").mkdir(parents=True)
    (root / "Anno" / "list_attr_celeba.txt").write_text(f"{len(rows)}\n{' '.join(names)}\n" + "\n".join(rows) + "\n")
    (root / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n000003.jpg 2\n")
    for i in range(1, 4):
        _png(root / "img_align_celeba" / f"{i:06d}.jpg", 50 * i)


def test_celeba_attributes_and_official_partition(tmp_path):
    _celeba(tmp_path)
    train = read_celeba(tmp_path, "train")
    assert train.task_names == ["5_o_Clock_Shadow", "Smiling", "Young"]
    assert train.targets["Smiling"].tolist() == [0, 1] and train.targets["Young"].tolist() == [1, 1]
    test = read_celeba(tmp_path, "test", attributes=["Smiling"])
    assert len(test) == 1 and test.task_names == ["Smiling"] and test[0]["image"].shape[0] == 3
    assert len(read_celeba(tmp_path, "val")) == 0


def test_celeba_malformed_and_missing(tmp_path):
    _celeba(tmp_path / "a", ["000001.jpg 1 -1", "000002.jpg -1 1 1", "000003.jpg -1 -1 -1"])
    with pytest.raises(VisionFormatError, match="list_attr_celeba.txt.*line 3"):
        read_celeba(tmp_path / "a")
    _celeba(tmp_path / "b", ["000001.jpg 1 -1 2", "000002.jpg -1 1 1", "000003.jpg -1 -1 -1"])
    with pytest.raises(VisionFormatError, match="-1 or 1"):
        read_celeba(tmp_path / "b")
    _celeba(tmp_path / "c")
    (tmp_path / "c" / "list_eval_partition.txt").unlink()
    with pytest.raises(VisionFileNotFoundError, match="list_eval_partition"):
        read_celeba(tmp_path / "c")


# --- CIFAR-10 ----------------------------------------------------------------------------------


def _cifar(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": 2}, f)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = np.full((2, 3072), i, np.uint8)
        data[:, 1024:2048] = 200  # green plane
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [i % 10, (i + 1) % 10], b"batch_label": name.encode()}, f)
    return folder


def test_cifar10_batches_as_ten_one_vs_all_tasks(tmp_path):
    _cifar(tmp_path)
    train = read_cifar10(tmp_path, "train")
    assert len(train) == 10 and train.task_names[0] == "airplane" and len(train.task_names) == 10
    x = train[0]["image"]
    assert x.shape == (3, 32, 32) and float(x[1, 0, 0]) == pytest.approx(200 / 255) and float(x[0, 0, 0]) == 0
    assert train.targets["airplane"].tolist()[:2] == [1, 0] and train.targets["automobile"].tolist()[:2] == [0, 1]
    test = read_cifar10(tmp_path, "test")
    assert len(test) == 2 and test.targets["deer"].sum() == 0 and test.targets["dog"].tolist() == [1, 0]
    val = read_cifar10(tmp_path, "val", val_fraction=0.2, seed=0)
    rest = read_cifar10(tmp_path, "train", val_fraction=0.2, seed=0)
    assert len(val) == 2 and len(rest) == 8


def test_cifar10_malformed_and_missing(tmp_path):
    folder = _cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(VisionFormatError, match="data_batch_3"):
        read_cifar10(tmp_path)
    (folder / "batches.meta").unlink()
    with pytest.raises(VisionFileNotFoundError, match="batches.meta"):
        read_cifar10(tmp_path)


# --- (Fashion-)MNIST ---------------------------------------------------------------------------


def _idx(path, array, code=0x08, compress=False):
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(">u1").tobytes()
    (gzip.open if compress else open)(path, "wb").write(raw)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files(tmp_path, compress):
    ext = ".gz" if compress else ""
    imgs = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    _idx(tmp_path / f"train-images-idx3-ubyte{ext}", imgs, compress=compress)
    _idx(tmp_path / f"train-labels-idx1-ubyte{ext}", np.array([0, 9, 3], np.uint8), compress=compress)
    ds = read_mnist(tmp_path, "train", variant="fashion")
    assert ds.task_names == list(FASHION_MNIST_CLASSES)
    assert ds[1]["image"].shape == (1, 4, 4) and float(ds[1]["image"][0, 0, 0]) == pytest.approx(16 / 255)
    assert ds.targets["ankle_boot"].tolist() == [0, 1, 0] and ds.targets["t_shirt_top"].tolist() == [1, 0, 0]
    assert read_mnist(tmp_path, variant="mnist").task_names[3] == "digit_3"
    assert np.array_equal(read_idx(tmp_path / f"train-images-idx3-ubyte{ext}"), imgs)


def test_mnist_malformed_and_missing(tmp_path):
    _idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 4, 4), np.uint8))
    _idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, np.uint8))  # 2 labels for 3 images
    with pytest.raises(VisionFormatError, match="train-labels-idx1-ubyte.*3 labels"):
        read_mnist(tmp_path)
    (tmp_path / "bad-idx").write_bytes(struct.pack(">BBBBI", 0, 0, 0x08, 1, 10) + b"\x00" * 4)
    with pytest.raises(VisionFormatError, match="bad-idx.*bytes"):
        read_idx(tmp_path / "bad-idx")
    (tmp_path / "magic").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(VisionFormatError, match="magic"):
        read_idx(tmp_path / "magic")
    with pytest.raises(VisionFileNotFoundError, match="t10k-images"):
        read_mnist(tmp_path, "test")


# --- CUB-200-2011 ------------------------------------------------------------------------------


def _cub(root, n_attr=3, labels_text=None):
    root.mkdir(parents=True)
    (root / "attributes").mkdir()
    paths = ["001.Albatross/a_1.jpg", "001.Albatross/a_2.jpg", "002.Auklet/b_1.jpg", "002.Auklet/b_2.jpg"]
    (root / "images.txt").write_text("".join(f"{i + 1} {p}\n" for i, p in enumerate(paths)))
    (root / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n4 0\n")
    for i, p in enumerate(paths):
        _png(root / "images" / p, 60 * i)
    if labels_text is None:
        rng = np.random.default_rng(0)
        lines = []
        for img in range(1, 5):
            for a in range(1, n_attr + 1):
                lines.append(f"{img} {a} {int(rng.integers(0, 2))} 3 27.08")
        labels_text = "\n".join(lines) + "\n"
    (root / "attributes" / "image_attribute_labels.txt").write_text(labels_text)
    (root.parent / "attributes.txt").write_text("1 has_bill_shape::curved\n2 has_wing_color::blue\n3 has_size::small\n")


def test_cub_attributes_and_official_split(tmp_path):
    _cub(tmp_path / "CUB_200_2011")
    train = read_cub(tmp_path / "CUB_200_2011", "train")
    test = read_cub(tmp_path / "CUB_200_2011", "test", num_attributes=2)
    assert train.task_names == ["has_bill_shape::curved", "has_wing_color::blue", "has_size::small"]
    assert len(train) == 2 and len(test) == 2 and len(test.task_names) == 2
    assert train.images[1].endswith("002.Auklet/b_1.jpg")
    lines = (tmp_path / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt").read_text().split("\n")
    img3 = [int(l.split()[2]) for l in lines if l.startswith("3 ")]
    assert [int(train.targets[n][1]) for n in train.task_names] == img3
    assert train[0]["image"].shape == (3, 4, 5)


def test_cub_malformed_and_missing(tmp_path):
    _cub(tmp_path / "a" / "CUB_200_2011", labels_text="1 1 1 3 1.0\n1 2\n")
    with pytest.raises(VisionFormatError, match="image_attribute_labels.txt.*line 2"):
        read_cub(tmp_path / "a" / "CUB_200_2011")
    _cub(tmp_path / "b" / "CUB_200_2011", labels_text="1 1 1 3 1\n2 1 0 3 1\n3 1 1 3 1\n")  # image 4 lacks labels
    with pytest.raises(VisionFormatError, match="no label for image id 4"):
        read_cub(tmp_path / "b" / "CUB_200_2011")
    _cub(tmp_path / "c" / "CUB_200_2011")
    (tmp_path / "c" / "CUB_200_2011" / "train_test_split.txt").unlink()
    with pytest.raises(VisionFileNotFoundError, match="train_test_split.txt"):
        read_cub(tmp_path / "c" / "CUB_200_2011")


def test_missing_and_corrupt_image_files(tmp_path):
    _celeba(tmp_path)
    (tmp_path / "img_align_celeba" / "000002.jpg").write_bytes(b"garbage")
    ds = read_celeba(tmp_path, "train")
    assert ds[0]["image"].shape[0] == 3
    with pytest.raises(VisionFormatError, match="000002.jpg"):
        ds[1]
    (tmp_path / "img_align_celeba" / "000001.jpg").unlink()
    with pytest.raises(VisionFileNotFoundError, match="000001.jpg"):
        ds[0]


def test_cub_as_ranking_grades_presence_by_certainty(tmp_path):
    # image 1: present/definitely, image 3: absent/probably; attribute 2: present/guessing, absent/not visible
    text = "1 1 1 4 1\n1 2 1 2 1\n2 1 0 1 1\n2 2 0 1 1\n3 1 0 3 1\n3 2 0 1 1\n4 1 1 1 1\n4 2 1 3 1\n"
    _cub(tmp_path / "CUB_200_2011", n_attr=2, labels_text=text)
    train = read_cub(tmp_path / "CUB_200_2011", "train", ranking=True)
    assert set(train.task_types.values()) == {"ranking"}
    a1, a2 = (train.targets[n].tolist() for n in train.task_names)
    assert a1 == [3.0, -2.0] and a2 == [1.0, 0.0]  # images 1 and 3 are the training split
    bad = tmp_path / "bad" / "CUB_200_2011"
    _cub(bad, n_attr=2, labels_text=text.replace("1 1 1 4 1", "1 1 1 7 1"))
    with pytest.raises(VisionFormatError, match="certainty_id"):
        read_cub(bad, "train", ranking=True)


def test_load_vision_tasks_poses_named_tasks_as_ranking():
    ds = load_vision_tasks("digits", "val", ranking_tasks=["digit_3"])
    assert ds.task_types["digit_3"] == "ranking" and ds.targets["digit_3"].dtype == torch.float32
    assert ds.task_types["digit_4"] == "binary"
    with pytest.raises(ValueError, match="digit_x"):
        load_vision_tasks("digits", "val", ranking_tasks=["digit_x"])


def test_in_memory_images_are_transformed_once_under_a_deterministic_transform():
    from monai.transforms import Compose, RandFlip, Resize

    calls = []

    def counted(x):
        calls.append(1)
        return x * 2

    ds = load_digits_tasks("val", transform=Compose([Resize((12, 12)), counted]))
    n = len(ds)
    assert len(calls) == n and ds.cached is not None
    item = ds[5]
    assert len(calls) == n  # read from the cache
    assert torch.equal(item["image"], Compose([Resize((12, 12))])(ds.image(5)) * 2)
    sub = ds.subset([5, 7])
    assert torch.equal(sub[0]["image"], item["image"]) and len(calls) == n
    assert load_digits_tasks("val", transform=Compose([RandFlip(prob=0.5)])).cached is None  # random: every read draws
    small = load_digits_tasks("val", transform=counted)
    assert small.cached is not None
    from mtl_med.data.vision import MultiTaskImageDataset

    off = MultiTaskImageDataset(small.images, small.targets, small.task_types, counted, cache_bytes=0)
    assert off.cached is None and torch.equal(off[3]["image"], small[3]["image"])
    from monai.data import get_track_meta

    assert get_track_meta()  # the one-off pass runs without MONAI's metadata tracking and turns it back on

    def broken(x):
        raise RuntimeError("bad transform")

    with pytest.raises(RuntimeError, match="bad transform"):
        load_digits_tasks("val", transform=broken)
    assert get_track_meta()
