"""Adaptive budget during training, as AdaLoRA does it, on ordinary LoRA factors.

It works on any layer with rank components (``adapters.base.RankAdaptable``: LoRA's). Every
adapter is grown to ``factor`` × its rank (new rows of A drawn like LoRA's, new
columns of B zero, the scaling unchanged, so the model's function is unchanged). While training,
each entry's sensitivity |w·∂L/∂w| is smoothed (EMA β₁) with its uncertainty |s − s̄| (EMA β₂), as
in AdaLoRA (Zhang et al., 2023); a rank component's score is the sum of s̄·ū over its row of A
and column of B. Between ``start`` and ``end`` steps the trainable-parameter budget falls
cubically from the grown count to the target (the count before growing), and every ``every``
steps the lowest-scoring components are masked out (their A row and B column zeroed after each
optimizer step). A module keeps at least one component. :meth:`RankPruner.finalize` prunes to
the target exactly and slices the factors, so the saved adapter has that many parameters, its
ranks uneven (peft's ``rank_pattern`` / ``alpha_pattern``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from leantune.adapters.base import RankAdaptable
from leantune.adapters.inject import adapter_layers
from leantune.core.errors import LeantuneError


@dataclass
class _Unit:
    """One adapter of one layer under the pruner."""

    name: str
    layer: RankAdaptable
    adapter: str
    cost: int  # parameters per rank component: in + out
    mask: torch.Tensor  # (r,) bool, True = kept
    ipt: torch.Tensor | None = None  # smoothed sensitivity of A and B entries
    unc: torch.Tensor | None = None

    def factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.layer.rank_factors(self.adapter)

    @property
    def rank(self) -> int:
        return self.factors()[0].shape[0]


class RankPruner:
    def __init__(
        self,
        model: nn.Module,
        factor: float,
        total_steps: int,
        *,
        start: int,
        end: int,
        every: int = 10,
        beta1: float = 0.85,
        beta2: float = 0.85,
    ) -> None:
        if factor <= 1:
            raise LeantuneError("the adaptive budget's start factor must be above 1")
        units = []
        for layer_name, layer in adapter_layers(model):
            if not isinstance(layer, RankAdaptable):
                raise LeantuneError(
                    f"--adapt prunes rank components; {layer_name} holds "
                    f"{type(layer).__name__}, which has none"
                )
            for name in layer.adapter_names():
                refusal = layer.rank_refusal(name)
                if refusal:
                    raise LeantuneError(refusal)
                A, B = layer.rank_factors(name)
                cost = A.shape[1] + B.shape[0]
                units.append(_Unit(layer_name, layer, name, cost, torch.ones(0, dtype=torch.bool)))
        if not units:
            raise LeantuneError("--adapt needs LoRA adapters (--method lora or a LoRA plan)")
        self.units = units
        self.target = sum(u.rank * u.cost for u in units)
        for u in units:
            u.layer.grow_rank(u.adapter, max(u.rank + 1, math.ceil(u.rank * factor)))
            u.mask = torch.ones(u.rank, dtype=torch.bool, device=u.factors()[0].device)
        self.initial = self.params()
        self.total_steps, self.start, self.end = total_steps, start, max(end, start + 1)
        self.every, self.beta1, self.beta2 = every, beta1, beta2
        self.synced = False

    def params(self) -> int:
        return sum(int(u.mask.sum()) * u.cost for u in self.units)

    def budget(self, step: int) -> int:
        """AdaLoRA's cubic schedule from the grown count to the target."""
        if step <= self.start:
            return self.initial
        if step >= self.end:
            return self.target
        left = 1 - (step - self.start) / (self.end - self.start)
        return round(self.target + (self.initial - self.target) * left**3)

    @property
    def done(self) -> bool:
        return self.params() <= self.target

    def _sync(self) -> None:
        """Masks from the factors (a resumed run's pruned components are zero)."""
        for u in self.units:
            A, B = (f.detach() for f in u.factors())
            u.mask &= (A != 0).any(1) | (B != 0).any(0)
        self.synced = True

    @torch.no_grad()
    def observe(self, step: int) -> None:
        """Update the smoothed importance from this step's gradients (before the optimizer)."""
        if not self.synced:
            self._sync()
        for u in self.units:
            A, B = u.factors()
            if A.grad is None or B.grad is None:
                continue
            s = torch.cat([(A * A.grad).abs(), (B * B.grad).abs().T], dim=1)
            if u.ipt is None or u.unc is None:
                u.ipt, u.unc = s.clone(), torch.zeros_like(s)
            else:
                u.ipt.mul_(self.beta1).add_(s, alpha=1 - self.beta1)
                u.unc.mul_(self.beta2).add_((s - u.ipt).abs(), alpha=1 - self.beta2)

    def scores(self, u: _Unit) -> torch.Tensor:
        if u.ipt is None or u.unc is None:
            return torch.zeros(u.rank, device=u.mask.device)
        return (u.ipt * u.unc).sum(1)

    @torch.no_grad()
    def prune_to(self, budget: int) -> None:
        """Mask the lowest-scoring components until at most ``budget`` parameters are kept."""
        candidates = []
        for i, u in enumerate(self.units):
            if int(u.mask.sum()) <= 1:
                continue
            for j, score in enumerate(self.scores(u).tolist()):
                if u.mask[j]:
                    candidates.append((score, i, j))
        candidates.sort()
        params = self.params()
        for _, i, j in candidates:
            if params <= budget:
                break
            u = self.units[i]
            if int(u.mask.sum()) <= 1:
                continue
            u.mask[j] = False
            params -= u.cost

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Prune on schedule, then keep masked components at zero (Adam's moments would move
        them)."""
        if step % self.every == 0 or step >= self.end:
            self.prune_to(self.budget(step))
        for u in self.units:
            A, B = u.factors()
            A[~u.mask] = 0
            B[:, ~u.mask] = 0

    @torch.no_grad()
    def finalize(self) -> dict[str, int]:
        """Prune to the target and slice the factors; returns each module's final rank."""
        self._sync()
        self.prune_to(self.target)
        ranks = {}
        for u in self.units:
            keep = u.mask
            u.layer.keep_ranks(u.adapter, keep)
            u.mask = torch.ones(u.rank, dtype=torch.bool, device=keep.device)
            u.ipt = u.unc = None
            ranks[u.name] = u.rank
        return ranks
