import pytest
import torch

from mtl_med.networks import SFGVGG


@pytest.mark.parametrize("dims", [2, 3])
def test_sfg_vgg11_outputs_and_layer_count(dims):
    model = SFGVGG(spatial_dims=dims, in_channels=3, width=1 / 16)
    out = model(torch.randn(2, 3, *(32,) * dims))
    assert out["age"].shape == (2, 1) and out["gender"].shape == (2, 2)
    assert len(list(model.sfg_layers())) == 8  # every convolution of VGG-11 is an SFG layer


def test_sfg_vgg_gradient_isolation():
    torch.manual_seed(0)
    model = SFGVGG(width=1 / 16).train()
    for _, layer in model.sfg_layers():
        layer.groups.fix(torch.arange(layer.out_channels) % 3)
    model(torch.randn(4, 3, 32, 32))["age"].sum().backward()
    for _, layer in model.sfg_layers():
        gender_kernels = layer.groups.assignment.argmax(-1) == 1
        assert layer.conv.weight.grad[gender_kernels].abs().max() == 0
        assert layer.conv.weight.grad[~gender_kernels].abs().sum() > 0
    assert all(p.grad is None for p in model.heads[1].parameters())


def test_sfg_vgg_baselines_and_depth():
    x = torch.randn(2, 3, 32, 32)
    for sharing in ("single_task", "hard_sharing", "constant_mask", "constant_p", "cross_stitch"):
        out = SFGVGG(width=1 / 16, sharing=sharing).eval()(x)
        assert torch.isfinite(out["age"]).all(), sharing
    assert len(list(SFGVGG(width=1 / 32, depth=16).sfg_layers())) == 13
    with pytest.raises(ValueError):
        SFGVGG(depth=13)
