"""What BitFit, LayerNorm tuning and sparse fine-tuning share: a small learned change to a
layer's own parameters, kept beside them until merged.

A delta layer *is* the layer it adapts (``AdapterLayer.adopt`` builds its class from the
method's layer class and the base layer's type), with the same ``weight``/``bias`` parameters
under the same names. Adapters live in ``<layer>.delta.<adapter name>``; the unmerged forward
is the base forward plus the adapter's contribution, so the frozen weights are never copied.
Merging adds the change into the base parameters and unmerging subtracts it again.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from leantune.adapters.base import AdapterLayer
from leantune.core.errors import LeantuneError


class DeltaLayer(AdapterLayer):
    """Base of a layer holding named deltas; subclasses say what a delta is and does."""

    store: ClassVar[str] = "delta"
    delta: nn.ModuleDict

    # --- what a method defines

    def new_delta(self, size: int, module_name: str) -> nn.Module:
        """A fresh delta of ``size`` trainable values whose contribution starts at zero."""
        raise NotImplementedError

    def contribution(self, delta: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (the base output for input ``x``) with ``delta``'s effect added."""
        raise NotImplementedError

    def fold(self, delta: nn.Module, sign: float) -> None:
        """Add (sign 1) or subtract (sign -1) ``delta`` into the base parameters, in place."""
        raise NotImplementedError

    def delta_size(self, delta: nn.Module) -> int:
        return sum(p.numel() for p in delta.parameters())

    # --- AdapterLayer hooks

    def apply_adapter(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.contribution(self.delta[name], x, out)

    def merge_adapter(self, name: str) -> None:
        self.fold(self.delta[name], 1.0)

    def unmerge_adapter(self, name: str) -> None:
        self.fold(self.delta[name], -1.0)

    def add_adapter(self, name: str, size: int, module_name: str) -> None:
        if name in self.delta:
            raise LeantuneError(f"adapter {name!r} is already on this layer")
        delta = self.new_delta(size, module_name)
        delta.to(device=self.weight.device)
        self.delta[name] = delta

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors (parameters and index buffers) as files store them:
        ``leantune_<method>.<name>`` (docs/FORMAT.md)."""
        return {k: t.detach() for k, t in self.file_targets(name).items()}

    def file_targets(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors a file's values are copied into, by the same keys as file_tensors."""
        d = self.delta[name]
        prefix = f"leantune_{self.method}."
        return {prefix + k: t for k, t in [*d.named_parameters(), *d.named_buffers()]}
