import pytest
import torch
from monai.handlers import MeanAbsoluteError
from torch.utils.tensorboard import SummaryWriter

from mtl_med.engines import (
    MultiTaskEvaluator,
    MultiTaskPrepareBatch,
    MultiTaskTrainer,
    loss_terms,
    parameter_groups,
    task_output,
)
from mtl_med.layers import ExponentialTemperature
from mtl_med.losses import MaskedDiceCELoss, MaskedRMSELoss, MultiTaskLoss
from mtl_med.build import build_network, sfg_highresnet
from mtl_med.sharing.sfg import GroupingHandler, TemperatureHandler, simplex_image


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 2:14, 2:14] = 1
    return [
        {
            "mr": torch.randn(2, 1, 16, 16, generator=g),
            "ct": torch.rand(2, 1, 16, 16, generator=g),
            "label": torch.randint(0, 6, (2, 1, 16, 16), generator=g),
            "mask": mask,
        }
        for _ in range(n)
    ]


class _SpyLoss(MaskedRMSELoss):
    masks = []

    def forward(self, input, target, mask=None):
        self.masks.append(mask)
        return super().forward(input, target, mask)


def test_trainer_runs_multitask_loss_with_mask_regularizer_and_temperature():
    torch.manual_seed(0)
    net = sfg_highresnet(features=(4, 8, 8))
    before = [p.detach().clone() for p in net.parameters()]
    spy = _SpyLoss()
    loss = MultiTaskLoss({"sct": spy, "seg": MaskedDiceCELoss()})
    schedule = ExponentialTemperature(rate=0.1)  # fast, to see it move
    trainer = MultiTaskTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=_batches(),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-3),
        loss_function=loss,
        prepare_batch=MultiTaskPrepareBatch("mr", {"sct": "ct", "seg": "label"}, mask_key="mask"),
        train_handlers=[TemperatureHandler(schedule, net)],
    )
    trainer.run()
    assert net.temperature == pytest.approx(schedule(2))  # set before the third iteration
    out = trainer.state.output
    assert set(out["terms"]) == {"sct", "seg", "regularizer"}
    assert set(loss_terms(out)) == {"loss/sct", "loss/seg", "loss/regularizer", "loss/total"}
    assert len(spy.masks) == 3 and all(m is not None and m.sum() == 2 * 144 for m in spy.masks)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_trainer_with_one_task_per_minibatch():
    from mtl_med.build import build_network

    net = build_network("resnet18", "routing", ("sct", "seg"), (1, 1), in_channels=1, widths=(4, 4, 8, 8))
    tasks = iter(["seg", "sct", "seg"])
    trainer = MultiTaskTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"x": torch.randn(2, 1, 16, 16), "a": torch.randn(2, 1), "b": torch.randn(2, 1)} for _ in range(3)],
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), 1e-3),
        loss_function=MultiTaskLoss({"sct": torch.nn.functional.mse_loss, "seg": torch.nn.functional.mse_loss}),
        prepare_batch=MultiTaskPrepareBatch("x", {"sct": "a", "seg": "b"}),
        task_sampler=lambda: next(tasks),
    )
    trainer.run()
    assert set(trainer.state.output["terms"]) - {"regularizer"} == {"seg"}


def test_evaluator_metric_of_one_task():
    torch.manual_seed(0)
    net = sfg_highresnet(features=(4, 8, 8))
    data = _batches(2)
    evaluator = MultiTaskEvaluator(
        device=torch.device("cpu"),
        val_data_loader=data,
        network=net,
        prepare_batch=MultiTaskPrepareBatch("mr", {"sct": "ct", "seg": "label"}, mask_key="mask"),
        key_val_metric={"sct_mae": MeanAbsoluteError(output_transform=task_output("sct"))},
        forward_kwargs={"generator": torch.Generator().manual_seed(0)},
    )
    net.set_inference("argmax")
    evaluator.run()
    net.eval()
    with torch.no_grad():
        expected = torch.cat([(net(b["mr"])["sct"] - b["ct"]).abs().flatten() for b in data]).mean()
    assert evaluator.state.metrics["sct_mae"] == pytest.approx(expected.item(), rel=1e-5)


def test_grouping_handler_writes_proportions_and_simplex_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from ignite.engine import Engine

    net = sfg_highresnet(features=(4, 8, 8))
    writer = SummaryWriter(tmp_path)
    engine = Engine(lambda e, b: None)
    GroupingHandler(writer, net, interval=1).attach(engine)
    engine.run([0], max_epochs=1)
    writer.flush()
    acc = EventAccumulator(str(tmp_path)).Reload()
    assert "sfg/sfg.0/shared" in acc.Tags()["scalars"]
    assert acc.Scalars("sfg/sfg.0/shared")[0].value == 1.0  # p = [0.2, 0.2, 0.6]: all argmax shared
    assert "sfg_simplex/sfg.4" in acc.Tags()["images"]


def test_simplex_image_places_points_by_probability():
    img = simplex_image(torch.tensor([[0.0, 0.0, 1.0]] * 5))
    assert img.dtype.name == "uint8" and img.ndim == 3 and img.shape[2] == 3
    h, w, _ = img.shape
    top, bottom = img[: h // 3], img[2 * h // 3 :]
    green = lambda a: ((a[..., 1].astype(int) - a[..., 0] > 40) & (a[..., 1].astype(int) - a[..., 2] > 40)).sum()  # noqa: E731
    assert green(top) > 0 and green(bottom) == 0  # all shared: the points sit at the top corner


def test_parameter_groups_speed_up_the_grouping_logits_only():
    net = sfg_highresnet(features=(4, 8, 8))
    params = list(net.parameters())
    assert parameter_groups(net, 1e-3, grouping_lr_scale=1.0) == params  # the paper's single rate: one plain group
    rest, logits = parameter_groups(net, 1e-3, grouping_lr_scale=20.0)
    assert logits["lr"] == pytest.approx(2e-2) and "lr" not in rest
    names = {id(p): n for n, p in net.named_parameters()}
    assert logits["params"] and all(names[id(p)].endswith("groups.theta") for p in logits["params"])
    assert len(rest["params"]) + len(logits["params"]) == len(params)
    opt = torch.optim.Adam(parameter_groups(net, 1e-3, grouping_lr_scale=20.0), lr=1e-3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 2e-2])
    for bad in (0, -1.0, float("nan"), "fast", None):
        with pytest.raises(ValueError, match="grouping_lr_scale must be a number > 0"):
            parameter_groups(net, 1e-3, grouping_lr_scale=bad)


def test_parameter_groups_of_a_method_without_its_own_rates_are_one_plain_group():
    net = build_network("highresnet", "hard_sharing", ["sct", "seg"], [1, 6], features=(4, 8, 8))
    assert parameter_groups(net, 1e-3, grouping_lr_scale=20.0) == list(net.parameters())
    wrapped = torch.nn.Module()
    wrapped.module = net  # as DDP: the wrapped network is asked
    assert parameter_groups(wrapped, 1e-3) == list(net.parameters())


def test_cpu_amp_trains_in_bfloat16_without_a_gradient_scaler():
    """``amp`` on a CPU: the forward pass runs in bfloat16 (autocast), the loss is not scaled, the
    weights stay float32 and move; without ``amp`` the same run computes in float32."""
    seen = {}

    def run(amp):
        torch.manual_seed(0)
        net = sfg_highresnet(features=(4, 8, 8))
        conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, i, o: seen.__setitem__(amp, o.dtype))
        before = [p.detach().clone() for p in net.parameters()]
        trainer = MultiTaskTrainer(
            device=torch.device("cpu"), max_epochs=1, train_data_loader=_batches(2), network=net,
            optimizer=torch.optim.Adam(net.parameters(), 1e-3),
            loss_function=MultiTaskLoss({"sct": MaskedRMSELoss(), "seg": MaskedDiceCELoss()}),
            prepare_batch=MultiTaskPrepareBatch("mr", {"sct": "ct", "seg": "label"}, mask_key="mask"), amp=amp,
        )
        trainer.run()
        assert all(p.dtype == torch.float32 for p in net.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
        return float(trainer.state.output["loss"])

    fp32, bf16 = run(False), run(True)
    assert seen == {False: torch.float32, True: torch.bfloat16}
    assert abs(bf16 - fp32) < 0.1 * abs(fp32)  # the same run, in lower precision
