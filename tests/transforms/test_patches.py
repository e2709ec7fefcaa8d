import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from mtl_med.pelvis import CT_RANGE_HU, CT_SCALE, LABEL_TABLE
from mtl_med.transforms import train_patch_transforms
from mtl_med.transforms.histogram import learn_landmarks, save_landmarks


def _vol(arr):
    return MetaTensor(torch.as_tensor(np.asarray(arr, np.float32)[None]), affine=torch.diag(torch.tensor([1.46] * 3 + [1.0])))


def _smooth(shape, seed=0):
    x, y, z = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(1, 3, 3)
    f = np.sin(a * 3 * x + b) * np.cos(b * 3 * y) + 0.3 * np.sin(c * 4 * z)
    return 5 * (f - f.min()) / (f.max() - f.min())


def test_2d_shapes_and_mask_is_exactly_the_unpadded_region():
    d = {"mr": _vol(_smooth((200, 200, 6))), "ct": _vol(_smooth((200, 200, 6), 1)), "label": _vol(np.zeros((200, 200, 6)))}
    t = train_patch_transforms(seed=3)
    for _ in range(5):
        p = t(d)
        for k in ("mr", "ct", "label", "mask"):
            assert tuple(p[k].shape) == (1, 136, 136)  # A.3
        expected = torch.zeros(1, 136, 136)
        expected[:, 4:132, 4:132] = 1
        assert torch.equal(p["mask"], expected)
        assert float(p["mr"][:, :4].abs().max()) == 0.0  # zero padding


def test_mask_marks_only_image_data_in_small_volumes():
    d = {"mr": _vol(np.ones((60, 60, 4))), "ct": _vol(np.ones((60, 60, 4))), "label": _vol(np.zeros((60, 60, 4)))}
    p = train_patch_transforms(seed=0, prob=0.0)(d)
    assert tuple(p["mr"].shape) == (1, 136, 136)
    # the volume is smaller than the patch: mask = where the image is
    assert torch.equal(p["mask"] > 0, p["mr"] > 0.5)
    assert int(p["mask"].sum()) == 60 * 60


def test_mr_ct_label_stay_aligned_under_augmentation():
    f = _smooth((180, 180, 5), 2)
    d = {"mr": _vol(f), "ct": _vol(f), "label": _vol(np.round(f))}
    t = train_patch_transforms(seed=7)
    for _ in range(10):
        p = t(d)
        m = p["mask"] > 0
        assert torch.equal(p["mr"], p["ct"])  # same transform, same interpolation
        lab = p["label"][m]
        assert set(torch.unique(lab).tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}  # nearest neighbour
        close = (lab - p["mr"][m]).abs() <= 0.6
        assert close.float().mean() > 0.97


def test_every_slice_sampled_and_seeded():
    nz = 8
    vol = np.broadcast_to(np.arange(nz, dtype=np.float32), (40, 40, nz)).copy()
    d = {"mr": _vol(vol), "ct": _vol(vol), "label": _vol(np.zeros_like(vol))}
    small = {"patch_size": (16, 16), "padded_size": (24, 24)}
    t = train_patch_transforms(seed=1, **small)
    seen = [int(round(float(t(d)["mr"][0, 12, 12]))) for _ in range(80)]
    assert set(seen) == set(range(nz))  # A.3: all axial slices eligible
    t2 = train_patch_transforms(seed=1, **small)
    assert [int(round(float(t2(d)["mr"][0, 12, 12]))) for _ in range(20)] == seen[:20]


def test_3d_patches():
    d = {"mr": _vol(_smooth((64, 64, 40))), "ct": _vol(_smooth((64, 64, 40))), "label": _vol(np.zeros((64, 64, 40)))}
    t = train_patch_transforms(spatial_dims=3, patch_size=(24, 24, 16), seed=0)
    p = t(d)
    for k in ("mr", "ct", "label", "mask"):
        assert tuple(p[k].shape) == (1, 32, 32, 24)
    assert torch.equal(p["mr"], p["ct"])
    assert int(p["mask"].sum()) == 24 * 24 * 16 and float(p["mask"][:, :4].sum()) == 0


def test_bad_patch_arguments():
    with pytest.raises(ValueError):
        train_patch_transforms(patch_size=(128, 128), padded_size=(120, 120))
    with pytest.raises(ValueError):
        train_patch_transforms(spatial_dims=4)


def test_train_loader_batches(phantom_set, tmp_path):
    out, dl = phantom_set
    import nibabel as nib

    lm = save_landmarks(tmp_path / "lm.json", learn_landmarks([nib.load(x["mr"]).get_fdata() for x in dl["training"]]))
    # composed as the bundle's train.json composes it: checked datalist, preprocessing, patches, batch of 10
    from monai.data import DataLoader
    from mtl_med.data.nifti import check_datalist
    from mtl_med.transforms import make_dataset, preprocess_transforms

    items = check_datalist(out / "datalist.json", sections=("training",))["training"]
    pre = preprocess_transforms(("mr", "ct", "label"), landmarks=lm, n4_shrink_factor=2, n4_threads=2, ct_clip=CT_RANGE_HU, ct_scale=CT_SCALE, label_table=LABEL_TABLE)
    loader = DataLoader(make_dataset(items * 4, pre, train_patch_transforms(("mr", "ct", "label"))), batch_size=10, shuffle=True)
    batch = next(iter(loader))
    assert tuple(batch["mr"].shape) == (10, 1, 136, 136)  # A.3: batch of 10
    assert tuple(batch["mask"].shape) == (10, 1, 136, 136)
    assert set(torch.unique(batch["label"]).tolist()) <= set(range(6))
    assert float(batch["ct"].min()) >= 0.0  # CT/1024 + 1 with -1024 HU background


def test_disk_cache_is_reused_and_keyed_by_the_preprocessing_parameters(phantom_set, tmp_path):
    from mtl_med.transforms import make_dataset, preprocess_transforms

    _, dl = phantom_set
    items = dl["training"][:2]
    cache = tmp_path / "cache"

    def load(**kw):
        ds = make_dataset(items, preprocess_transforms(n4=False, ct_clip=CT_RANGE_HU, ct_scale=CT_SCALE, label_table=LABEL_TABLE, **kw), cache="disk", cache_dir=cache)
        return [ds[i] for i in range(len(ds))]

    first = load()
    entries = sorted(cache.iterdir())
    assert len(entries) == 2  # one entry per case
    again = load()  # the same preprocessing rebuilt: the same keys, nothing new written
    assert sorted(cache.iterdir()) == entries
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again) for k in ("mr", "ct", "label"))
    memory = make_dataset(items, preprocess_transforms(n4=False, ct_clip=CT_RANGE_HU, ct_scale=CT_SCALE, label_table=LABEL_TABLE), cache="memory")
    assert torch.equal(memory[0]["mr"], first[0]["mr"])
    coarse = load(pixdim=3.0)  # another parameter value must not reuse the 1.46 mm entries
    assert len(list(cache.iterdir())) == 4
    assert coarse[0]["mr"].shape != first[0]["mr"].shape
    with pytest.raises(ValueError, match="cache_dir"):
        make_dataset(items, preprocess_transforms(n4=False, ct_clip=CT_RANGE_HU, ct_scale=CT_SCALE, label_table=LABEL_TABLE), cache="disk")



def test_repeated_items_are_preprocessed_and_held_once(phantom_set):
    """train.json lists each volume samples_per_volume times: the memory cache keeps one preprocessed copy per
    volume (not one per repeat), and each draw of a repeat is still its own random patch."""
    from mtl_med.data.nifti import check_datalist
    from mtl_med.transforms import make_dataset, preprocess_transforms

    out, _ = phantom_set
    items = check_datalist(out / "datalist.json", sections=("training",))["training"][:2]
    pre = preprocess_transforms(("mr", "ct", "label"), n4=False, ct_clip=CT_RANGE_HU, ct_scale=CT_SCALE, label_table=LABEL_TABLE)
    ds = make_dataset(items * 6, pre, train_patch_transforms(("mr", "ct", "label"), patch_size=(16, 16), padded_size=(20, 20)))
    assert len(ds) == 12
    assert len(ds._cache) == 2  # one preprocessed volume per distinct item
    draws = [ds[i]["mr"] for i in range(0, 12, 2)]  # the six repeats of the first item
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
