"""AdaShare's policy search (Sun et al., NeurIPS 2020, section 3.3) on MONAI engines.

:class:`AdaShareSearch` runs the warm-up (every block shared) and the policy-learning phase
(curriculum, alternating epochs on 80% of the training data for the weights and 20% for the policy
logits, temperature annealing), samples a discrete select-or-skip policy, and re-initialises the
network with it. The re-training phase is then the ordinary multi-task trainer run on the same
network object, so the bundle's trainer, validation, checkpoints and logging serve it unchanged.
The pieces of :mod:`mtl_med.sharing.adashare` do the work.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mtl_med.errors import as_bool
from mtl_med.layers.gumbel import StepTemperature
from mtl_med.sharing import adashare as ada

from .multitask import MultiTaskTrainer, loss_terms

__all__ = ["AdaShareSearch", "PolicyImageHandler"]

log = logging.getLogger(__name__)


def _unwrap(network: nn.Module) -> nn.Module:
    return getattr(network, "module", network)


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
    the sampled policy (mode ``"fixed"``), ready to be re-trained from scratch (section 3.3).

    Args:
        network: an AdaShare network (``build_network(<backbone>, "adashare", ...)``),
            possibly wrapped in DDP.
        train_dataset: the training set; split 80/20 for weights / policy (``weight_fraction``).
        loss_function: :class:`~mtl_med.losses.MultiTaskLoss` (adds the eq. 5-6 policy losses
            through the network's ``regularizer()``).
        prepare_batch: e.g. :class:`~mtl_med.engines.MultiTaskPrepareBatch`.
        device: torch device.
        batch_size, num_workers: of both loaders.
        warmup_epochs: epochs with every block executed (hard sharing).
        policy_epochs: policy-learning epochs; epoch ``l`` learns the last ``l`` blocks (curriculum).
        weight_lr, policy_lr, momentum, weight_decay: SGD for the weights, Adam for the logits
            (section 4, Table 7: 0.001 and 0.01).
        weight_fraction: share of the training set for the weights (section 3.3: 80%).
        tau, tau_factor: initial temperature (5) and its decay after each alternation (0.965, the
            authors' code).
        seed: seeds the split, the shuffling, the Gumbel noise, the sampled policy and the
            re-initialisation.
        deterministic_policy: take the most likely decisions instead of sampling the policy.
        policy_file: where to write the learned policy (JSON; ``None``: not written).
        summary_writer: TensorBoard writer for losses and the policy image (``None``: no logging).
        sampler: a callable ``dataset -> sampler`` for distributed training (e.g. DistributedSampler).
        epoch_length: iterations per epoch of every phase (``None``: one pass over the data).
    """

    def __init__(
        self,
        network: nn.Module,
        train_dataset: Dataset,
        loss_function: Callable,
        prepare_batch: Callable,
        device: torch.device | str = "cpu",
        batch_size: int = 32,
        num_workers: int = 0,
        warmup_epochs: int = 10,
        policy_epochs: int = 10,
        weight_lr: float = 0.001,
        policy_lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        weight_fraction: float = 0.8,
        tau: float = 5.0,
        tau_factor: float = 0.965,
        seed: int = 0,
        deterministic_policy: bool = False,
        policy_file: str | os.PathLike | None = None,
        summary_writer=None,
        sampler: Callable | None = None,
        epoch_length: int | None = None,
    ):
        if warmup_epochs < 0 or policy_epochs < 1:
            raise ValueError(f"need warmup_epochs >= 0 and policy_epochs >= 1, got {warmup_epochs} and {policy_epochs}")
        ada.policy_module(network)  # a clear error for a network without a policy
        self.network, self.dataset, self.loss_function, self.prepare_batch = network, train_dataset, loss_function, prepare_batch
        self.device = torch.device(device)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.warmup_epochs, self.policy_epochs = int(warmup_epochs), int(policy_epochs)
        self.weight_lr, self.policy_lr, self.momentum, self.weight_decay = weight_lr, policy_lr, momentum, weight_decay
        self.weight_fraction, self.tau, self.tau_factor = weight_fraction, tau, tau_factor
        self.seed, self.policy_file = int(seed), policy_file
        self.deterministic_policy = as_bool(deterministic_policy, "deterministic_policy")
        self.writer, self.sampler, self.epoch_length = summary_writer, sampler, epoch_length
        self.policy: torch.Tensor | None = None
        self.history: list[dict] = []

    def _loader(self, dataset: Dataset, seed: int) -> DataLoader:
        if self.sampler is not None:
            return DataLoader(dataset, self.batch_size, sampler=self.sampler(dataset), num_workers=self.num_workers)
        g = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, self.batch_size, shuffle=True, num_workers=self.num_workers, generator=g)

    def _trainer(self, loader, optimizer, epochs: int, tag: str, generator) -> MultiTaskTrainer:
        trainer = MultiTaskTrainer(
            device=self.device,
            max_epochs=epochs,
            epoch_length=self.epoch_length,
            train_data_loader=loader,
            network=self.network,
            optimizer=optimizer,
            loss_function=self.loss_function,
            prepare_batch=self.prepare_batch,
            forward_kwargs={"generator": generator},
        )
        losses: list[float] = []
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: losses.clear())
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(loss_terms(e.state.output)["loss/total"]))
        trainer.epoch_losses = losses  # type: ignore[attr-defined]
        if self.writer is not None:

            def log_terms(e):
                for k, v in loss_terms(e.state.output).items():
                    self.writer.add_scalar(f"adashare_{tag}/{k}", v, e.state.iteration)

            trainer.add_event_handler(Events.ITERATION_COMPLETED, log_terms)
        return trainer

    def run(self) -> torch.Tensor:
        """Warm-up, policy learning, policy sampling and re-initialisation; returns the ``(K, L)`` policy."""
        net, pm = self.network, ada.policy_module(self.network)
        pm.set_tau(self.tau)
        weight_set, policy_set = ada.split_weight_policy_data(self.dataset, self.weight_fraction, self.seed)
        weight_loader, policy_loader = self._loader(weight_set, self.seed), self._loader(policy_set, self.seed + 1)
        w_opt, p_opt = ada.make_optimizers(net, self.weight_lr, self.policy_lr, self.momentum, self.weight_decay)
        gumbel = torch.Generator(device=self.device).manual_seed(self.seed)

        if self.warmup_epochs:
            ada.set_policy_mode(net, "warmup")
            self._trainer(weight_loader, w_opt, self.warmup_epochs, "warmup", gumbel).run()
            log.info("AdaShare warm-up done (%d epochs)", self.warmup_epochs)

        ada.set_policy_mode(net, "learn")
        schedule = StepTemperature(factor=self.tau_factor, max_tau=self.tau)
        weights = self._trainer(weight_loader, w_opt, self.policy_epochs, "policy_phase_weights", gumbel)
        policy = self._trainer(policy_loader, p_opt, 1, "policy_phase_policy", gumbel)
        image = PolicyImageHandler(self.writer, net)

        @weights.on(Events.EPOCH_STARTED)
        def curriculum(engine):
            n = ada.apply_curriculum(net, engine.state.epoch)
            log.info("AdaShare policy epoch %d: learning the last %d blocks", engine.state.epoch, n)

        @weights.on(Events.EPOCH_COMPLETED)
        def policy_step(engine):
            # the alternation's second half: the logits on the held-out 20% (only p_opt steps)
            policy.run()
            pm.set_tau(schedule.step())
            record = {
                "epoch": engine.state.epoch,
                "weight_loss": sum(weights.epoch_losses) / max(len(weights.epoch_losses), 1),
                "policy_loss": sum(policy.epoch_losses) / max(len(policy.epoch_losses), 1),
                "tau": float(pm.tau),
            }
            self.history.append(record)
            if self.writer is not None:
                for k in ("weight_loss", "policy_loss"):
                    self.writer.add_scalar(f"adashare/{k}", record[k], engine.state.epoch)
            image(engine)
            log.info("AdaShare %s", record)

        weights.run()
        g = torch.Generator().manual_seed(self.seed)
        self.policy = ada.sample_policy(net, generator=g, deterministic=self.deterministic_policy).cpu()
        PolicyImageHandler(self.writer, net, step=lambda e: self.policy_epochs + 1)(None, self.policy)
        if self.policy_file is not None:
            ada.export_policy_json(self.policy_file, net, self.policy)
        # re-training from scratch (section 3.3): fresh weights, same network object
        fresh = ada.build_retrain_network(net, self.policy, seed=self.seed)
        _unwrap(net).load_state_dict(fresh.state_dict())
        log.info("AdaShare policy (tasks x blocks, 1 = execute):\n%s", self.policy.int())
        return self.policy
