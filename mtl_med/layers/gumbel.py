"""Relaxed categorical (Gumbel-Softmax) sampling and temperature schedules.

``torch.nn.functional.gumbel_softmax`` draws its noise from the global RNG; the project makes
randomness explicit (a ``torch.Generator`` in, same draws out), so the few lines of the
reparametrisation are written here with a generator argument. Everything else follows
Jang et al. (2017) and Maddison et al. (2017).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "sample_gumbel",
    "gumbel_softmax",
    "ExponentialTemperature",
    "StepTemperature",
]


def sample_gumbel(shape, *, device=None, dtype=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel(0, 1) noise, ``-log(E)`` with ``E ~ Exp(1)`` (as torch's own gumbel_softmax)."""
    e = torch.empty(shape, device=device, dtype=dtype or torch.get_default_dtype()).exponential_(generator=generator)
    return -e.log()


def gumbel_softmax(
    logits: torch.Tensor,
    tau: float | torch.Tensor = 1.0,
    hard: bool = False,
    dim: int = -1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A sample from the Gumbel-Softmax distribution GSM(softmax(logits), tau).

    Args:
        logits: unnormalised log-probabilities; ``-inf`` entries are never drawn.
        tau: temperature (> 0).
        hard: return one-hot samples whose gradient is that of the soft sample
            (straight-through estimator). Entries that are zero in the forward value are
            exactly zero (``-s + s == 0`` in IEEE arithmetic), so a hard sample routes no
            signal through the groups it did not pick.
        dim: the category axis.
        generator: source of the noise.
    """
    g = sample_gumbel(logits.shape, device=logits.device, dtype=logits.dtype, generator=generator)
    y_soft = ((logits + g) / tau).softmax(dim)
    if not hard:
        return y_soft
    index = y_soft.argmax(dim, keepdim=True)
    y_hard = torch.zeros_like(y_soft).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


class ExponentialTemperature:
    """``tau(t) = max(min_tau, max_tau * exp(-rate * t))``.

    SFG paper, appendix A.1: ``tau = max(0.10, exp(-r t))`` with ``r = 1e-5``, from Jang et al.
    An object any engine can step: ``step()`` once per iteration, ``value`` is the current
    temperature, ``state_dict``/``load_state_dict`` make it part of a checkpoint.
    """

    def __init__(self, rate: float = 1e-5, min_tau: float = 0.10, max_tau: float = 1.0, iteration: int = 0):
        if rate < 0 or min_tau <= 0 or max_tau < min_tau:
            raise ValueError(f"need rate >= 0 and 0 < min_tau <= max_tau, got {rate=}, {min_tau=}, {max_tau=}")
        self.rate, self.min_tau, self.max_tau = float(rate), float(min_tau), float(max_tau)
        self.iteration = int(iteration)

    def __call__(self, iteration: int) -> float:
        return max(self.min_tau, self.max_tau * math.exp(-self.rate * iteration))

    @property
    def value(self) -> float:
        return self(self.iteration)

    def step(self, n: int = 1) -> float:
        self.iteration += n
        return self.value

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rate={self.rate}, min_tau={self.min_tau}, max_tau={self.max_tau}, iteration={self.iteration})"


class StepTemperature(ExponentialTemperature):
    """``tau(n) = max(min_tau, max_tau * factor ** n)``, one ``step()`` per decay event.

    AdaShare's official code multiplies tau (initially 5) by 0.965 after each weight/policy
    alternation; with ``min_tau`` near zero this is the paper's "anneal toward 0".
    """

    def __init__(self, factor: float = 0.965, min_tau: float = 1e-6, max_tau: float = 5.0, iteration: int = 0):
        if not 0 < factor <= 1:
            raise ValueError(f"factor must be in (0, 1], got {factor}")
        super().__init__(rate=-math.log(factor), min_tau=min_tau, max_tau=max_tau, iteration=iteration)
        self.factor = float(factor)

    def __call__(self, iteration: int) -> float:
        return max(self.min_tau, self.max_tau * self.factor**iteration)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(factor={self.factor}, min_tau={self.min_tau}, max_tau={self.max_tau}, iteration={self.iteration})"
