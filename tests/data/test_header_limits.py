"""A header's claimed size is checked before any voxel is read: a tiny file claiming a huge grid (a gzip
"bomb", a corrupt header) is refused in one line naming the file, with the process's memory staying small."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mtl_med.data.nifti as nifti
from mtl_med.data.nifti import MAX_VOXELS, check_claimed_size, check_volume, voxel_limit
from mtl_med.errors import CaseFailures, ConfigError, InputError
from mtl_med.transforms import LoadVolumesd, preprocess_transforms
from mtl_med.pelvis import LABEL_TABLE

BOMB_SHAPE = (1400, 1400, 1400)
BOMB_CLAIM = r"header claims 1400 x 1400 x 1400 voxels of int16 \(5\.5 GB\)"


def write_claim(path, shape, dtype=np.int16, data=None, header_class=nib.Nifti1Header):
    """A .nii.gz whose header claims ``shape`` of ``dtype`` (written into ``dim`` as given: zero and negative
    dims too) followed by ``data`` (default: 128 bytes, whatever the claim)."""
    hdr = header_class()
    hdr.set_data_dtype(dtype)
    dim = hdr["dim"].copy()
    dim[0], dim[1:] = len(shape), 1
    dim[1:len(shape) + 1] = shape
    hdr["dim"] = dim
    hdr.set_qform(np.eye(4), code=1)
    hdr.set_sform(np.eye(4), code=1)
    hdr.set_slope_inter(1.0, 0.0)
    hdr["vox_offset"] = len(hdr.binaryblock) + 4  # the voxels follow a zero extension flag
    body = np.asarray(data, dtype=dtype).tobytes(order="F") if data is not None else b"\1\0" * 64
    with gzip.open(path, "wb") as fh:
        fh.write(hdr.binaryblock + b"\0" * 4 + body)
    return path


@pytest.fixture
def bomb(tmp_path):
    path = write_claim(tmp_path / "bomb.nii.gz", BOMB_SHAPE)
    assert path.stat().st_size < 2000  # 1.6 KB or less on disk, 5.5 GB claimed
    return path


def _one_line_naming(err, path):
    assert str(err).startswith(f"{path}: ") and err.path == str(path)
    assert "\n" not in str(err)


def test_check_volume_refuses_the_bomb(bomb):
    with pytest.raises(InputError, match=BOMB_CLAIM + r", more than the limit of 2\^30 voxels \(MTL_MED_MAX_VOXELS\)") as err:
        check_volume(bomb)
    _one_line_naming(err.value, bomb)


@pytest.mark.parametrize("check", [True, False])
def test_loading_refuses_the_bomb(bomb, check):
    """LoadVolumesd checks the header whether or not the content checks run; so does the inference preprocessing."""
    with pytest.raises(InputError, match=BOMB_CLAIM) as err:
        LoadVolumesd(("mr",), check=check)({"mr": str(bomb)})
    _one_line_naming(err.value, bomb)
    with pytest.raises(InputError, match=BOMB_CLAIM) as err:
        preprocess_transforms(("mr",), n4=False, check=check)({"mr": str(bomb)})
    _one_line_naming(err.value, bomb)


def test_a_lazily_loaded_nibabel_image_is_checked_before_it_is_read(bomb):
    from mtl_med.transforms.io import as_metatensor

    with pytest.raises(InputError, match=BOMB_CLAIM) as err:
        as_metatensor(nib.load(str(bomb)))
    _one_line_naming(err.value, bomb)


def test_the_predictor_refuses_the_bomb_and_runs_the_other_cases(tmp_path, bomb):
    """The predictor lists the input folder, then one bad case fails in one line and the good one is written."""
    from mtl_med.pelvis.phantoms import generate_phantom, write_phantom
    from mtl_med.inference import Predictor
    from mtl_med.build import sfg_highresnet
    from mtl_med.transforms import learn_landmarks, save_landmarks

    inp = tmp_path / "in"
    inp.mkdir()
    bomb.rename(inp / "bomb.nii.gz")
    good = write_phantom(generate_phantom(0, shape=(16, 16, 8)), tmp_path / "case")["mr"]
    Path(good).rename(inp / "good.nii.gz")
    save_landmarks(tmp_path / "landmarks.json", learn_landmarks([nib.load(inp / "good.nii.gz").get_fdata()]))
    torch.save(sfg_highresnet(features=[4, 8, 8]).state_dict(), tmp_path / "model.pt")
    bundle = Path(__file__).resolve().parents[2] / "bundles" / "sfg_highresnet_pelvis"
    pred = Predictor(bundle, ckpt_path=str(tmp_path / "model.pt"), landmarks_path=str(tmp_path / "landmarks.json"),
                     features=[4, 8, 8], num_samples=2, device="cpu", n4=False, progress=False, save_png=False)
    with pytest.raises(CaseFailures) as err:
        pred.run(input_dir=inp, output_dir=tmp_path / "out")
    assert list(err.value.failures) == ["bomb"]
    assert err.value.failures["bomb"].startswith(f"{inp / 'bomb.nii.gz'}: header claims 1400 x 1400 x 1400 voxels")
    assert (tmp_path / "out" / "good").is_dir() and not (tmp_path / "out" / "bomb").exists()


RSS_SCRIPT = """
import sys
from mtl_med.data.nifti import check_volume
from mtl_med.errors import InputError
from mtl_med.transforms import LoadVolumesd
refused = []
for load in (lambda p: check_volume(p), lambda p: LoadVolumesd(("mr",), check=False)({"mr": p})):
    try:
        load(sys.argv[1])
    except InputError as err:
        refused.append(str(err))
# VmHWM: this process's own peak (ru_maxrss would include the forking pytest process's, kept across exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(len(refused), hwm)  # kB
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads VmHWM from /proc/self/status")
def test_refusing_the_bomb_keeps_memory_small(bomb):
    """Before the check, reading this 1.6 KB file drove the process to ~5.5 GB resident (5.8 GB via MONAI)."""
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(bomb)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    refused, peak_kb = map(int, out.stdout.split()[-2:])
    assert refused == 2, out.stdout
    assert peak_kb < 1.5 * 2**20, f"peak RSS {peak_kb / 2**20:.2f} GB"


def test_more_bytes_than_memory_available(tmp_path, monkeypatch):
    path = write_claim(tmp_path / "big.nii.gz", (2000, 2000, 200), np.float32)  # 8e8 voxels, under 2^30
    monkeypatch.setattr(nifti, "available_memory", lambda: 3_100_000_000)
    with pytest.raises(InputError, match=r"header claims 2000 x 2000 x 200 voxels of float32 \(3\.2 GB\), "
                                         r"more than the 3\.1 GB of memory available") as err:
        check_volume(path)
    _one_line_naming(err.value, path)


def test_available_memory_is_a_positive_count_or_unknown():
    m = nifti.available_memory()
    assert m is None or (isinstance(m, int) and m > 0)


def test_limit_from_environment_and_argument(tmp_path, monkeypatch):
    path = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.uint8), np.eye(4)), str(path))  # 4096 voxels
    assert check_volume(path, role="label", label_table=LABEL_TABLE).shape == (16, 16, 16)
    monkeypatch.setenv("MTL_MED_MAX_VOXELS", "1000")
    with pytest.raises(InputError, match=r"16 x 16 x 16 voxels of uint8 \(4\.1 kB\), more than the limit of 1,000 voxels"):
        check_volume(path, role="label", label_table=LABEL_TABLE)
    with pytest.raises(InputError, match="limit of 1,000 voxels"):
        LoadVolumesd(("label",), label_table=LABEL_TABLE)({"label": str(path)})
    assert check_volume(path, role="label", label_table=LABEL_TABLE, max_voxels=4096).shape == (16, 16, 16)  # the argument wins
    assert LoadVolumesd(("label",), max_voxels=2**12, label_table=LABEL_TABLE)({"label": str(path)})["label"].shape == (1, 16, 16, 16)
    monkeypatch.setenv("MTL_MED_MAX_VOXELS", "2^12")
    assert voxel_limit() == 4096 and check_volume(path, role="label", label_table=LABEL_TABLE).shape == (16, 16, 16)
    monkeypatch.setenv("MTL_MED_MAX_VOXELS", "lots")
    with pytest.raises(ConfigError, match=r"MTL_MED_MAX_VOXELS: must be a positive whole number"):
        check_volume(path, role="label", label_table=LABEL_TABLE)
    monkeypatch.delenv("MTL_MED_MAX_VOXELS")
    assert voxel_limit() == MAX_VOXELS == 2**30
    with pytest.raises(ConfigError, match="max_voxels"):
        voxel_limit(0)


@pytest.mark.parametrize(
    "shape, header, problem",
    [
        ((-5, 4, 4), nib.Nifti1Header, r"corrupt header: it claims shape \(-5, 4, 4\), a negative dimension"),
        ((0, 4, 4), nib.Nifti1Header, r"empty volume \(the header claims shape \(0, 4, 4\)\)"),
        ((32767, 32767, 32767), nib.Nifti1Header, r"32767 x 32767 x 32767 voxels of int16 \(70\.4 TB\), more than the limit"),
        ((2**40, 2**40, 2**40), nib.Nifti2Header, r"1099511627776 x 1099511627776 x 1099511627776 voxels of int16 "
                                                  r"\(2\.7e\+36 bytes\), more than the limit"),
    ],
)
def test_corrupt_or_absurd_header_is_one_line(tmp_path, shape, header, problem):
    path = write_claim(tmp_path / "corrupt.nii.gz", shape, header_class=header)
    with pytest.raises(InputError, match=problem) as err:
        check_volume(path)
    _one_line_naming(err.value, path)
    with pytest.raises(InputError, match=problem):
        LoadVolumesd(("mr",), check=False)({"mr": str(path)})


def test_dicom_series_claim_is_checked_before_pixels_are_read(tmp_path, monkeypatch):
    """read_headers (and load_series, the datalist check and the loader, which start with it) refuses
    rows x columns x files beyond the limit."""
    from mtl_med.data.dicom import load_series, read_headers, write_mr_series

    folder = tmp_path / "series"
    write_mr_series(np.random.default_rng(0).integers(1, 500, (8, 6, 4)).astype(np.float32), np.eye(4), folder)
    assert read_headers(folder).shape == (8, 6, 4)
    nifti.check_case({"mr": str(folder)})
    monkeypatch.setenv("MTL_MED_MAX_VOXELS", "100")
    problem = r"header claims 8 x 6 x 4 voxels of int16 \(384 bytes\), more than the limit of 100 voxels"
    check_case = nifti.check_case
    load = LoadVolumesd(("mr",))
    for read in (read_headers, load_series, lambda f: check_case({"mr": str(f)}), lambda f: load({"mr": str(f)})):
        with pytest.raises(InputError, match=problem) as err:
            read(folder)
        _one_line_naming(err.value, folder)


def test_series_size_takes_the_largest_slice_and_sample_type():
    class Slice:
        def __init__(self, rows, columns, bits=16, signed=0, samples=1):
            self.Rows, self.Columns, self.BitsAllocated = rows, columns, bits
            self.PixelRepresentation, self.SamplesPerPixel = signed, samples

    nifti.check_series_size("s", [Slice(512, 512), Slice(512, 512)])
    with pytest.raises(InputError, match=r"s: header claims 60000 x 512 x 2 voxels of uint16"):
        nifti.check_series_size("s", [Slice(512, 512), Slice(512, 60000)], max_voxels=10**7)
    with pytest.raises(InputError, match=r"300 x 200 x 2 x 3 voxels of uint8"):
        nifti.check_series_size("s", [Slice(200, 300, bits=8, samples=3)] * 2, max_voxels=10**5)
    with pytest.raises(InputError, match=r"voxels of int32"):
        nifti.check_series_size("s", [Slice(200, 300, bits=32, signed=1)] * 2, max_voxels=10**5)


DTYPES = st.sampled_from([np.uint8, np.int16, np.float32, np.float64])
DIM = st.one_of(st.integers(1, 64), st.integers(-3, 0), st.integers(2000, 32767))  # NIfTI-1 dims are int16
LIMIT = 40_000  # voxels: small enough that the property writes full data only for small claims


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.tuples(DIM, DIM, DIM), dtype=DTYPES)
def test_any_claim_is_refused_naming_the_file_or_loaded(tmp_path, shape, dtype):
    """Whatever a header claims: refused in one line naming the file (a dimension below 1, more than the
    limit), or, within the limit and with its voxels present, loaded with the claimed shape."""
    path = tmp_path / "claim.nii.gz"
    within = min(shape) >= 1 and int(np.prod(shape, dtype=object)) <= LIMIT
    write_claim(path, shape, dtype, data=np.zeros(shape, dtype) if within else None)
    if within:
        assert check_volume(path, role="label", label_table=LABEL_TABLE, max_voxels=LIMIT).shape == shape
        return
    with pytest.raises(InputError, match=r"header claims|corrupt header|empty volume") as err:
        check_volume(path, role="label", label_table=LABEL_TABLE, max_voxels=LIMIT)
    _one_line_naming(err.value, path)
    with pytest.raises(InputError):  # the same refusal without voxels: the header alone decides
        check_claimed_size(path, shape, dtype, max_voxels=LIMIT)


def test_datalist_check_refuses_the_bomb(tmp_path, bomb):
    (tmp_path / "dl.json").write_text(json.dumps({"test": [{"mr": bomb.name}]}))
    with pytest.raises(InputError, match=BOMB_CLAIM):
        nifti.check_datalist(tmp_path / "dl.json", check_volumes=True, label_table=LABEL_TABLE)
