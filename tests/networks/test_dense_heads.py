"""ASPP and FCN dense heads: every backbone with feature maps, every sharing method that builds, output at the
input's size."""

import copy

import pytest
import torch

from mtl_med.networks import BACKBONES
from mtl_med.build import build_network
from mtl_med.networks.dense_heads import ASPPHeads, FCNHeads
from mtl_med.sharing import METHODS

OUTS = {"seg": 5, "depth": 1, "normal": 3}
SMALL = {"highresnet": dict(width=0.25), "mnist_cnn": dict(width=0.25)}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_predicts_at_the_input_size(backbone):
    torch.manual_seed(0)
    for head in ("aspp", "fcn"):
        net = build_network(backbone, "hard_sharing", list(OUTS), OUTS, head=head, head_hidden=4, in_channels=3,
                            **SMALL.get(backbone, dict(width=0.0625)))
        out = net(torch.rand(2, 3, 33, 30))  # strides do not divide 33 x 30
        assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, c, 33, 30) for k, c in OUTS.items()}


@pytest.mark.parametrize("sharing", sorted(METHODS))
def test_every_sharing_method_with_feature_maps_takes_the_heads(sharing):
    backbone, kw = ("highresnet", dict(width=0.25, in_channels=3)) if sharing == "sfg" else ("resnet18", dict(width=0.0625))
    if sharing == "selective":
        kw = dict(kw, shared_width=16, branch_widths=[8, 6])
    torch.manual_seed(0)
    net = build_network(backbone, sharing, list(OUTS), OUTS, head="aspp", head_hidden=4, **kw)
    net.train()
    out = net(torch.rand(2, 3, 24, 20))
    assert all(v.shape[-2:] == (24, 20) for v in out.values())
    sum(v.mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in net.heads.parameters())


def test_selective_sharing_branches_end_in_the_same_kind_of_heads():
    """Each branch (1x1 FC layers on the feature map) ends in its task's ASPP / FCN head, rebuilt on the last
    branch width with the settings asked for; a merged task reads its survivor's branch through its own head."""
    for head, kind in (("aspp", ASPPHeads), ("fcn", FCNHeads)):
        torch.manual_seed(0)
        net = build_network("resnet18", "selective", list(OUTS), OUTS, head=head, head_hidden=5, width=0.0625,
                            shared_width=16, branch_widths=[8, 6]).eval()
        assert type(net.heads) is kind and net.pool is None
        first = net.heads.task_heads[0].branches[0][0] if head == "aspp" else net.heads.task_heads[0][0]
        assert (first.in_channels, first.out_channels) == (6, 5)
        with torch.no_grad():  # the branches start identical (section 3): make branch 2 differ
            net.branch_weights[0][2].add_(0.5)
        x = torch.rand(2, 3, 19, 21)
        before = net(x)
        assert {k: tuple(v.shape) for k, v in before.items()} == {k: (2, c, 19, 21) for k, c in OUTS.items()}
        net.merge([0, 2], survivor=0)  # seg and normal on branch 0
        after = net(x)
        assert torch.equal(after["seg"], before["seg"]) and not torch.allclose(after["normal"], before["normal"])
        shared = net.shared_features(x)
        assert torch.allclose(after["normal"], net.heads(net.branch(shared, 0), 2, size=(19, 21)))


def test_size_is_per_pass_not_state_and_follows_copies():
    net = build_network("resnet18", "hard_sharing", ["seg"], 3, head="fcn", width=0.0625).eval()
    assert net(torch.rand(1, 3, 40, 48))["seg"].shape[-2:] == (40, 48)
    assert net(torch.rand(1, 3, 17, 19))["seg"].shape[-2:] == (17, 19)
    twin = copy.deepcopy(net)
    twin(torch.rand(1, 3, 21, 22))
    assert net(torch.rand(1, 3, 18, 18))["seg"].shape[-2:] == (18, 18)
    assert twin(x=torch.rand(1, 3, 23, 25))["seg"].shape[-2:] == (23, 25)
    fresh = build_network("resnet18", "hard_sharing", ["seg"], 3, head="fcn", width=0.0625)
    fresh.load_state_dict(net.state_dict())  # nothing transient in the state dict


def test_heads_alone_take_a_size_and_aspp_has_the_deeplab_branches():
    aspp = ASPPHeads(2, 8, [2, 3], hidden=4).eval()
    assert len(aspp.task_heads[1].branches) == 4
    assert [b[0].dilation for b in aspp.task_heads[0].branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    x = torch.rand(1, 8, 4, 4)
    assert aspp(x, 1, size=(16, 16)).shape == (1, 3, 16, 16)
    assert FCNHeads(2, 8, [2]).eval()(x, 0).shape == (1, 2, 4, 4)
    with pytest.raises(ValueError, match="aspp"):
        build_network("resnet18", "hard_sharing", ["seg"], 3, head="deeplab")
