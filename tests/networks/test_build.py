"""build_network: the registries, the pairs that build, and clear errors for everything else."""

import itertools

import pytest
import torch

from mtl_med.networks import BACKBONES, HEADS, DenseHeads, PooledHeads, describe_backbone
from mtl_med.build import allowed_pairs, build_network
from mtl_med.sharing import METHODS

TASKS = ["a", "b", "c"]
RESNET = dict(widths=(4, 4, 8, 8), conv1_t_size=3, conv1_t_stride=1, no_max_pool=True)
#: the pairs whose method needs a structure the backbone lacks
REFUSED = {
    **{(b, "adashare"): "residual blocks" for b in ("vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "mnist_cnn")},
    **{(b, "sfg"): "stage transitions" for b in ("resnet18", "resnet34")},
}


def _hard(out=1, tasks=TASKS, **kw):
    torch.manual_seed(0)
    return build_network("resnet18", "hard_sharing", tasks, out, in_channels=1, **{**RESNET, **kw})


def test_registry_contents():
    assert set(BACKBONES) == {"highresnet", "resnet18", "resnet34", "vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "mnist_cnn"}
    assert {"hard_sharing", "single_task", "cross_stitch", "routing", "sfg", "adashare", "branched", "selective"} <= set(METHODS)
    assert all(m.name == name for name, m in METHODS.items())
    assert set(HEADS) == {"dense", "pooled"} and HEADS["dense"] is DenseHeads and HEADS["pooled"] is PooledHeads
    for name in BACKBONES:
        spec = describe_backbone(name)
        assert spec.name == name and spec.spatial_dims == 2 and spec.branch_points[-1] == len(spec.units) - 1


def test_allowed_pairs_build_and_refused_pairs_name_the_reason():
    pairs = allowed_pairs()
    assert set(pairs) == set(itertools.product(BACKBONES, METHODS))
    assert {p for p, reason in pairs.items() if reason} == set(REFUSED)
    for (backbone, sharing), words in REFUSED.items():
        assert words in pairs[(backbone, sharing)]
    assert allowed_pairs(spatial_dims=3) == pairs
    # every pair the networks were first written for is among them (SFG's single-task, hard-sharing and
    # cross-stitch baselines are the registered methods)
    first = {"vgg11": ("sfg", "single_task", "hard_sharing", "cross_stitch", "routing"),
             "vgg16": ("sfg", "single_task", "hard_sharing", "cross_stitch", "routing"),
             "resnet18": ("hard_sharing", "routing", "adashare", "cross_stitch"),
             "resnet34": ("hard_sharing", "routing", "adashare", "cross_stitch"),
             "highresnet": ("sfg", "single_task", "hard_sharing", "cross_stitch", "adashare")}
    assert all(pairs[(b, s)] is None for b, ss in first.items() for s in ss)


@pytest.mark.parametrize(
    "backbone,sharing,kw,cls",
    [("resnet18", "hard_sharing", RESNET, "hard_sharing"), ("vgg11_bn", "routing", dict(width=1 / 16), "routing"),
     ("highresnet", "adashare", dict(features=(4, 4, 4)), "adashare")],
)
def test_a_pair_builds_its_method_and_remembers_how(backbone, sharing, kw, cls):
    net = build_network(backbone, sharing, TASKS, {"a": 1, "b": 2, "c": 2}, in_channels=1, **kw)
    assert type(net) is METHODS[cls] and net.task_names == TASKS and net.backbone_name == backbone
    assert net.build_args["backbone"] == backbone and net.build_args["sharing"] == sharing
    assert all(net.build_args[k] == v for k, v in kw.items())
    again = build_network(**net.build_args)
    assert {k: v.shape for k, v in again.state_dict().items() if isinstance(v, torch.Tensor)} == {
        k: v.shape for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)
    }
    size = 8
    out = net.eval()(torch.rand(2, 1, size, size))
    assert list(out) == TASKS and out["a"].shape[:2] == (2, 1) and out["c"].shape[:2] == (2, 2)
    assert torch.as_tensor(net.regularizer()).ndim == 0


@pytest.mark.parametrize(
    "backbone,sharing,words",
    [
        ("vgg11", "adashare", ["adashare", "vgg11", "residual blocks"]),
        ("mnist_cnn", "adashare", ["adashare", "mnist_cnn", "residual blocks"]),
        ("resnet18", "sfg", ["sfg", "resnet18", "width or resolution"]),
        ("alexnet", "sfg", ["alexnet", "resnet18", "vgg16_bn"]),  # the known backbones are listed
        ("vgg11", "soft", ["soft", "routing", "adashare"]),  # the known methods are listed
    ],
)
def test_unknown_or_refused_values_raise_a_clear_error(backbone, sharing, words):
    with pytest.raises(ValueError) as e:
        build_network(backbone, sharing, TASKS, 2)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_method_refuses_a_backbone_however_it_is_built():
    spec = describe_backbone("vgg11")
    with pytest.raises(ValueError, match="residual blocks"):
        METHODS["adashare"](spec, TASKS, PooledHeads(2, spec.out_channels, [1, 1, 1]))
    with pytest.raises(ValueError, match="unknown backbone 'alexnet'"):
        describe_backbone("alexnet")


def test_unknown_arguments_are_named_with_what_is_accepted():
    with pytest.raises(ValueError) as e:
        build_network("vgg11", "routing", TASKS, 2, width=0.1, sigmaa=0.5)
    msg = str(e.value)
    assert "sigmaa" in msg and "sigma" in msg.split("method")[-1] and "width" in msg
    # an argument of another method is not silently dropped
    with pytest.raises(ValueError, match="tau"):
        build_network("resnet18", "routing", TASKS, 2, tau=1.0)
    with pytest.raises(ValueError, match="sigma"):
        build_network("highresnet", "hard_sharing", TASKS, 2, sigma=0.5)


def test_sharing_args_hold_each_methods_own_arguments_and_only_the_built_ones_are_used():
    # one config for every method: the SFG settings of the pelvis bundle do not stop --sharing hard_sharing
    args = {"sfg": {"grouping": "constant_p", "lambda1": 1e-5}, "routing": {"sigma": 0.5}}
    sfg = build_network("highresnet", "sfg", TASKS, 2, features=(4, 8, 8), sharing_args=args)
    assert (sfg.grouping, sfg.lambda1) == ("constant_p", 1e-5)
    assert sfg.rebuild().grouping == "constant_p"
    hard = build_network("highresnet", "hard_sharing", TASKS, 2, features=(4, 8, 8), sharing_args=args)
    assert hard.name == "hard_sharing" and hard.build_args["sharing_args"] == args
    with pytest.raises(ValueError, match="groupin"):  # the built method's entry is checked as kwargs are
        build_network("highresnet", "sfg", TASKS, 2, features=(4, 8, 8), sharing_args={"sfg": {"groupin": "sfg"}})
    with pytest.raises(ValueError, match="sgf"):  # a misspelt method name is not silently ignored
        build_network("highresnet", "hard_sharing", TASKS, 2, features=(4, 8, 8), sharing_args={"sgf": {}})
    with pytest.raises(ValueError, match="both"):
        build_network("highresnet", "sfg", TASKS, 2, features=(4, 8, 8), grouping="sfg", sharing_args={"sfg": {"grouping": "sfg"}})


def test_backbone_arguments_are_checked():
    with pytest.raises(ValueError, match="spatial_dims"):
        build_network("resnet18", "hard_sharing", TASKS, 2, spatial_dims=1)
    with pytest.raises(ValueError, match="width"):
        build_network("vgg11", "hard_sharing", TASKS, 2, width=0)


def test_out_channels_forms():
    x = torch.randn(2, 1, 8, 8)
    for out, expected in ((2, [2, 2, 2]), ([1, 2, 3], [1, 2, 3]), ((3, 1, 2), [3, 1, 2]), ({"c": 3, "a": 1, "b": 2}, [1, 2, 3])):
        net = _hard(out)
        assert net.heads.out_channels == expected
        assert [v.shape[1] for v in net(x).values()] == expected
    with pytest.raises(ValueError, match=r"no entry for tasks \['c'\]"):
        _hard({"a": 1, "b": 2})
    with pytest.raises(ValueError, match="2 entries for 3 tasks"):
        _hard([1, 2])
    with pytest.raises(ValueError, match="output"):
        _hard([1, 0, 2])


def test_heads_follow_the_backbone_unless_asked():
    torch.manual_seed(0)
    dense = build_network("highresnet", "hard_sharing", ["s"], 2, features=(4, 4, 4))
    assert isinstance(dense.heads, DenseHeads) and dense(torch.randn(1, 1, 8, 8))["s"].shape == (1, 2, 8, 8)
    pooled = build_network("highresnet", "hard_sharing", ["s"], 2, features=(4, 4, 4), head="pooled", head_hidden=5)
    assert isinstance(pooled.heads, PooledHeads) and pooled(torch.randn(1, 1, 8, 8))["s"].shape == (1, 2)
    assert pooled.heads.weights[0].shape == (1, 5, 4)
    vgg = build_network("vgg11", "hard_sharing", ["s"], 2, width=1 / 16)
    assert isinstance(vgg.heads, PooledHeads) and vgg.heads.weights[0].shape == (1, 32, 32)  # hidden = last width
    assert _hard().heads.weights[0].shape == (3, 1, 8)  # ResNet: linear heads
    with pytest.raises(ValueError, match="head must be one of"):
        build_network("vgg11", "hard_sharing", ["s"], 2, width=1 / 16, head="conv")
