"""Small phantoms shared by the transform tests (generated once per session)."""

import pytest

from mtl_med.data.nifti import check_datalist
from mtl_med.pelvis.phantoms import generate_dataset


@pytest.fixture(scope="session")
def phantom_set(tmp_path_factory):
    """Four 48x48x16 phantoms on disk: (folder, resolved datalist)."""
    out = tmp_path_factory.mktemp("phantoms")
    _, failed = generate_dataset(out, 4, seed=11, preset="small", val_fraction=0.25, test_fraction=0.0)
    assert not failed
    return out, check_datalist(out / "datalist.json")
