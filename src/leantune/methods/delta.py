"""What BitFit, LayerNorm tuning and sparse fine-tuning share: a small learned change to a
layer's own parameters, kept beside them until merged.

A delta layer *is* the layer it adapts (a class made from ``DeltaLayer`` and the base layer's
type), with the same ``weight``/``bias`` parameters under the same names. Adapters live in
``<layer>.delta.<adapter name>``; the unmerged forward is the base forward plus the adapter's
contribution, so the frozen weights are never copied. Merging adds the change into the base
parameters and unmerging subtracts it again.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from leantune.errors import LeantuneError, TargetError
from leantune.inject import AdapterModule, mixed_rows

_CLASSES: dict[tuple[type[nn.Module], type[nn.Module]], type[nn.Module]] = {}


class DeltaLayer(nn.Module):
    """Mixin for a layer holding named deltas; subclasses say what a delta is and does."""

    method: ClassVar[str] = ""
    delta: nn.ModuleDict
    weight: nn.Parameter
    merged: list[str]
    _base_class: type[nn.Module]
    _active: str | None
    _disabled: bool
    _batch_names: list[str] | None

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

    # --- construction

    @classmethod
    def wrap(cls, module: nn.Module, module_name: str) -> DeltaLayer:
        """``module`` itself when it already is this method's layer, else a new one adopting it."""
        if isinstance(module, cls):
            return module
        if isinstance(module, AdapterModule):
            raise TargetError(
                f"{module_name} already holds a {type(module).__name__} adapter; leantune puts "
                f"one method on a module, so {cls.method} cannot go there too"
            )
        key = (cls, type(module))
        if key not in _CLASSES:
            _CLASSES[key] = type(f"{cls.__name__}{type(module).__name__}", (cls, type(module)), {})
        new = _CLASSES[key].__new__(_CLASSES[key])
        new.__dict__.update(
            {k: copy.copy(v) if isinstance(v, dict) else v for k, v in module.__dict__.items()}
        )
        assert isinstance(new, DeltaLayer)
        new._base_class = type(module)
        new.delta = nn.ModuleDict()
        new.merged = []
        new._active, new._disabled, new._batch_names = None, False, None
        return new

    def unwrap(self) -> nn.Module:
        plain = self._base_class.__new__(self._base_class)
        state = {k: copy.copy(v) if isinstance(v, dict) else v for k, v in self.__dict__.items()}
        for key in ("_base_class", "merged", "_active", "_disabled", "_batch_names"):
            state.pop(key, None)
        state["_modules"].pop("delta", None)
        plain.__dict__.update(state)
        return plain

    def add_adapter(self, name: str, size: int, module_name: str) -> None:
        if name in self.delta:
            raise LeantuneError(f"adapter {name!r} is already on this layer")
        delta = self.new_delta(size, module_name)
        delta.to(device=self.weight.device)
        self.delta[name] = delta

    # --- AdapterModule protocol

    def adapter_names(self) -> list[str]:
        return list(self.delta.keys())

    def adapter_params(self, name: str | None = None) -> dict[str, nn.Parameter]:
        return {
            f"delta.{n}.{k}": p
            for n, d in self.delta.items()
            if name is None or n == name
            for k, p in d.named_parameters()
        }

    def remove_adapter(self, name: str) -> None:
        if name in self.merged:
            with torch.no_grad():
                self.fold(self.delta[name], -1.0)
            self.merged.remove(name)
        del self.delta[name]

    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        with torch.no_grad():
            self.fold(self.delta[name], 1.0)
        self.merged.append(name)

    def unmerge(self) -> None:
        with torch.no_grad():
            while self.merged:
                self.fold(self.delta[self.merged.pop()], -1.0)

    def set_adapter_state(
        self, active: str | None, disabled: bool, batch_names: Sequence[str] | None
    ) -> None:
        self._active, self._disabled = active, disabled
        self._batch_names = None if batch_names is None else list(batch_names)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors (parameters and index buffers) as files store them."""
        d = self.delta[name]
        return {k: t.detach() for k, t in [*d.named_parameters(), *d.named_buffers()]}

    def file_targets(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors a file's values are copied into, by the same keys as file_tensors."""
        d = self.delta[name]
        return dict([*d.named_parameters(), *d.named_buffers()])

    # --- forward

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self._base_class.forward(self, x, *args, **kwargs)
        if self._batch_names is not None:
            return self._mixed_forward(x, out)
        name = self._active
        if self._disabled or name is None or name not in self.delta or name in self.merged:
            return out
        return self.contribution(self.delta[name], x, out)

    def _mixed_forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        assert self._batch_names is not None
        return mixed_rows(
            self._batch_names,
            x,
            out,
            lambda name: name in self.delta,
            lambda name, xs, rows: self.contribution(self.delta[name], xs, rows),
        )
