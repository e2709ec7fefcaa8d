import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from mtl_med.inference import overview  # noqa: E402
from mtl_med.pelvis import LABEL_TABLE  # noqa: E402

NX, NY, NZ = 32, 32, 8
# RAS storage: world x = i - 15.5 (towards the patient's Right), y = j - 15.5 (Anterior), z = 3 k (Superior)
A_RAS = np.array([[1.0, 0, 0, -15.5], [0, 1.0, 0, -15.5], [0, 0, 3.0, -9.0], [0, 0, 0, 1]])


def _anatomy():
    """Label 1 on the patient's LEFT (x < 0) and anterior; label 2 on the RIGHT and posterior; slices 2..5."""
    label = np.zeros((NX, NY, NZ), np.int16)
    label[3:9, 20:26, 2:6] = 1
    label[23:29, 6:12, 2:6] = 2
    mr = np.where(label > 0, 100.0, 10.0).astype(np.float32)
    return mr, label


def _storages():
    """The same anatomy stored as RAS, LPS (x and y flipped), permuted (axial axis first, y flipped) and oblique."""
    mr, label = _anatomy()
    flip = np.array([[-1.0, 0, 0, NX - 1], [0, -1.0, 0, NY - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
    # stored[k, j', i] = ras[i, NY-1-j', k]: voxel (k, j', i) lies at RAS voxel (i, NY-1-j', k)
    perm = np.array([[0.0, 0, 1, 0], [0, -1.0, 0, NY - 1], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    c, s = np.cos(np.radians(12)), np.sin(np.radians(12))
    rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    return {
        "ras": (mr, label, A_RAS),
        "lps": (mr[::-1, ::-1], label[::-1, ::-1], A_RAS @ flip),
        "permuted": (mr[:, ::-1].transpose(2, 1, 0), label[:, ::-1].transpose(2, 1, 0), A_RAS @ perm),
        "oblique": (mr, label, rot @ A_RAS),
    }


def _centre(mask):
    rows, cols = np.nonzero(mask)
    return rows.mean(), cols.mean()


def test_axial_view_radiological_and_identical_for_all_storages():
    for name, (_, label, aff) in _storages().items():  # the storages really hold the same world: label 1 left, anterior
        idx = np.argwhere(label == 1)
        world = (aff @ np.c_[idx, np.ones(len(idx))].T)[:3].T
        assert (world[:, 0] < 0).all() and (world[:, 1] > 0).all(), name
    views = {name: overview.axial_view(label, aff, k=3) for name, (_, label, aff) in _storages().items()}
    ras = views["ras"]
    assert ras.shape == (NY, NX)  # rows run anterior->posterior, columns patient right->left
    r1, c1 = _centre(ras == 1)
    r2, c2 = _centre(ras == 2)
    assert c1 > NX / 2 and r1 < NY / 2  # patient's left, anterior: viewer's right, top
    assert c2 < NX / 2 and r2 > NY / 2  # patient's right, posterior: viewer's left, bottom
    for name, view in views.items():
        np.testing.assert_array_equal(view, ras, err_msg=name)


def test_save_overview_writes_png_for_each_storage(tmp_path):
    for name, (mr, label, aff) in _storages().items():
        out = overview.save_overview(tmp_path / f"{name}.png", mr, mr * 10, label, mr / 100, label_table=LABEL_TABLE, affine=aff,
                                     sct_std=mr, ct=mr * 10, label=label, title=name)
        img = mpimg.imread(out)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.shape[2] in (3, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.png" for n in _storages())  # no temp files


def test_figure_legend_title_and_markers():
    titles = {}
    for name, (mr, label, aff) in _storages().items():
        fig = overview._build_figure(mr, mr * 10, label, mr / 100, label_table=LABEL_TABLE, affine=aff, ct=mr * 10, label=label)
        try:
            titles[name] = fig._suptitle.get_text()
            legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
            assert len(legends) == 2  # labels (mode) and true labels
            for leg in legends:
                texts = [t.get_text() for t in leg.get_texts()]
                assert texts == [LABEL_TABLE[i] for i in range(1, len(LABEL_TABLE))]
            image_axes = [ax for ax in fig.axes if ax.images and ax.get_title()]
            assert len(image_axes) == 6
            for ax in image_axes:
                marks = {t.get_text(): t.get_position() for t in ax.texts}
                assert marks["R"][0] < 0.5 < marks["L"][0] and marks["P"][1] < 0.5 < marks["A"][1]
        finally:
            plt.close(fig)
    head = titles["ras"]
    assert "CT window -400..1200 HU (W 1600, L 400)" in head
    assert "axial slice 2 of 0..7" in head and "z = -3.0 mm" in head  # first slice with most labels, z = 3*2 - 9
    assert all(t == head for t in titles.values())  # same slice and z whatever the storage


def test_slice_index_counts_along_reoriented_axis():
    mr, label, aff = _storages()["permuted"]
    fig = overview._build_figure(mr, mr, label, mr, label_table=LABEL_TABLE, affine=aff, slice_index=5)
    try:
        assert "axial slice 5 of 0..7" in fig._suptitle.get_text()
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match="slice_index"):
        overview._build_figure(mr, mr, label, mr, label_table=LABEL_TABLE, affine=aff, slice_index=8)


def test_legend_colours_are_the_callers_or_neutral():
    """The overview holds no organ colours: the caller's (the pelvis bundle passes mtl_med.pelvis.LABEL_COLOURS),
    else black and matplotlib's colour cycle; too few colours for the table is an error."""
    from matplotlib.colors import to_rgba

    from mtl_med.pelvis import LABEL_COLOURS

    mr, label, aff = _storages()["ras"]
    for given, expected in ((LABEL_COLOURS, list(LABEL_COLOURS)), (None, ["black", "C0", "C1", "C2", "C3", "C4"])):
        fig = overview._build_figure(mr, mr, label, mr, label_table=LABEL_TABLE, label_colours=given, affine=aff)
        try:
            (leg,) = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
            assert [tuple(p.get_facecolor()) for p in leg.get_patches()] == [to_rgba(c) for c in expected[1:]]
        finally:
            plt.close(fig)
    with pytest.raises(ValueError, match="label_colours"):
        overview.label_colours_for(LABEL_TABLE, ["black", "red"])
