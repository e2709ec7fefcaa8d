import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from mtl_med.pelvis import CT_RANGE_HU, CT_SCALE
from mtl_med.transforms import CTToHUd, ScaleCTd, hu_to_network, network_to_hu

PELVIS = {"clip": CT_RANGE_HU, "scale": CT_SCALE}  # A.3: [-1024, 2500] HU, CT / 1024 + 1


def test_scaling_formula_and_clip():
    hu = torch.tensor([-3000.0, -1024.0, 0.0, 1024.0, 2500.0, 4000.0])
    net = hu_to_network(hu, **PELVIS)
    # A.3: CT/1024 + 1 on [-1024, 2500]
    assert torch.allclose(net, torch.tensor([0.0, 0.0, 1.0, 2.0, 2500 / 1024 + 1, 2500 / 1024 + 1]))


def test_round_trip_within_float_tolerance():
    rng = np.random.default_rng(0)
    hu = torch.as_tensor(rng.uniform(-1024, 2500, size=(1, 8, 8, 4)).astype(np.float32))
    scale = ScaleCTd("ct", **PELVIS)
    d = scale({"ct": MetaTensor(hu)})
    assert float(d["ct"].min()) >= 0.0
    back = scale.inverse(d)["ct"]
    assert torch.allclose(torch.as_tensor(back), hu, atol=1e-3)
    assert torch.allclose(network_to_hu(hu_to_network(hu, **PELVIS), **PELVIS), hu, atol=1e-3)


def test_compose_inverse_and_output_conversion():
    hu = MetaTensor(torch.linspace(-1024, 2500, 64).reshape(1, 4, 4, 4))
    t = Compose([ScaleCTd("ct", **PELVIS)])
    d = t({"ct": hu})
    assert torch.allclose(torch.as_tensor(t.inverse(d)["ct"]), torch.as_tensor(hu), atol=1e-3)
    pred = {"pred_ct": torch.tensor([-0.5, 0.0, 1.0, 10.0])}
    out = CTToHUd("pred_ct", **PELVIS)(pred)["pred_ct"]
    assert torch.allclose(out, torch.tensor([-1024.0, -1024.0, 0.0, 2500.0]))


def test_range_and_scale_are_the_callers():
    """No application's range or scale is a default: each is given, and None clips nothing."""
    import pytest

    with pytest.raises(TypeError):
        ScaleCTd("ct")
    with pytest.raises(TypeError):
        network_to_hu(torch.zeros(1))
    hu = torch.tensor([-3000.0, 0.0, 4000.0])
    assert torch.equal(network_to_hu(hu_to_network(hu, None, 1000.0), None, 1000.0), hu)
    with pytest.raises(ValueError, match="scale"):
        ScaleCTd("ct", clip=None, scale=0.0)
