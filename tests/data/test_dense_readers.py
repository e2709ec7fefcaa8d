"""Dense multi-task readers on miniature copies of each on-disk format, written here."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.synthetic_scenes import generate
from mtl_med.data.dense import (
    DenseFileNotFoundError,
    DenseFormatError,
    DenseRandomCropFlip,
    read_adashare_nyuv2,
    read_mtan_cityscapes,
    read_mtan_nyuv2,
    read_nyud_mt,
    read_taskonomy,
)

H, W = 6, 8


def _mtan(root, n=3, classes=13, folders=("image", "label", "depth", "normal")):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for f in folders:
            (root / split / f).mkdir(parents=True)
        for i in range(n):
            lab = rng.integers(-1, classes, (H, W)).astype(np.float32)
            depth = rng.uniform(0.5, 5, (H, W, 1)).astype(np.float32)
            depth[0, 0] = 0
            normal = rng.normal(size=(H, W, 3))
            normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
            normal[0, 0] = 0
            arrays = {"image": rng.random((H, W, 3), dtype=np.float32), "label": lab, "label_7": lab % 7, "label_19": lab,
                      "depth": depth, "normal": normal.astype(np.float32)}
            for f in folders:
                np.save(root / split / f / f"{i}.npy", arrays[f])
    return root


def test_mtan_nyuv2_reads_the_layout_and_keeps_the_invalid_markers(tmp_path):
    ds = read_mtan_nyuv2(_mtan(tmp_path), "val")
    assert len(ds) == 3
    item = ds[1]
    assert item["image"].shape == (3, H, W) and item["index"] == 1
    t = item["targets"]
    assert t["seg"].dtype == torch.int64 and t["seg"].shape == (H, W) and t["seg"].min() >= -1
    assert t["depth"].shape == (1, H, W) and t["depth"][0, 0, 0] == 0
    assert t["normal"].shape == (3, H, W) and (t["normal"][:, 0, 0] == 0).all()
    assert torch.allclose(t["normal"][:, 1:, 1:].norm(dim=0), torch.ones(H - 1, W - 1), atol=1e-5)
    raw = np.load(tmp_path / "val/label/1.npy")
    assert (t["seg"].numpy() == raw).all()


def test_mtan_nyuv2_errors_name_the_file(tmp_path):
    root = _mtan(tmp_path)
    (root / "train/depth/1.npy").unlink()
    with pytest.raises(DenseFileNotFoundError, match=r"depth.1\.npy: missing"):
        read_mtan_nyuv2(root, "train")
    (root / "val/normal/0.npy").write_bytes(b"not numpy")
    with pytest.raises(DenseFormatError, match=r"normal.0\.npy: not a readable \.npy"):
        read_mtan_nyuv2(root, "val")
    np.save(root / "val/normal/0.npy", np.zeros((H, W, 2), np.float32))
    with pytest.raises(DenseFormatError, match=r"shape \(H, W, 3\)"):
        read_mtan_nyuv2(root, "val")
    np.save(root / "val/label/2.npy", np.full((H, W), 13, np.float32))
    ds = read_mtan_nyuv2(root, "val", tasks=("seg",))
    with pytest.raises(DenseFormatError, match=r"label.2\.npy: labels must be in \[0, 13\)"):
        ds[2]
    with pytest.raises(DenseFileNotFoundError, match="edge: folder not found"):
        read_mtan_nyuv2(root, "val", tasks=("seg", "edge"))


def test_synthetic_scenes_read_through_the_mtan_reader(tmp_path):
    generate(tmp_path, 2, 1, seed=0, height=32, width=32, edges=True)
    ds = read_mtan_nyuv2(tmp_path, "train", tasks=("seg", "depth", "normal", "edge"))
    assert ds.num_classes == 6 and len(ds) == 2
    item = ds[0]
    assert item["targets"]["depth"].min() > 0 and set(item["targets"]["edge"].unique().tolist()) <= {0.0, 1.0}


def test_mtan_cityscapes_picks_the_label_folder_of_the_class_count(tmp_path):
    root = _mtan(tmp_path, folders=("image", "depth", "label_7", "label_19"))
    assert read_mtan_cityscapes(root, "train", num_classes=19)[0]["targets"]["seg"].max() <= 18
    assert read_mtan_cityscapes(root, "train", num_classes=7)[0]["targets"]["seg"].max() <= 6
    with pytest.raises(DenseFileNotFoundError, match="label_2: folder not found"):
        read_mtan_cityscapes(root, "train", num_classes=2)


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_adashare_nyuv2_decodes_png_normals_and_ignore(tmp_path):
    img = np.full((H, W, 3), 100, np.uint8)
    seg = np.full((H, W), 7, np.uint8)
    seg[0, 0] = 255
    normal = np.full((H, W, 3), 127, np.uint8)
    normal[..., 2] = 255  # (0, 0, 1) up to rounding
    normal[1, 1] = (255, 200, 0)
    normal[0, 0] = 255  # invalid
    depth = np.full((H, W), 2.0, np.float32)
    depth[2, 2] = 0
    _png(tmp_path / "img/0001.png", img)
    _png(tmp_path / "seg/0001.png", seg)
    _png(tmp_path / "normal_mask/0001.png", normal)
    (tmp_path / "depth").mkdir()
    np.save(tmp_path / "depth/0001.npy", depth)
    entry = ["img/0001.png", "seg/0001.png", "normal_mask/0001.png", "depth/0001.npy"]
    (tmp_path / "nyu_v2_3task.json").write_text(json.dumps({"train": [entry], "test": [entry]}))
    t = read_adashare_nyuv2(tmp_path, "test")[0]["targets"]
    assert t["seg"][0, 0] == -1 and t["seg"][3, 3] == 7
    assert (t["normal"][:, 0, 0] == 0).all()
    expect = np.array([255, 200, 0]) / 127.5 - 1
    assert np.allclose(t["normal"][:, 1, 1].numpy(), expect / np.linalg.norm(expect), atol=1e-6)
    assert t["depth"][0, 2, 2] == 0 and t["depth"][0, 3, 3] == 2
    compat = read_adashare_nyuv2(tmp_path, "test", adashare_compat=True)[0]["targets"]["normal"]
    raw_bgr = np.array([0, 200, 255.0])
    assert np.allclose(compat[:, 1, 1].numpy(), raw_bgr / np.linalg.norm(raw_bgr), atol=1e-6)
    with pytest.raises(DenseFormatError, match="no split 'train2'"):
        read_adashare_nyuv2(tmp_path, "train2")
    (tmp_path / "seg/0001.png").unlink()
    with pytest.raises(DenseFileNotFoundError, match=r"0001\.png: image file not found"):
        read_adashare_nyuv2(tmp_path, "test")


def test_nyud_mt_maps_void_to_ignore_and_checks_listed_files(tmp_path):
    _png(tmp_path / "images/a.jpg", np.full((H, W, 3), 80, np.uint8))
    seg = np.full((H, W), 5, np.uint8)
    seg[0] = 0
    _png(tmp_path / "segmentation/a.png", seg)
    for d, arr in (("depth", np.full((H, W), 1.5)), ("normals", np.tile([0.0, 0.0, -1.0], (H, W, 1))), ("edge", np.zeros((H, W)))):
        (tmp_path / d).mkdir()
        np.save(tmp_path / d / "a.npy", arr.astype(np.float32))
    (tmp_path / "gt_sets").mkdir()
    (tmp_path / "gt_sets/train.txt").write_text("a\n")
    t = read_nyud_mt(tmp_path, "train")[0]["targets"]
    assert (t["seg"][0] == -1).all() and (t["seg"][1:] == 4).all()
    assert t["normal"][2].eq(-1).all() and t["edge"].shape == (1, H, W)
    (tmp_path / "gt_sets/val.txt").write_text("a\nb\n")
    with pytest.raises(DenseFileNotFoundError, match=r"b\.jpg: image file of id 'b'"):
        read_nyud_mt(tmp_path, "val")


def test_taskonomy_values_as_adashare_feeds_its_losses(tmp_path):
    _png(tmp_path / "rgb/x.png", np.full((H, W, 3), 50, np.uint8))
    seg = np.full((H, W), 3, np.uint8)
    seg[0, 0] = 0
    _png(tmp_path / "seg/x.png", seg)
    _png(tmp_path / "normal/x.png", np.full((H, W, 3), 255, np.uint8))
    depth = np.full((H, W), 1000, np.uint16)
    depth[1, 1] = 65535
    _png(tmp_path / "depth/x.png", depth)
    _png(tmp_path / "keypoint/x.png", np.full((H, W), 163, np.uint16))
    _png(tmp_path / "edge/x.png", np.full((H, W), 60000, np.uint16))
    np.save(tmp_path / "semseg_prior_factor.npy", np.arange(17, dtype=np.float64) / 10)
    paths = [f"{d}/x.png" for d in ("rgb", "seg", "normal", "depth", "keypoint", "edge")]
    (tmp_path / "taskonomy.json").write_text(json.dumps({"test": [paths]}))
    item = read_taskonomy(tmp_path, "test")[0]
    t = item["targets"]
    assert t["seg"][0, 0] == -1 and t["seg"][2, 2] == 2
    assert item["weights"]["seg"][0, 0] == 0 and item["weights"]["seg"][2, 2] == pytest.approx(0.2)
    assert t["depth"][0, 1, 1] == 0 and t["depth"][0, 0, 0] == pytest.approx(np.log(1001) / np.log(2**16))
    assert (t["normal"][:, 1, 1] == 0).all() and (t["normal"][:, 0, 0] == 1).all()
    assert t["keypoint"][0, 0, 0] == pytest.approx(163 / 2**16 / 0.005 * 2 - 1, abs=1e-5)  # int(0.0025 * 2^16) = 163
    assert t["edge"][0, 0, 0] == pytest.approx(1.0)


def test_crop_flip_pads_with_ignore_and_mirrors_normals_x():
    n = torch.zeros(3, 4, 4)
    n[0] = 1.0
    item = {"image": torch.rand(3, 4, 4), "targets": {"seg": torch.zeros(4, 4, dtype=torch.long), "normal": n}, "index": 0}
    t = DenseRandomCropFlip(size=(6, 6))
    t.set_random_state(0)
    flips = 0
    for _ in range(8):
        out = t(item)
        assert out["image"].shape == (3, 6, 6) and (out["targets"]["seg"] == -1).sum() == 36 - 16
        x = out["targets"]["normal"][0]
        assert set(x.unique().tolist()) <= {0.0, 1.0, -1.0}
        flips += bool((x == -1).any())
    assert 0 < flips < 8
    a, b = DenseRandomCropFlip(size=(6, 6), seed=3), DenseRandomCropFlip(size=(6, 6), seed=3)
    assert all(torch.equal(a(item)["image"], b(item)["image"]) for _ in range(4))  # a seed fixes the draws
