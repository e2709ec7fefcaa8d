"""AdaShare's search schedule (section 3.3, appendix A, the authors' train.py): the schedule's
length and not the curriculum ends it, the temperature is annealed towards 0, the sampled policy
comes from the best epoch on validation data, the warm-up sees the whole training set, and the
policy losses weigh the same per task for any number of tasks and blocks."""

import math

import pytest
import torch
from ignite.metrics import Metric
from torch.utils.data import DataLoader, Dataset

from mtl_med.engines import MultiTaskEvaluator, MultiTaskPrepareBatch, MultiTaskTrainer
from mtl_med.losses import MultiTaskLoss
from mtl_med.sharing.adashare.losses import AdaShareRegularizer, adashare_sharing_loss, adashare_sparsity_loss, policy_loss_scales
from mtl_med.build import build_network
from mtl_med.sharing.adashare import AdaShareSearch

TINY = dict(widths=(2, 2, 4, 4), conv1_t_size=3, conv1_t_stride=1, no_max_pool=True)


class Items(Dataset):
    """Two regression tasks on 8x8 images; remembers which items were read."""

    def __init__(self, n=20, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 8, 8, generator=g)
        self.y = self.x.mean((1, 2, 3))[:, None]
        self.read: list[int] = []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.read.append(int(i))
        return {"image": self.x[i], "targets": {"a": self.y[i], "b": -self.y[i]}}


class Scripted(Metric):
    """A validation score read from a list, one value per evaluation."""

    def __init__(self, scores):
        self.scores, self.calls = list(scores), 0
        super().__init__(output_transform=lambda out: (out["pred"], out["label"]))

    def reset(self):
        pass

    def update(self, output):
        pass

    def compute(self):
        self.calls += 1
        return self.scores[self.calls - 1]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net():
    torch.manual_seed(0)
    return build_network("resnet18", "adashare", ["a", "b"], 1, spatial_dims=2, in_channels=1, **TINY)


def _search(net, data, **kw):
    loss = MultiTaskLoss({"a": torch.nn.L1Loss(), "b": torch.nn.L1Loss()})
    args = dict(batch_size=4, warmup_epochs=0, policy_epochs=1, seed=0, prepare_batch=MultiTaskPrepareBatch("image", "targets"),
                trainer_type=MultiTaskTrainer, evaluator_type=MultiTaskEvaluator)
    return AdaShareSearch(net, data, loss, **{**args, **kw})


def test_the_schedule_not_the_curriculum_ends_the_search_and_tau_anneals_towards_zero():
    net = _net()
    L = net.num_blocks
    s = _search(net, Items(), policy_epochs=L + 2, curriculum_speed=1, epoch_length=1, tau_final=0.01)
    s.run()
    assert [r["learned_blocks"] for r in s.history] == [*range(1, L + 1), L, L]  # the full policy keeps learning
    taus = [r["tau"] for r in s.history]
    assert all(a > b for a, b in zip(taus, taus[1:])) and taus[-1] == pytest.approx(0.01, rel=1e-6)
    # the authors' fixed factor (0.965 per epoch) and a slower curriculum (one block every 2 epochs)
    s = _search(_net(), Items(), policy_epochs=4, tau_factor=0.965, curriculum_speed=2, epoch_length=1)
    s.run()
    assert s.history[-1]["tau"] == pytest.approx(5.0 * 0.965**4, rel=1e-6)
    assert [r["learned_blocks"] for r in s.history] == [1, 1, 2, 2]


def test_iterations_set_warmup_and_policy_epochs():
    s = _search(_net(), Items(), iterations=100, warmup_fraction=0.2)
    assert s.schedule(full_iterations=5, weight_iterations=4, policy_iterations=1) == (20, 16)
    s = _search(_net(), Items(), warmup_epochs=3, policy_epochs=7)
    assert s.schedule(full_iterations=5, weight_iterations=4, policy_iterations=1) == (15, 7)


def test_the_policy_is_sampled_from_the_best_validated_epoch():
    net = _net()
    L = net.num_blocks
    data = Items()
    scores = [0.2, 0.9, 0.9, 0.1]  # epochs L .. L + 3; the tie goes to the later epoch
    metric = Scripted(scores)
    s = _search(net, data, policy_epochs=L + 3, epoch_length=1, policy_lr=0.5, deterministic_policy=True,
                val_data_loader=DataLoader(data, batch_size=10), key_metric={"score": metric})
    s.run()
    assert metric.calls == len(scores)  # scored only once every block is learned
    assert s.best == {"epoch": L + 2, "score": 0.9}
    at_best = torch.tensor(s.history[L + 1]["alpha"])
    assert not torch.allclose(at_best, torch.tensor(s.history[-1]["alpha"]))  # the logits moved on after it
    assert torch.allclose(s.alpha, at_best) and torch.equal(s.policy, at_best > 0.5)


def test_warmup_sees_the_whole_training_set_and_policy_epochs_their_own_parts():
    data = Items(n=20)
    s = _search(_net(), data, warmup_epochs=1, policy_epochs=1)
    net = s.network
    seen = []
    net.register_forward_pre_hook(lambda m, a: seen.append((m.policy.mode, len(data.read))))
    s.run()
    warm = data.read[: max(n for mode, n in seen if mode == "warmup")]
    assert sorted(warm) == list(range(20))  # all of it, not the 80% weight split


def test_normalised_policy_losses_pull_each_logit_alike_for_any_number_of_tasks_and_blocks():
    def grads(k, l):
        logits = torch.zeros(k, l, requires_grad=True)
        with torch.no_grad():
            logits[0] = 1.0  # task 0 differs from every other task
        AdaShareRegularizer(0.05, 0.05)(torch.sigmoid(logits)).backward()
        return logits.grad[0]

    g2, g10 = grads(2, 8), grads(10, 8)
    assert torch.allclose(g2, g10)  # the sharing pull on the odd task does not grow with K
    assert math.isclose(float(grads(2, 16)[0]) / float(grads(2, 8)[0]), 1.0, rel_tol=0.2)
    assert policy_loss_scales(2, 8) == (1 / 8, 1 / 2) and policy_loss_scales(10, 8) == (1 / 8, 1 / 18)
    alpha = torch.rand(3, 5)
    raw = AdaShareRegularizer(0.1, 0.2, normalize=False)(alpha)
    assert torch.allclose(raw, 0.1 * adashare_sparsity_loss(alpha) + 0.2 * adashare_sharing_loss(alpha))
    scaled = AdaShareRegularizer(0.1, 0.2)(alpha)
    assert torch.allclose(scaled, 0.1 / 5 * adashare_sparsity_loss(alpha) + 0.2 / 4 * adashare_sharing_loss(alpha))


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="curriculum_speed"):
        _search(_net(), Items(), curriculum_speed=0)
    with pytest.raises(ValueError, match="tau_final"):
        _search(_net(), Items(), tau_final=0.0)
    with pytest.raises(ValueError, match="key_metric"):
        _search(_net(), Items(), val_data_loader=DataLoader(Items()), key_metric=None)
