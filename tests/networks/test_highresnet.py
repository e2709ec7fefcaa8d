"""HighResNet's description: the SFG paper's appendix B layout, its branch points and its errors."""

import pytest

from mtl_med.networks import describe_backbone
from mtl_med.networks.blocks import ConvUnit, Residual


def test_layout_of_appendix_b():
    b = describe_backbone("highresnet", spatial_dims=3)
    convs = [u for u in b.units if isinstance(u, ConvUnit)]
    blocks = [u for u in b.units if isinstance(u, Residual)]
    assert len(b.units) == 11 and len(convs) == 5  # SFG layers 1, 6, 11, 16, 17
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 16), (16, 32), (32, 64), (64, 64), (64, 64)]
    assert [(r.in_channels, r.dilation) for r in blocks] == [(16, 1), (16, 1), (32, 2), (32, 2), (64, 4), (64, 4)]
    assert b.branch_points == tuple(i for i, u in enumerate(b.units) if isinstance(u, ConvUnit))
    assert b.dense and b.out_channels == 64 and b.spatial_dims == 3


def test_width_scales_and_features_override():
    assert describe_backbone("highresnet", width=0.5).out_channels == 32
    b = describe_backbone("highresnet", features=(4, 8), dilations=(1, 2), blocks_per_stage=3)
    assert len([u for u in b.units if isinstance(u, Residual)]) == 6 and b.out_channels == 8


@pytest.mark.parametrize("kw", [dict(features=(4, 8), dilations=(1, 2, 4)), dict(blocks_per_stage=0), dict(spatial_dims=1)])
def test_inconsistent_arguments_are_refused(kw):
    with pytest.raises(ValueError):
        describe_backbone("highresnet", **{"spatial_dims": 2, **kw})
