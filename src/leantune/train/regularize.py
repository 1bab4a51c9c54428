"""Penalties on the learned change, added to the task loss and logged apart from it.

The change is what training adds to the pretrained model: what each adapter layer gives as its
change (``change_entries``: for LoRA the update s·B·A of each adapted weight, for BitFit /
LayerNorm / sparse the learned deltas), for parameters trained in
place (full fine-tuning) θ − θ₀ against a copy of the pretrained values (L2-SP). Task heads,
which start from random values, are not penalized.

- ``l2``: Σ ‖change‖². A layer may compute it its own way (``l2_change``): LoRA's is
  s²·Σ (BᵀB) ⊙ (AAᵀ), two r×r matrices, so the (out, in) update is never built.
- ``l1``: Σ |change|, from each layer's ``change_entries`` (LoRA builds its update one layer
  at a time).
- ``ewc``: Σ F ⊙ change², F the empirical Fisher diagonal of the pretrained weights measured on
  task batches before training (Kirkpatrick et al., 2017).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from leantune.adapters.base import AdapterModule, Change
from leantune.adapters.inject import adapter_layers
from leantune.core.errors import LeantuneError


@dataclass
class Changes:
    """Where the learned change of a model lives (found once, before training)."""

    layers: list[tuple[str, AdapterModule]] = field(default_factory=list)
    """Adapter layers by module name; each gives its change (``change_entries``)."""
    anchors: dict[str, tuple[nn.Parameter, torch.Tensor]] = field(default_factory=dict)
    """Parameters trained in place, with their pretrained values."""


def find_changes(model: nn.Module, skip: Sequence[str] = ()) -> Changes:
    """The adapter layers and, for parameters trained in place outside adapters and outside
    ``skip`` (the task heads), a copy of their current values."""
    out = Changes()
    in_adapters: set[int] = set()
    for name, layer in adapter_layers(model):
        out.layers.append((name, layer))
        in_adapters |= {id(p) for p in layer.adapter_params().values()}
    inside = tuple(s + "." for s in skip)
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in in_adapters and not name.startswith(inside):
            out.anchors[name] = (p, p.detach().clone())
    return out


class Penalty:
    """The weighted terms ``l2``, ``l1`` and ``ewc`` of the change of the active adapter."""

    def __init__(
        self,
        model: nn.Module,
        *,
        l2: float = 0.0,
        l1: float = 0.0,
        ewc: float = 0.0,
        fisher: Mapping[str, torch.Tensor] | None = None,
        skip: Sequence[str] = (),
    ):
        for key, weight in (("l2", l2), ("l1", l1), ("ewc", ewc)):
            if weight < 0:
                raise LeantuneError(f"--{key} weight must be 0 or more, got {weight}")
        if ewc and not fisher:
            raise LeantuneError("EWC needs the Fisher diagonal of the pretrained weights")
        self.weights = {"l2": l2, "l1": l1, "ewc": ewc}
        self.fisher = dict(fisher or {})
        self.changes = find_changes(model, skip)

    def __bool__(self) -> bool:
        return any(self.weights.values())

    def terms(self, model: nn.Module, batch: int = 0) -> dict[str, torch.Tensor]:
        """Each nonzero-weight term, weighted, as a scalar tensor (differentiable); ``batch``
        (the training batch's index) changes nothing here."""
        parts: dict[str, list[torch.Tensor]] = {k: [] for k, w in self.weights.items() if w}
        for module, layer in self.changes.layers:
            name = layer.active_name()
            if name is None:
                continue
            if "l2" in parts:
                parts["l2"].append(layer.l2_change(name))
            if "l1" in parts or "ewc" in parts:
                for change in layer.change_entries(name):
                    self._entry_terms(parts, f"{module}.{change.base}", change)
        for pname, (p, p0) in self.changes.anchors.items():
            diff = p - p0
            if "l2" in parts:
                parts["l2"].append(diff.pow(2).sum())
            self._entry_terms(parts, pname, Change(pname, diff))
        return {k: self.weights[k] * torch.stack(v).sum() for k, v in parts.items() if v}

    def _entry_terms(self, parts: dict[str, list[torch.Tensor]], key: str, c: Change) -> None:
        """L1 and EWC of one change (``key``: the base parameter's name in the model)."""
        if "l1" in parts:
            parts["l1"].append(c.values.abs().sum())
        f = self.fisher.get(key)
        if "ewc" in parts and f is not None:
            f = f if c.indices is None else f.flatten()[c.indices]
            parts["ewc"].append((f * c.values.pow(2)).sum())

    __call__ = terms


def fisher_diagonal(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    names: Sequence[str],
) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal (mean over batches of the squared gradient) of the named
    parameters, in eval mode; ``requires_grad`` flags are restored."""
    if not batches:
        raise LeantuneError("the Fisher diagonal needs at least one batch")
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise LeantuneError(f"no parameter {missing[0]!r} in the model")
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    device = next(model.parameters()).device
    out = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for n in names:
            params[n].requires_grad_(True)
        model.eval()
        for batch in batches:
            for n in names:
                params[n].grad = None
            model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
            for n in names:
                g = params[n].grad
                if g is not None:
                    out[n] += g.float().pow(2)
    finally:
        for n in names:
            params[n].grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return {n: f / len(batches) for n, f in out.items()}
