"""AdaShare's policy search (Sun et al., NeurIPS 2020, section 3.3) on MONAI engines.

:class:`AdaShareSearch` runs the warm-up (every block shared, all the training data) and the
policy-learning phase (curriculum, alternating epochs on 80% of the training data for the weights
and 20% for the policy logits, temperature annealed towards 0, the policy scored on validation data
after each epoch), samples a discrete select-or-skip policy from the best one, and re-initialises
the network with it. The re-training phase is then the ordinary multi-task trainer run on the same
network object, so the bundle's trainer, validation, checkpoints and logging serve it unchanged.
The pieces of :mod:`.network` do the work; the engines it runs are the caller's (``trainer_type``,
``evaluator_type``: the bundles pass :class:`mtl_med.engines.MultiTaskTrainer` and
:class:`mtl_med.engines.MultiTaskEvaluator`), so this package needs no engine module.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mtl_med.errors import as_bool
from mtl_med.layers.gumbel import StepTemperature
from mtl_med.networks.utils import unwrap as _unwrap

from . import network as ada

__all__ = ["AdaShareSearch", "PolicyImageHandler"]

log = logging.getLogger(__name__)


def _loss_terms(output: Mapping) -> dict[str, float]:
    """The total loss and each task's term of a multi-task trainer's output, as scalars."""
    terms = {f"loss/{k}": float(v) for k, v in output.get("terms", {}).items()}
    terms["loss/total"] = float(output["loss"].detach())
    return terms


class PolicyImageHandler:
    """Logs the AdaShare policy as the paper's fig. 3 grid (``adashare/policy``, probability of
    executing each block per task, a cross on each skipped block of the most likely policy), the
    temperature and the fraction of executed blocks, on ``event`` of the engine it is attached to."""

    def __init__(self, summary_writer, network: nn.Module, event=Events.EPOCH_COMPLETED, step: Callable | None = None):
        self.writer, self.network, self.event, self.step = summary_writer, network, event, step

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(self.event, self)

    def __call__(self, engine: Engine | None = None, policy: torch.Tensor | None = None) -> None:
        if self.writer is None:
            return
        net, pm = _unwrap(self.network), ada.policy_module(self.network)
        step = self.step(engine) if self.step else (engine.state.epoch if engine is not None else 0)
        alpha = pm.select_probability().detach().cpu()
        chosen = pm.sample(deterministic=True).cpu() if policy is None else torch.as_tensor(policy).bool().cpu()
        image = ada.policy_image(alpha, chosen, getattr(net, "task_names", None), getattr(net, "block_names", None))
        self.writer.add_image("adashare/policy", image, step, dataformats="HWC")
        self.writer.add_scalar("adashare/temperature", float(pm.tau), step)
        self.writer.add_scalar("adashare/executed_fraction", float(chosen.float().mean()), step)


class AdaShareSearch:
    """Warm-up and policy learning of AdaShare; ``run()`` leaves ``network`` re-initialised with
    a policy sampled from the best learned distribution (mode ``"fixed"``), ready to be re-trained
    from scratch (section 3.3).

    The schedule (section 3.3, appendix A and the authors' ``train.py``): the warm-up trains the
    weights with every block shared on the whole training set; then each policy epoch (an
    *alternation*) trains the weights (SGD) on 80% of it and the logits (Adam) on the other 20%,
    with the temperature multiplied by ``tau_factor`` after it. The curriculum adds one block to
    the learned ones every ``curriculum_speed`` epochs; the schedule's length, not the curriculum,
    ends the phase, so the full policy keeps being learned once every block is in it. After each
    epoch in which every block is learned, the network is scored on the validation data with the
    most likely decisions; the logits of the best epoch are the ones sampled ("the best policy
    (evaluated after each epoch during the first stage)"; ties go to the later epoch, whose
    temperature is lower). Without validation data the last epoch's logits are sampled.

    Args:
        network: an AdaShare network (``build_network(<backbone>, "adashare", ...)``),
            possibly wrapped in DDP.
        trainer_type, evaluator_type: the engine classes the phases run on, called as
            :class:`mtl_med.engines.MultiTaskTrainer` and :class:`mtl_med.engines.MultiTaskEvaluator`
            are (the trainer's output holds ``loss`` and ``terms``).
        train_dataset: the training set; split 80/20 for weights / policy (``weight_fraction``);
            the warm-up uses all of it (the authors' code).
        loss_function: :class:`~mtl_med.losses.MultiTaskLoss` (adds the eq. 5-6 policy losses
            through the network's ``regularizer()``).
        prepare_batch: e.g. :class:`mtl_med.engines.MultiTaskPrepareBatch`.
        device: torch device.
        batch_size, num_workers: of the training loaders.
        warmup_epochs: epochs over the training set with every block executed (hard sharing).
        policy_epochs: policy-learning epochs (alternations).
        iterations: the whole search in iterations instead (appendix A: 20,000 on NYU v2), of which
            ``warmup_fraction`` (20%) warm up and the rest alternate (whole epochs, at least one);
            overrides ``warmup_epochs`` and ``policy_epochs``.
        curriculum_speed: policy epochs per added block (section 3.3: 1; the authors' code: 3).
        weight_lr, policy_lr, momentum, weight_decay: the weights' optimisers and Adam for the
            logits (section 4, Table 7: 0.001 and 0.01). The warm-up uses Adam with betas
            (0.5, 0.999), the policy phase SGD with ``momentum`` (the authors' code).
        weight_fraction: share of the training set for the weights (section 3.3: 80%).
        tau: initial temperature (section 3.2: 5).
        tau_factor: decay after each policy epoch (the authors' code: 0.965, which over their
            ~330 epochs ends near 3e-5). ``None``: the factor that brings ``tau`` to
            ``tau_final`` at the last epoch, so any schedule anneals "down to 0" (section 3.2).
        tau_final: the temperature the derived factor reaches.
        val_data_loader, key_metric: validation data and ``{name: ignite Metric}`` (higher is
            better) that pick the best epoch; fresh metric objects, not the ones of the bundle's
            evaluator (whose checkpoint and early-stopping handlers must not see the search).
        inferer, val_epoch_length, bn_inference: of the validation runs
            (:class:`~mtl_med.engines.MultiTaskEvaluator`).
        seed: seeds the split, the shuffling, the Gumbel noise, the sampled policy and the
            re-initialisation.
        deterministic_policy: take the most likely decisions instead of sampling the policy.
        policy_file: where to write the learned policy (JSON; ``None``: not written).
        summary_writer: TensorBoard writer for losses and the policy image (``None``: no logging).
        sampler: a callable ``dataset -> sampler`` for distributed training (e.g. DistributedSampler).
        epoch_length: iterations per epoch of every phase (``None``: one pass over the data).

    After ``run()``: ``policy`` (the sampled ``(K, L)`` policy), ``alpha`` (the select
    probabilities it was sampled from), ``best`` (epoch and score of the best epoch, or ``None``)
    and ``history`` (one record per policy epoch: losses, temperature, learned blocks, ``alpha``
    and the validation score).
    """

    def __init__(
        self,
        network: nn.Module,
        train_dataset: Dataset,
        loss_function: Callable,
        prepare_batch: Callable,
        trainer_type: Callable,
        evaluator_type: Callable | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 32,
        num_workers: int = 0,
        warmup_epochs: int = 10,
        policy_epochs: int = 40,
        iterations: int | None = None,
        warmup_fraction: float = 0.2,
        curriculum_speed: int = 1,
        weight_lr: float = 0.001,
        policy_lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        weight_fraction: float = 0.8,
        tau: float = 5.0,
        tau_factor: float | None = None,
        tau_final: float = 0.01,
        val_data_loader=None,
        key_metric: Mapping | None = None,
        inferer=None,
        val_epoch_length: int | None = None,
        bn_inference: str = "population",
        seed: int = 0,
        deterministic_policy: bool = False,
        policy_file: str | os.PathLike | None = None,
        summary_writer=None,
        sampler: Callable | None = None,
        epoch_length: int | None = None,
    ):
        if warmup_epochs < 0 or policy_epochs < 1:
            raise ValueError(f"need warmup_epochs >= 0 and policy_epochs >= 1, got {warmup_epochs} and {policy_epochs}")
        if iterations is not None and (int(iterations) < 1 or not 0.0 <= warmup_fraction < 1.0):
            raise ValueError(f"need iterations >= 1 and 0 <= warmup_fraction < 1, got {iterations} and {warmup_fraction}")
        if int(curriculum_speed) < 1:
            raise ValueError(f"curriculum_speed must be >= 1 policy epochs per block, got {curriculum_speed}")
        if tau <= 0 or tau_final <= 0 or (tau_factor is not None and not 0 < tau_factor <= 1):
            raise ValueError(f"need tau > 0, tau_final > 0 and tau_factor in (0, 1], got {tau}, {tau_final}, {tau_factor}")
        if val_data_loader is not None and len(key_metric or {}) != 1:
            raise ValueError(f"validation data needs exactly one key_metric to rank the epochs by, got {list(key_metric or {})}")
        ada.policy_module(network)  # a clear error for a network without a policy
        if val_data_loader is not None and evaluator_type is None:
            raise ValueError("validation data needs an evaluator_type to score the epochs with")
        self.network, self.dataset, self.loss_function, self.prepare_batch = network, train_dataset, loss_function, prepare_batch
        self.trainer_type, self.evaluator_type = trainer_type, evaluator_type
        self.device = torch.device(device)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.warmup_epochs, self.policy_epochs = int(warmup_epochs), int(policy_epochs)
        self.iterations, self.warmup_fraction = (None if iterations is None else int(iterations)), float(warmup_fraction)
        self.curriculum_speed = int(curriculum_speed)
        self.weight_lr, self.policy_lr, self.momentum, self.weight_decay = weight_lr, policy_lr, momentum, weight_decay
        self.weight_fraction, self.tau, self.tau_factor, self.tau_final = weight_fraction, float(tau), tau_factor, float(tau_final)
        self.val_data_loader, self.key_metric, self.inferer = val_data_loader, key_metric, inferer
        self.val_epoch_length, self.bn_inference = val_epoch_length, bn_inference
        self.seed, self.policy_file = int(seed), policy_file
        self.deterministic_policy = as_bool(deterministic_policy, "deterministic_policy")
        self.writer, self.sampler, self.epoch_length = summary_writer, sampler, epoch_length
        self.policy: torch.Tensor | None = None
        self.alpha: torch.Tensor | None = None
        self.best: dict | None = None
        self.history: list[dict] = []

    def _loader(self, dataset: Dataset, seed: int) -> DataLoader:
        if self.sampler is not None:
            return DataLoader(dataset, self.batch_size, sampler=self.sampler(dataset), num_workers=self.num_workers)
        g = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, self.batch_size, shuffle=True, num_workers=self.num_workers, generator=g)

    def _trainer(self, loader, optimizer, epochs: int, tag: str, generator, epoch_length: int | None = None):
        trainer = self.trainer_type(
            device=self.device,
            max_epochs=epochs,
            epoch_length=epoch_length or self.epoch_length,
            train_data_loader=loader,
            network=self.network,
            optimizer=optimizer,
            loss_function=self.loss_function,
            prepare_batch=self.prepare_batch,
            forward_kwargs={"generator": generator},
        )
        losses: list[float] = []
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: losses.clear())
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(_loss_terms(e.state.output)["loss/total"]))
        trainer.epoch_losses = losses  # type: ignore[attr-defined]
        if self.writer is not None:

            def log_terms(e):
                for k, v in _loss_terms(e.state.output).items():
                    self.writer.add_scalar(f"adashare_{tag}/{k}", v, e.state.iteration)

            trainer.add_event_handler(Events.ITERATION_COMPLETED, log_terms)
        return trainer

    def schedule(self, full_iterations: int, weight_iterations: int, policy_iterations: int) -> tuple[int, int]:
        """``(warm-up iterations, policy epochs)`` given the iterations of one pass over the whole
        training set, its weight part and its policy part."""
        if self.iterations is None:
            return self.warmup_epochs * full_iterations, self.policy_epochs
        warm = int(round(self.warmup_fraction * self.iterations))
        return warm, max(1, int(round((self.iterations - warm) / (weight_iterations + policy_iterations))))

    def temperature(self, policy_epochs: int) -> StepTemperature:
        """The temperature schedule: ``tau_factor`` per epoch, or the factor reaching ``tau_final``
        after ``policy_epochs`` epochs."""
        factor = self.tau_factor if self.tau_factor is not None else min(1.0, (self.tau_final / self.tau) ** (1.0 / policy_epochs))
        return StepTemperature(factor=factor, max_tau=self.tau, min_tau=min(self.tau_final, self.tau) if self.tau_factor is None else 1e-6)

    def _evaluator(self):
        if self.val_data_loader is None:
            return None
        return self.evaluator_type(
            device=self.device,
            val_data_loader=self.val_data_loader,
            network=self.network,
            epoch_length=self.val_epoch_length,
            prepare_batch=self.prepare_batch,
            inferer=self.inferer,
            key_val_metric=dict(self.key_metric),
            bn_inference=self.bn_inference,
        )

    def run(self) -> torch.Tensor:
        """Warm-up, policy learning, policy sampling and re-initialisation; returns the ``(K, L)`` policy."""
        net, pm = self.network, ada.policy_module(self.network)
        pm.set_tau(self.tau)
        weight_set, policy_set = ada.split_weight_policy_data(self.dataset, self.weight_fraction, self.seed)
        full_loader = self._loader(self.dataset, self.seed + 2)
        weight_loader, policy_loader = self._loader(weight_set, self.seed), self._loader(policy_set, self.seed + 1)
        w_opt, p_opt = ada.make_optimizers(net, self.weight_lr, self.policy_lr, self.momentum, self.weight_decay)
        gumbel = torch.Generator(device=self.device).manual_seed(self.seed)
        n_full, n_w, n_p = (self.epoch_length or len(loader) for loader in (full_loader, weight_loader, policy_loader))
        warmup_iterations, epochs = self.schedule(n_full, n_w, n_p)

        if warmup_iterations:
            ada.set_policy_mode(net, "warmup")
            # the authors' code warms up with Adam (betas 0.5, 0.999) on the whole training set
            warm_opt = torch.optim.Adam(ada.split_parameters(net)[0], lr=self.weight_lr, betas=(0.5, 0.999), weight_decay=self.weight_decay)
            self._trainer(full_loader, warm_opt, 1, "warmup", gumbel, epoch_length=warmup_iterations).run()
            log.info("AdaShare warm-up done (%d iterations)", warmup_iterations)

        ada.set_policy_mode(net, "learn")
        schedule = self.temperature(epochs)
        weights = self._trainer(weight_loader, w_opt, epochs, "policy_phase_weights", gumbel)
        policy = self._trainer(policy_loader, p_opt, 1, "policy_phase_policy", gumbel)
        evaluator = self._evaluator()
        image = PolicyImageHandler(self.writer, net)
        best_logits = None

        @weights.on(Events.EPOCH_STARTED)
        def curriculum(engine):
            n = ada.apply_curriculum(net, engine.state.epoch, self.curriculum_speed)
            log.info("AdaShare policy epoch %d: learning the last %d blocks", engine.state.epoch, n)

        @weights.on(Events.EPOCH_COMPLETED)
        def policy_step(engine):
            nonlocal best_logits
            # the alternation's second half: the logits on the held-out 20% (only p_opt steps)
            policy.run()
            pm.set_tau(schedule.step())
            record = {
                "epoch": engine.state.epoch,
                "learned_blocks": pm.num_learnable,
                "weight_loss": sum(weights.epoch_losses) / max(len(weights.epoch_losses), 1),
                "policy_loss": sum(policy.epoch_losses) / max(len(policy.epoch_losses), 1),
                "tau": float(pm.tau),
                "alpha": pm.select_probability().detach().cpu().tolist(),
            }
            if evaluator is not None and pm.num_learnable == pm.num_blocks:
                evaluator.run()
                record["score"] = score = float(evaluator.state.metrics[evaluator.state.key_metric_name])
                if self.best is None or score >= self.best["score"]:
                    self.best = {"epoch": engine.state.epoch, "score": score}
                    best_logits = pm.logits.detach().clone()
            self.history.append(record)
            if self.writer is not None:
                for k in ("weight_loss", "policy_loss", "score"):
                    if k in record:
                        self.writer.add_scalar(f"adashare/{k}", record[k], engine.state.epoch)
            image(engine)
            log.info("AdaShare %s", record)

        weights.run()
        if best_logits is not None:
            with torch.no_grad():
                pm.logits.copy_(best_logits)
            log.info("AdaShare best policy epoch %d (score %.4f)", self.best["epoch"], self.best["score"])
        elif evaluator is not None:
            log.warning("AdaShare: the curriculum never reached every block in %d policy epochs; sampling the last policy", epochs)
        self.alpha = pm.select_probability().detach().cpu()
        g = torch.Generator().manual_seed(self.seed)
        self.policy = ada.sample_policy(net, generator=g, deterministic=self.deterministic_policy).cpu()
        PolicyImageHandler(self.writer, net, step=lambda e: epochs + 1)(None, self.policy)
        if self.policy_file is not None:
            ada.export_policy_json(self.policy_file, net, self.policy)
        # re-training from scratch (section 3.3): fresh weights, same network object
        fresh = ada.build_retrain_network(net, self.policy, seed=self.seed)
        _unwrap(net).load_state_dict(fresh.state_dict())
        log.info("AdaShare policy (tasks x blocks, 1 = execute):\n%s", self.policy.int())
        return self.policy
