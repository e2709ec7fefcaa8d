"""The generic vision bundle (bundles/vision_multitask) on its digits default: metadata, a few
training iterations of every variant, evaluation (per-task CSV, summary JSON with delta-m),
inference, and clear errors for bad config values. Workflows run in this process."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "vision_multitask"
SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
VARIANTS = sorted(p.stem for p in (BUNDLE / "configs" / "variants").glob("*.json"))
# tiny and fast: 16x16 images (VGG-11's pooling still fits), 2 iterations, 1 validation batch
FAST = dict(image_size=16, batch_size=16, val_batch_size=64, max_epochs=1, epoch_length=2, val_epoch_length=1,
            warmup_epochs=1, policy_epochs=1)


def workflow(configs, bundle_root, **overrides):
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / c) for c in configs],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        bundle_root=str(bundle_root),
        **overrides,
    )


def run(configs, bundle_root, **overrides):
    wf = workflow(configs, bundle_root, **overrides)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def messages(exc: BaseException) -> str:
    """The messages of an exception and of its causes (MONAI wraps instantiation errors)."""
    out = []
    while exc is not None:
        out.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(out)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks: one intra-op thread avoids thread contention on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


#: Branched MTN end to end on two tasks: single-task networks, affinity and tree, then the branched network
BRANCHED = dict(FAST, dataset_kwargs={"digits": [3, 8]}, affinity_images=40)


#: Selective Sharing clusters at every epoch end: three epochs, so the run records groups over epochs
SELECTIVE = dict(FAST, max_epochs=3)


def _train(root, variant):
    if variant == "selective_sharing":
        return run(["train.json", f"variants/{variant}.json"], root, **SELECTIVE)
    if variant != "branched":
        return run(["train.json", f"variants/{variant}.json"], root, **FAST)
    run(["train.json", "affinity.json"], root, encoder_config=[str(BUNDLE / "configs" / "train.json")], **BRANCHED)
    return run(["train.json", "variants/branched.json"], root, **BRANCHED)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """Every variant trained for two iterations; variant -> (bundle root, workflow)."""
    root = tmp_path_factory.mktemp("vision_bundle")
    return {v: (root / v, _train(root / v, v)) for v in VARIANTS}


def test_variants_cover_the_sharing_methods():
    assert set(VARIANTS) >= {"sfg", "tr_sigma0.2", "tr_sigma0.4", "tr_sigma0.8", "adashare", "cross_stitch", "hard_sharing", "single_task", "branched",
                             "selective_sharing"}


@pytest.mark.skipif(not SCHEMA.is_file(), reason="offline MONAI metadata schema (../shared/schemas) not available")
def test_metadata_passes_verify_metadata():
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(BUNDLE / "configs" / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert {"mtl_med", "pytorch-ignite", "scikit-learn"} <= set(meta["required_packages_version"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_trains_a_few_iterations_and_writes_a_checkpoint(trained, variant):
    root, wf = trained[variant]
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == FAST["epoch_length"] * trainer.state.max_epochs
    assert math.isfinite(float(trainer.state.output["loss"]))
    for name in ("model.pt", "model_final.pt"):
        state = torch.load(root / "models" / name, map_location="cpu", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())
    assert list((root / "eval" / "tensorboard").glob("events.out.tfevents.*"))


def _tags(root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(root / "eval" / "tensorboard")).Reload()
    return set(acc.Tags()["scalars"]), set(acc.Tags()["images"])


def test_tensorboard_has_per_task_losses_metrics_and_sharing_views(trained):
    scalars, _ = _tags(trained["hard_sharing"][0])
    assert {"loss/digit_0", "loss/digit_9", "loss/total", "digit_3/accuracy", "val_mean_accuracy"} <= scalars
    scalars, images = _tags(trained["sfg"][0])
    assert "sfg/temperature" in scalars and any(t.startswith("sfg/") and t.endswith("/shared") for t in scalars)
    assert any(t.startswith("sfg_simplex/") for t in images)
    scalars, images = _tags(trained["adashare"][0])
    assert "adashare/policy" in images and "adashare/temperature" in scalars


def test_variants_configure_the_network_they_name(trained):
    net = trained["tr_sigma0.2"][1].parser.get_parsed_content("network_def")
    assert (net.name, net.backbone_name) == ("routing", "vgg11_bn")
    masks = [m.masks for m in net.modules() if hasattr(m, "masks")]
    shared = masks[-1].all(0).float().mean()  # fraction of units every task uses
    assert shared == pytest.approx(0.2, abs=0.02)
    ada = trained["adashare"][1].parser.get_parsed_content("network_def")
    assert ada.policy.mode == "fixed"  # re-trained under the sampled policy
    policy = json.loads((trained["adashare"][0] / "models" / "policy.json").read_text())
    assert torch.equal(torch.tensor(policy["policy"]).bool(), ada.policy.policy.cpu())
    sfg = trained["sfg"][1].parser.get_parsed_content("network_def")
    assert (sfg.name, sfg.grouping) == ("sfg", "sfg")
    # the SFG paper's other baselines are the registered methods (A.4): single-task and cross-stitch columns
    # get 1 / T of the backbone's width each (its kernels split over the tasks), cross-stitch units sit after
    # every convolution, as SFG's layers do (appendix B)
    full = trained["hard_sharing"][1].parser.get_parsed_content("network_def")
    widths = lambda net: [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    for v in ("hard_sharing", "single_task", "cross_stitch"):
        net = trained[v][1].parser.get_parsed_content("network_def")
        assert (net.name, net.backbone_name) == (v, "vgg11_bn") and not hasattr(net, "grouping")
    T = full.num_tasks
    for v in ("single_task", "cross_stitch"):
        net = trained[v][1].parser.get_parsed_content("network_def")
        assert widths(net) == [w // T for w in widths(full)] * T
    cs = trained["cross_stitch"][1].parser.get_parsed_content("network_def")
    assert len(cs.stitches) == len(widths(full)) == 8
    # tasks take different paths through shared batch-norms: test with batch statistics (SFG A.4)
    bn = {v: trained[v][1].parser.get_parsed_content("validate#evaluator").bn_inference for v in VARIANTS}
    assert {v for v, b in bn.items() if b == "batch"} == {"sfg", "adashare", "tr_sigma0.2", "tr_sigma0.4", "tr_sigma0.8", "tr_knockout0.5"}
    knockout = trained["tr_knockout0.5"][1].parser.get_parsed_content("network_def").routing_layers()
    assert all(l.convention == "knockout" and (~l.masks).sum(1).tolist() == [l.num_units // 2] * 10 for l in knockout)


def test_train_json_alone_builds_what_its_hard_sharing_variant_builds(tmp_path):
    # train.json's default (sharing: hard_sharing) and variants/hard_sharing.json are one network under one name
    nets = []
    for configs in (["train.json"], ["train.json", "variants/hard_sharing.json"]):
        wf = workflow(configs, tmp_path, **FAST)
        torch.manual_seed(0)
        nets.append((wf.parser.get_parsed_content("variant"), wf.parser.get_parsed_content("network_def")))
    (va, a), (vb, b) = nets
    assert va == vb == "hard_sharing" and type(a) is type(b) and a.name == "hard_sharing"
    assert a.build_args == b.build_args and str(a) == str(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_evaluate_writes_per_task_csv_and_summary_with_delta_m(trained):
    single_root, _ = trained["single_task"]
    run(["train.json", "variants/single_task.json", "evaluate.json"], single_root, **FAST)
    root, _ = trained["tr_sigma0.4"]
    baseline = single_root / "eval" / "summary.json"
    run(["train.json", "variants/tr_sigma0.4.json", "evaluate.json"], root, baseline_file=str(baseline), **FAST)
    rows = list(csv.DictReader((root / "eval" / "metrics.csv").open()))
    assert [r["task"] for r in rows] == [f"digit_{k}" for k in range(10)]
    assert all(0.0 <= float(r[m]) <= 1.0 for r in rows for m in ("accuracy", "precision", "recall"))
    summary = json.loads((root / "eval" / "summary.json").read_text())
    assert summary["variant"] == "tr_sigma0.4"
    acc = {r["task"]: float(r["accuracy"]) for r in rows}
    base = json.loads(baseline.read_text())["tasks"]
    expected = sum((acc[t] - base[t]["accuracy"]["mean"]) / base[t]["accuracy"]["mean"] for t in acc) / len(acc)
    assert summary["delta_m"]["of_mean"] == pytest.approx(expected)
    assert summary["mean_accuracy"] == pytest.approx(sum(acc.values()) / len(acc))


def test_inference_writes_one_prediction_row_per_test_image(trained):
    from mtl_med.data.vision import load_digits_tasks

    root, _ = trained["hard_sharing"]
    run(["train.json", "variants/hard_sharing.json", "inference.json"], root, **{**FAST, "val_epoch_length": None})
    rows = list(csv.DictReader((root / "eval" / "predictions.csv").open()))
    test = load_digits_tasks("test")
    assert len(rows) == len(test) and {"index", "digit_0", "digit_0_prob", "digit_9"} <= set(rows[0])
    assert sorted(int(r["index"]) for r in rows) == list(range(len(test)))
    assert all(r["digit_4"] in ("0", "1") and 0.0 <= float(r["digit_4_prob"]) <= 1.0 for r in rows)


def test_inference_on_a_folder_of_the_users_images_names_each_row_after_its_file(trained, tmp_path):
    """dataset_dir: PNG files (8-bit, any size, RGB or grey) read with LoadImaged, predicted as the test split."""
    import numpy as np
    from PIL import Image
    from mtl_med.data.vision import load_digits_tasks

    root, _ = trained["hard_sharing"]
    test = load_digits_tasks("test")
    images = tmp_path / "mine"
    images.mkdir()
    for i in range(3):
        img = (test[i]["image"][0].numpy() * 255).astype(np.uint8)
        pil = Image.fromarray(img).resize((24, 24))
        (pil.convert("RGB") if i == 1 else pil).save(images / f"case.{i}.png")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "mine.csv"
    run(["train.json", "variants/hard_sharing.json", "inference.json"], root, dataset_dir=str(images),
        prediction_file=str(out), **{**FAST, "val_epoch_length": None})
    rows = list(csv.DictReader(out.open()))
    assert [r["index"] for r in rows] == ["case.0", "case.1", "case.2"]  # only the known suffix removed
    assert all(r["digit_4"] in ("0", "1") and 0.0 <= float(r["digit_4_prob"]) <= 1.0 for r in rows)


def test_inference_on_a_missing_folder_names_it(trained, tmp_path):
    root, _ = trained["hard_sharing"]
    with pytest.raises(Exception) as info:
        run(["train.json", "variants/hard_sharing.json", "inference.json"], root, dataset_dir=str(tmp_path / "nope"),
            prediction_file=str(tmp_path / "p.csv"), **FAST)
    assert str(tmp_path / "nope") in messages(info.value) and not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize(
    "variant,override,words",
    [
        ("hard_sharing", {"sharing": "soft_sharing"}, ["soft_sharing"]),
        ("tr_sigma0.4", {"sigma": 1.5}, ["sigma", "1.5"]),
        ("hard_sharing", {"dataset": "imagenet"}, ["imagenet"]),
        ("hard_sharing", {"dataset": "cifar10"}, ["cifar10", "data_root"]),
        ("adashare", {"backbone": "vgg11"}, ["adashare", "vgg11"]),
        ("sfg", {"grouping_lr_scale": 0}, ["grouping_lr_scale", "0"]),
        ("sfg", {"shared_init": "uniform"}, ["shared_init", "uniform"]),
    ],
)
def test_bad_config_values_raise_clear_errors(tmp_path, variant, override, words):
    with pytest.raises(Exception) as e:
        run(["train.json", f"variants/{variant}.json"], tmp_path, **{**FAST, **override})
    text = messages(e.value)
    assert all(w in text for w in words), text
    assert not (tmp_path / "models" / "model_final.pt").exists()


def test_sfg_on_the_placed_digits_pair_moves_its_grouping_logits_at_the_scaled_rate(tmp_path):
    # SFG's CPU-sized schedule (benchmarks/sfg_specialisation.py): the heterogeneous pair, a Dirichlet start of p
    # (section 5.4) and the grouping logits at 100x the weights' rate: Adam moves each logit by about its rate
    torch.manual_seed(0)
    wf = workflow(["train.json", "variants/sfg.json"], tmp_path, **{**FAST, "dataset": "placed_digits",
                  "dataset_kwargs": {"tasks": ["column", "odd"]}, "shared_init": "dirichlet", "grouping_lr_scale": 100.0})
    wf.initialize()
    net = wf.parser.get_parsed_content("network_def")
    assert net.task_names == ["column", "odd"]
    p0 = net.grouping_probabilities()
    assert p0["sfg.0"].std(0).min() > 0.05  # drawn per kernel
    theta0 = {n: p.detach().clone() for n, p in net.named_parameters() if n.endswith("groups.theta")}
    wf.run()
    opt = wf.parser.get_parsed_content("optimizer")
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 0.1])
    step = max(float((p.detach() - theta0[n]).abs().max()) for n, p in net.named_parameters() if n.endswith("groups.theta"))
    assert 0.1 < step < 0.21  # two Adam steps of about 0.1 each (at 1e-3 they would move 0.002)
    wf.finalize()


def test_early_stopping_ends_training_after_patience_validations_without_gain(tmp_path):
    # min_delta 1 makes any gain in accuracy too small: epoch 1 sets the best score, epoch 2 exhausts patience 1
    wf = run(["train.json", "variants/hard_sharing.json", "early_stopping.json"], tmp_path, **{**FAST, "max_epochs": 4, "patience": 1, "min_delta": 1.0})
    assert wf.parser.get_parsed_content("train#trainer").state.epoch == 2
    assert (tmp_path / "models" / "model_final.pt").is_file()


def test_two_process_ddp_with_early_stopping_ends_with_identical_weights(tmp_path):
    """2 gloo processes through multi_gpu_train.json: the same weights on both ranks, one event file,
    and early stopping that stops every rank at the same epoch (otherwise the run would hang)."""
    dump = tmp_path / "dump.json"
    # appended to multi_gpu_train.json's own finalize (which must work on every rank)
    dump.write_text(json.dumps({"+finalize": [
        "$torch.save({'epoch': @train#trainer.state.epoch, **@network_def.state_dict()}, @output_dir + f\"/rank{os.environ['RANK']}.pt\")",
    ]}))
    files = [str(BUNDLE / "configs" / n) for n in ("train.json", "variants/sfg.json", "multi_gpu_train.json", "early_stopping.json")]
    # AdaShare's schedule ids are not this run's: the bundle command refuses ids its configs do not define
    fast = {k: v for k, v in FAST.items() if k not in ("warmup_epochs", "policy_epochs")}
    overrides = {**fast, "max_epochs": 4, "patience": 1, "min_delta": 1.0, "bundle_root": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29562",
           "-m", "monai.bundle", "run", "--config_file", str(files + [str(dump)]),
           "--meta_file", str(BUNDLE / "configs" / "metadata.json"), "--logging_file", str(BUNDLE / "configs" / "logging.conf")]
    for k, v in overrides.items():
        cmd += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(tmp_path / "eval" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["epoch"] == b["epoch"] == 2
    assert a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    assert (tmp_path / "models" / "model_final.pt").is_file()
    assert len(list((tmp_path / "eval" / "tensorboard").glob("events.out.tfevents*"))) == 1  # rank 0 logs alone


def test_branched_pipeline_writes_its_artefacts_and_trains_the_tree(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mtl_med.sharing.branched import load_affinity, load_tree_json

    root, wf = trained["branched"]
    affinity = root / "affinity"
    for task in ("digit_3", "digit_8"):  # one single-task network per task, trained with the same recipe
        assert (affinity / "single_task" / task / "model_final.pt").is_file()
    tree = load_tree_json(affinity / "tree.json")
    assert tree["task_names"] == ["digit_3", "digit_8"] and tree["params"] <= tree["budget"]
    assert len(tree["config"]) == 4 and tree["search"] == "exhaustive"  # VGG-11: a stem and 4 blocks
    a = load_affinity(affinity / "affinity.npz")
    assert a.affinity.shape == (4, 2, 2) and a.num_images == 40
    assert {"affinity.png", "tree.png", "pareto.png"} <= {p.name for p in affinity.iterdir()}
    images = EventAccumulator(str(root / "eval" / "tensorboard")).Reload().Tags()["images"]
    assert {"branched/affinity", "branched/tree", "branched/pareto"} <= set(images)
    net = wf.parser.get_parsed_content("network_def")
    assert net.name == "branched" and net.config == tree["config"]
    assert sum(p.numel() for p in net.parameters()) == tree["params"]


def test_branched_variant_without_a_tree_says_what_to_run(tmp_path):
    with pytest.raises(Exception) as info:
        run(["train.json", "variants/branched.json"], tmp_path, **FAST)
    assert "tree.json" in messages(info.value) and "affinity.json" in messages(info.value)


def test_selective_sharing_records_groups_every_epoch(trained):
    root, wf = trained["selective_sharing"]
    net = wf.parser.get_parsed_content("network_def")
    assert (net.name, net.backbone_name) == ("selective", "mnist_cnn")
    assert net.shared.weight.shape == (640, 640) and [tuple(w.shape[1:]) for w in net.branch_weights] == [(100, 640), (50, 100)]
    optimizer = wf.parser.get_parsed_content("optimizer")  # the paper's SGD with momentum
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.02 and optimizer.defaults["momentum"] == 0.5
    record = json.loads((root / "eval" / "selective_sharing.json").read_text())
    epochs = record["epochs"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and record["task_names"] == [f"digit_{k}" for k in range(10)]
    for r in epochs:
        assert sorted(sum(r["groups"], [])) == sorted(record["task_names"]) and r["clustered"] == (not r["locked"] or r["lock_epoch"] == r["epoch"])
        assert r["batches"] == (FAST["epoch_length"] if r["clustered"] else 0)  # locked: nothing captured
        assert r["active_branches"] == len(r["groups"])
    assert epochs[-1]["branch_of_task"] == dict(zip(net.task_names, net.assignment()))
    assert epochs[-1]["active_parameters"] == net.active_parameter_count()
    # the checkpoint carries the groups
    state = torch.load(root / "models" / "model_final.pt", map_location="cpu", weights_only=True)
    assert state["model"]["branch_of_task"].tolist() == net.assignment()
    scalars, images = _tags(root)
    assert {"selective/active_branches", "selective/active_parameters", "selective/locked"} <= scalars
    assert {"selective/membership", "selective/clusters"} <= images


def test_selective_sharing_trains_and_evaluates_ranking_tasks(tmp_path):
    # eq. 7's pairwise loss on graded targets: digits posed as two ranking tasks
    over = dict(FAST, dataset_kwargs={"digits": [3, 8], "ranking_tasks": ["digit_3", "digit_8"]})
    wf = run(["train.json", "variants/selective_sharing.json"], tmp_path, **over)
    assert wf.parser.get_parsed_content("task_types") == {"digit_3": "ranking", "digit_8": "ranking"}
    run(["train.json", "variants/selective_sharing.json", "evaluate.json"], tmp_path, **over)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    taus = [summary["tasks"][t]["kendall_tau"]["mean"] for t in ("digit_3", "digit_8")]
    assert all(-1.0 <= t <= 1.0 for t in taus) and summary["mean_accuracy"] == pytest.approx(sum(taus) / 2)
    rows = list(csv.DictReader(open(tmp_path / "eval" / "metrics.csv")))
    assert [r["type"] for r in rows] == ["ranking", "ranking"] and all(r["kendall_tau"] for r in rows)
