"""AdaShare select-or-skip policy over residual blocks (Sun et al., NeurIPS 2020, section 3).

Per task ``k`` and block ``l`` the policy is a two-way distribution ``pi_{l,k} = [1 - alpha_{l,k},
alpha_{l,k}]`` (index 0 = skip, index 1 = select, as eq. 2-3), parametrised by unnormalised
logits ``(num_tasks, num_blocks, 2)``; ``alpha = softmax(logits)[..., 1]`` is the probability of
executing the block. A gated block returns ``u * block(x) + (1 - u) * shortcut(x)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtl_med.layers.gumbel import gumbel_softmax

__all__ = ["BlockPolicy", "POLICY_MODES"]

#: ``"warmup"``: every block executed by every task (hard sharing, section 3.3 warm-up);
#: ``"learn"``: soft Gumbel-Softmax decisions in forward and backward (section 3.2);
#: ``"fixed"``: a discrete policy (the re-training phase and inference).
POLICY_MODES = ("warmup", "learn", "fixed")


class BlockPolicy(nn.Module):
    """Select-or-skip logits for ``num_blocks`` blocks and ``num_tasks`` tasks.

    Args:
        num_tasks: number of tasks ``K``.
        num_blocks: number of gated blocks ``L``.
        tau: initial Gumbel-Softmax temperature (section 3.2: 5, annealed towards 0).
        init_logit: initial value of the select logit (skip logit 0); 0 gives ``alpha = 0.5``.
        policy: optional discrete ``(K, L)`` policy; when given, the mode starts as ``"fixed"``.

    State: ``logits`` (parameter), ``tau`` and ``policy`` (buffers), ``mode`` and
    ``num_learnable`` (curriculum, section 3.3: only the last ``num_learnable`` blocks are learned,
    the others are executed and their logits get no gradient) travel in ``state_dict`` as extra state.
    """

    def __init__(
        self,
        num_tasks: int,
        num_blocks: int,
        tau: float = 5.0,
        init_logit: float = 0.0,
        policy: torch.Tensor | Sequence | None = None,
    ):
        super().__init__()
        if num_tasks < 1 or num_blocks < 1:
            raise ValueError(f"need num_tasks >= 1 and num_blocks >= 1, got {num_tasks=}, {num_blocks=}")
        self.num_tasks, self.num_blocks = int(num_tasks), int(num_blocks)
        logits = torch.zeros(self.num_tasks, self.num_blocks, 2)
        logits[..., 1] = float(init_logit)
        self.logits = nn.Parameter(logits)
        self.register_buffer("tau", torch.tensor(float(tau)))
        self.register_buffer("policy", torch.ones(self.num_tasks, self.num_blocks, dtype=torch.bool))
        self.mode = "warmup"
        self.num_learnable = self.num_blocks
        if policy is not None:
            self.set_policy(policy)

    # --- state -------------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"mode": self.mode, "num_learnable": self.num_learnable}

    def set_extra_state(self, state: dict) -> None:
        self.set_mode(state["mode"])
        self.num_learnable = int(state["num_learnable"])

    def set_mode(self, mode: str) -> None:
        if mode not in POLICY_MODES:
            raise ValueError(f"mode must be one of {POLICY_MODES}, got {mode!r}")
        self.mode = mode

    def set_tau(self, tau: float) -> None:
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.tau.fill_(float(tau))

    def set_num_learnable(self, n: int) -> None:
        """Curriculum (section 3.3): learn the policy of the last ``n`` blocks only (0 <= n <= L)."""
        if not 0 <= int(n) <= self.num_blocks:
            raise ValueError(f"num_learnable must be in [0, {self.num_blocks}], got {n}")
        self.num_learnable = int(n)

    def set_policy(self, policy: torch.Tensor | Sequence) -> None:
        """Use a discrete ``(K, L)`` select (1) / skip (0) policy and switch to ``"fixed"``."""
        p = torch.as_tensor(policy).to(self.policy.device).bool()
        if p.shape != (self.num_tasks, self.num_blocks):
            raise ValueError(f"policy must have shape ({self.num_tasks}, {self.num_blocks}), got {tuple(p.shape)}")
        self.policy.copy_(p)
        self.mode = "fixed"

    # --- policy ------------------------------------------------------------------------------
    def frozen(self) -> torch.Tensor:
        """``(L,)`` bool: blocks whose logits the curriculum keeps frozen (the first ``L - n``)."""
        f = torch.zeros(self.num_blocks, dtype=torch.bool, device=self.logits.device)
        f[: self.num_blocks - self.num_learnable] = True
        return f

    def effective_logits(self) -> torch.Tensor:
        """The logits with the curriculum-frozen blocks detached (they get exactly zero gradient)."""
        frozen = self.frozen()
        if not bool(frozen.any()):
            return self.logits
        return torch.where(frozen[None, :, None], self.logits.detach(), self.logits)

    def select_probability(self, effective: bool = False) -> torch.Tensor:
        """``alpha`` of eq. 2-6: ``(K, L)`` probabilities of executing each block."""
        logits = self.effective_logits() if effective else self.logits
        return logits.softmax(-1)[..., 1]

    def gates(self, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """``(K, L)`` select weights for the current mode, or ``None`` when every block runs.

        In ``"learn"`` mode and training, soft Gumbel-Softmax samples (eq. 3) at temperature
        ``tau`` with curriculum-frozen blocks set to 1 (executed); in evaluation, the most likely
        decision (deterministic). ``"fixed"`` returns the discrete policy.
        """
        if self.mode == "warmup":
            return None
        if self.mode == "fixed":
            return self.policy.to(self.logits.dtype)
        if self.training:
            v = gumbel_softmax(self.logits, float(self.tau), hard=False, dim=-1, generator=generator)[..., 1]
        else:
            v = (self.logits[..., 1] > self.logits[..., 0]).to(self.logits.dtype)
        # Curriculum-frozen blocks run. The paper does not say; the authors' code pads their
        # decisions with "select" (MTL2.forward). They keep the warm-up's hard sharing their
        # weights were trained for, and as their logits get no gradient, sampling them would only
        # train the weights on coin flips that no policy update could correct.
        frozen = self.frozen()
        if bool(frozen.any()):
            v = torch.where(frozen[None, :], torch.ones_like(v), v)
        return v

    @torch.no_grad()
    def sample(self, generator: torch.Generator | None = None, deterministic: bool = False) -> torch.Tensor:
        """A discrete ``(K, L)`` bool policy drawn from ``pi`` (section 3.3, second stage).

        ``deterministic`` takes the most likely decision instead of sampling.
        """
        alpha = self.select_probability()
        if deterministic:
            return alpha > 0.5
        u = torch.rand(alpha.shape, generator=generator, device=alpha.device if generator is None else generator.device)
        return u.to(alpha.device) < alpha

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, num_blocks={self.num_blocks}, mode={self.mode!r}, tau={float(self.tau):.4g}"
