"""The backbone building blocks: HighResNet's residual block against MONAI's, and the trunk's segments."""

import pytest
import torch
from monai.networks.nets.highresnet import HighResBlock as MonaiHighResBlock

from mtl_med.networks import ConvUnit, Residual, Trunk, describe_backbone
from mtl_med.networks.blocks import HighResBlock, LayerFactory

MONAI_KEYS = {
    "layers.0.N.": "norm1.",
    "layers.0.A.": "act1.",
    "layers.1.conv.": "conv1.",
    "layers.2.N.": "norm2.",
    "layers.2.A.": "act2.",
    "layers.3.conv.": "conv2.",
}


def _ours(key):
    return next(new + key[len(old) :] for old, new in MONAI_KEYS.items() if key.startswith(old))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("act", ["prelu", "relu"])
def test_highres_block_computes_what_monai_computes(dims, act):
    torch.manual_seed(0)
    norm = ("batch", {"affine": True})
    monai = MonaiHighResBlock(dims, 4, 4, dilation=2, norm_type=norm, acti_type=act)
    ours = HighResBlock(LayerFactory(dims, norm=norm, act=act), 4, 4, dilation=2)
    with torch.no_grad():  # non-trivial weights and batch-norm statistics
        for name, t in monai.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "var" in name else torch.randn_like(t))
    state = {_ours(k): v for k, v in monai.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    assert state.keys() == ours.state_dict().keys()
    x = torch.randn(2, 4, *(12,) * dims)
    for train in (False, True):  # running statistics, then the batch's
        monai.train(train), ours.train(train)
        with torch.no_grad():
            assert torch.equal(ours(x), monai(x)), train


def test_highres_block_keeps_width_and_resolution():
    with pytest.raises(ValueError):
        HighResBlock(LayerFactory(2), 4, 8)
    with pytest.raises(ValueError):
        HighResBlock(LayerFactory(2), 4, 4, stride=2)


def test_highresnet_trunk_segments_end_at_the_five_convolutions():
    spec = describe_backbone("highresnet", 2, features=(4, 8, 8))
    kinds = ["c" if isinstance(u, ConvUnit) else "r" for u in spec.units]
    assert "".join(kinds) == "crrcrrcrrcc"
    assert [u.dilation for u in spec.units if isinstance(u, Residual)] == [1, 1, 2, 2, 4, 4]
    assert spec.branch_points == (0, 3, 6, 9, 10)
    trunk = Trunk(spec).eval()
    segments = trunk.segments()
    assert segments == [(0, 1), (1, 4), (4, 7), (7, 10), (10, 11)]
    assert all(isinstance(spec.units[stop - 1], ConvUnit) for _, stop in segments)
    assert all(isinstance(trunk.units[i], HighResBlock) for i in spec.residual_indices)
    x = y = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        for start, stop in segments:  # running the segments one after the other is the whole trunk
            y = trunk.run(y, start, stop)
        assert torch.equal(y, trunk(x))
    assert y.shape == (2, 8, 16, 16)
