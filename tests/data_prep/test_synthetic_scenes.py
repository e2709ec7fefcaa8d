"""The synthetic scene generator: exact geometry, the mtan npy layout, same seed same bytes."""

import json

import numpy as np
import pytest

from data_prep.synthetic_scenes import CLASSES, main, render_scene

PLANAR = [CLASSES.index(c) for c in ("floor", "wall", "ceiling", "box", "painting")]


def _scene(i, **kw):
    return render_scene(np.random.default_rng([7, 0, i]), 48, 64, **kw)


def test_normals_are_the_normals_of_the_depth_map_on_planes():
    for i in range(3):
        s = _scene(i)
        K, z = s["K"], s["depth"].astype(np.float64)
        v, u = np.mgrid[0 : z.shape[0], 0 : z.shape[1]]
        rays = np.stack([(u + 0.5 - K[0, 2]) / K[0, 0], (v + 0.5 - K[1, 2]) / K[1, 1], np.ones(z.shape)], -1)
        p = z[..., None] * rays  # back-projected points in the camera frame
        du, dv = p[:-1, 1:] - p[:-1, :-1], p[1:, :-1] - p[:-1, :-1]
        n = np.cross(du, dv)
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        n *= -np.sign(np.einsum("ijk,ijk->ij", n, p[:-1, :-1]))[..., None]  # facing the camera
        surf = s["surface"]
        same = (surf[:-1, :-1] == surf[:-1, 1:]) & (surf[:-1, :-1] == surf[1:, :-1]) & np.isin(s["label"][:-1, :-1], PLANAR)
        assert same.sum() > 0.5 * same.size
        cos = np.einsum("ijk,ijk->ij", n, s["normal"][:-1, :-1])[same]
        assert np.degrees(np.arccos(np.clip(cos, -1, 1))).max() < 0.05


def test_geometry_is_valid_and_normals_face_the_camera():
    s = _scene(3)
    assert s["depth"].min() > 0 and np.isfinite(s["depth"]).all()
    assert np.allclose(np.linalg.norm(s["normal"], axis=-1), 1, atol=1e-5)
    K = s["K"]
    v, u = np.mgrid[0:48, 0:64]
    rays = np.stack([(u + 0.5 - K[0, 2]) / K[0, 0], (v + 0.5 - K[1, 2]) / K[1, 1], np.ones((48, 64))], -1)
    assert (np.einsum("ijk,ijk->ij", s["normal"], rays) < 0).all()
    assert set(np.unique(s["label"])) <= set(range(len(CLASSES)))
    assert s["edge"].any() and not s["edge"].all()
    assert 0 <= s["image"].min() and s["image"].max() <= 1
    holes = _scene(3, holes=3)
    gone = holes["depth"] == 0
    assert gone.any() and (holes["normal"][gone] == 0).all()
    assert (holes["label"] == s["label"]).all()  # a missing depth return keeps its label


def test_cli_writes_the_mtan_layout_with_the_same_bytes_for_a_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 3), (b, 3), (c, 4)):
        assert main(["--out", str(out), "--n", "2", "--val", "1", "--seed", str(seed), "--size", "32", "40", "--edges"]) == 0
    shapes = {"image": (32, 40, 3), "label": (32, 40), "depth": (32, 40, 1), "normal": (32, 40, 3), "edge": (32, 40)}
    for split, n in (("train", 2), ("val", 1)):
        for folder, shape in shapes.items():
            files = sorted((a / split / folder).iterdir())
            assert [f.name for f in files] == [f"{i}.npy" for i in range(n)]
            for f in files:
                arr = np.load(f)
                assert arr.shape == shape and arr.dtype == np.float32
                assert f.read_bytes() == (b / split / folder / f.name).read_bytes()
    assert (a / "train/image/0.npy").read_bytes() != (c / "train/image/0.npy").read_bytes()
    meta = json.loads((a / "scenes.json").read_text())
    assert meta["classes"] == list(CLASSES) and meta["splits"] == {"train": 2, "val": 1}


def test_cli_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--n", "1"])
    assert "not empty" in capsys.readouterr().err
