"""Where the Python API finds its bundle when none is given."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtl_med.errors import ConfigError
from mtl_med.inference import bundle as bundle_mod

CHECKOUT = Path(__file__).resolve().parents[2] / "bundles" / "sfg_highresnet_pelvis"


def test_default_bundle_is_the_environment_variable_then_the_checkout(monkeypatch, tmp_path):
    monkeypatch.delenv(bundle_mod.BUNDLE_ENV, raising=False)
    assert bundle_mod.default_bundle() == CHECKOUT
    monkeypatch.setenv(bundle_mod.BUNDLE_ENV, str(tmp_path))
    assert bundle_mod.default_bundle() == tmp_path


def test_no_bundle_beside_an_installed_package_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv(bundle_mod.BUNDLE_ENV, raising=False)
    fake = tmp_path / "site-packages" / "mtl_med" / "inference" / "bundle.py"
    monkeypatch.setattr(bundle_mod, "__file__", str(fake))
    with pytest.raises(ConfigError, match=r"^bundle: no bundle folder given .*MTL_MED_BUNDLE"):
        bundle_mod.default_bundle()
