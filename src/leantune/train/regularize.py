"""Penalties on the learned change, added to the task loss and logged apart from it.

The change is what training adds to the pretrained model: for LoRA the update s·B·A of each
adapted weight, for BitFit / LayerNorm / sparse the learned deltas, for parameters trained in
place (full fine-tuning) θ − θ₀ against a copy of the pretrained values (L2-SP). Task heads,
which start from random values, are not penalized.

- ``l2``: Σ ‖change‖². For LoRA it is s²·Σ (BᵀB) ⊙ (AAᵀ), two r×r matrices: the (out, in)
  update is never built.
- ``l1``: Σ |change|. There is no low-rank shortcut for LoRA, so the update is built one layer
  at a time.
- ``ewc``: Σ F ⊙ change², F the empirical Fisher diagonal of the pretrained weights measured on
  task batches before training (Kirkpatrick et al., 2017).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from leantune.errors import LeantuneError
from leantune.inject import adapter_layers
from leantune.methods.bitfit import BiasDelta, BitFitLayer
from leantune.methods.delta import DeltaLayer
from leantune.methods.layernorm import LayerNormLayer, NormDelta
from leantune.methods.lora import LoraLayer
from leantune.methods.sparse import MaskDelta, SparseLayer


def lora_l2(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖s·B·A‖_F² without building B·A: s²·Σ (BᵀB) ⊙ (AAᵀ)."""
    return scaling**2 * ((B.T @ B) * (A @ A.T)).sum()


@dataclass
class Changes:
    """Where the learned change of a model lives (found once, before training)."""

    lora: list[LoraLayer] = field(default_factory=list)
    deltas: list[DeltaLayer] = field(default_factory=list)
    anchors: dict[str, tuple[nn.Parameter, torch.Tensor]] = field(default_factory=dict)
    """Parameters trained in place, with their pretrained values."""


def find_changes(model: nn.Module, skip: Sequence[str] = ()) -> Changes:
    """The adapter layers of the active adapter and, for parameters trained in place outside
    adapters and outside ``skip`` (the task heads), a copy of their current values."""
    out = Changes()
    in_adapters: set[int] = set()
    for _, layer in adapter_layers(model):
        if isinstance(layer, LoraLayer):
            out.lora.append(layer)
        elif isinstance(layer, DeltaLayer):
            out.deltas.append(layer)
        in_adapters |= {id(p) for p in layer.adapter_params().values()}
    inside = tuple(s + "." for s in skip)
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in in_adapters and not name.startswith(inside):
            out.anchors[name] = (p, p.detach().clone())
    return out


def _delta_tensors(layer: DeltaLayer, name: str) -> Sequence[tuple[str, torch.Tensor]]:
    """(base tensor name, change) of one delta adapter, as flat tensors."""
    d = layer.delta[name]
    if isinstance(layer, BitFitLayer) and isinstance(d, BiasDelta):
        return [("bias", d.bias)]
    if isinstance(layer, LayerNormLayer) and isinstance(d, NormDelta):
        return [("weight", d.weight)] + ([("bias", d.bias)] if d.bias is not None else [])
    if isinstance(layer, SparseLayer) and isinstance(d, MaskDelta):
        return [("weight", d.values)]
    raise LeantuneError(f"no regularizer for {type(layer).__name__}")


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
        self.names = {id(m): n for n, m in model.named_modules()}
        self.changes = find_changes(model, skip)

    def __bool__(self) -> bool:
        return any(self.weights.values())

    def _active(self, layer: LoraLayer | DeltaLayer) -> str | None:
        name = layer._active
        if name is None or name in layer.merged or name not in layer.adapter_names():
            return None
        return name

    def terms(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Each nonzero-weight term, weighted, as a scalar tensor (differentiable)."""
        parts: dict[str, list[torch.Tensor]] = {k: [] for k, w in self.weights.items() if w}
        for layer in self.changes.lora:
            name = self._active(layer)
            if name is None:
                continue
            a = layer.adapter(name)
            if "l2" in parts:
                parts["l2"].append(lora_l2(a.A, a.B, a.scaling))
            if "l1" in parts or "ewc" in parts:
                delta = a.delta_weight()
                if "l1" in parts:
                    parts["l1"].append(delta.abs().sum())
                f = self.fisher.get(f"{self.names[id(layer)]}.weight")
                if "ewc" in parts and f is not None:
                    oi = f if isinstance(layer, nn.Linear) else f.T
                    parts["ewc"].append((oi * delta.pow(2)).sum())
        for dl in self.changes.deltas:
            name = self._active(dl)
            if name is None:
                continue
            module = self.names[id(dl)]
            for base, change in _delta_tensors(dl, name):
                if "l2" in parts:
                    parts["l2"].append(change.pow(2).sum())
                if "l1" in parts:
                    parts["l1"].append(change.abs().sum())
                f = self.fisher.get(f"{module}.{base}")
                if "ewc" in parts and f is not None:
                    if isinstance(dl, SparseLayer):
                        d = dl.delta[name]
                        assert isinstance(d, MaskDelta)
                        oi = f if isinstance(dl, nn.Linear) else f.T
                        f = oi.flatten()[d.indices]
                    parts["ewc"].append((f * change.pow(2)).sum())
        for pname, (p, p0) in self.changes.anchors.items():
            diff = p - p0
            if "l2" in parts:
                parts["l2"].append(diff.pow(2).sum())
            if "l1" in parts:
                parts["l1"].append(diff.abs().sum())
            f = self.fisher.get(pname)
            if "ewc" in parts and f is not None:
                parts["ewc"].append((f * diff.pow(2)).sum())
        return {k: self.weights[k] * torch.stack(v).sum() for k, v in parts.items() if v}

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
