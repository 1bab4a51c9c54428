"""What every method shares, and nothing any one method owns.

The adapter layer protocol (``AdapterModule``), what a model remembers of its adapters, the
mixed-batch forward, and ``AdapterLayer``: the one base of the layers that hold named
adapters beside a base layer's own parameters. This module imports no concrete method, so a
method (or a test) can build on it without pulling in the others.

The core (penalties, files, the planner, schedules, ``tune``) reaches a method only through the
hooks defined here — a layer's change (``change_entries``, ``l2_change``), file entries
(``file_tensors``, ``file_targets``, ``file_entry``), rate multipliers (``lr_multipliers``),
ranks that grow and shrink (``RankAdaptable``) — and those of ``AdapterConfig`` in
``adapters/config.py`` (the config every method's config extends, and the registry).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol, Self, cast, runtime_checkable

import torch
from torch import nn

from leantune.adapters.config import AdapterRecord
from leantune.core.errors import LeantuneError, TargetError

BASE = "__base__"
"""Adapter name meaning "no adapter" in a mixed batch."""

_RECORDS = "_leantune_adapters"
_SAVED = "_leantune_saved"

try:  # GPT-2 style layers; transformers is a dependency but keep the core importable without it.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


@runtime_checkable
class AdapterModule(Protocol):
    """A layer holding one or more named adapters beside its own base parameters."""

    def adapter_params(self, name: str | None = None) -> dict[str, nn.Parameter]:
        """The adapter parameters, of one adapter or of all, keyed relative to this layer."""
        ...

    def adapter_names(self) -> list[str]: ...

    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight; a no-op when it is merged already."""
        ...

    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weight."""
        ...

    def remove_adapter(self, name: str) -> None: ...

    def unwrap(self) -> nn.Module:
        """The plain base layer, holding this layer's current base parameters."""
        ...

    def set_adapter_state(
        self, active: str | None, disabled: bool, batch_names: Sequence[str] | None
    ) -> None: ...

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors as its adapter file stores them, keyed relative to this
        layer (``lora_A.weight``, ``leantune_bitfit.bias`` ...)."""
        ...

    def file_targets(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors a file's values are copied into on load, by the keys of file_tensors."""
        ...

    def file_entry(self, name: str) -> dict[str, Any]:
        """This module's row in a ``LEANTUNE`` folder's ``modules`` table (method, size ...)."""
        ...

    def active_name(self) -> str | None:
        """The adapter this layer applies now, unmerged; None when there is none."""
        ...

    def merged_names(self) -> list[str]:
        """Adapters folded into the base weight, in the order they were merged."""
        ...

    def change_entries(self, name: str) -> list[Change]:
        """Adapter ``name``'s learned change of each base parameter (what penalties see)."""
        ...

    def l2_change(self, name: str) -> torch.Tensor:
        """Σ ‖change‖² of adapter ``name`` (a method may compute it without the dense change)."""
        ...

    def lr_multipliers(self, name: str, options: Mapping[str, Any]) -> dict[str, float]:
        """Rate multipliers of adapter ``name``'s parameters that are not 1, keyed like
        ``adapter_params``; ``options`` are the run's (``loraplus_ratio`` ...)."""
        ...


class Change(NamedTuple):
    """The learned change of one base parameter: ``base`` names it on the layer (``weight``),
    ``values`` is the change shaped like it, or flat at ``indices`` of the flattened parameter."""

    base: str
    values: torch.Tensor
    indices: torch.Tensor | None = None


@runtime_checkable
class RankAdaptable(Protocol):
    """A layer whose adapters are sums of rank-one components that may grow and be pruned
    (``train/adapt.py``): the factors hold one component per row of A and column of B."""

    def rank_factors(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """(A (r, in), B (out, r)) of adapter ``name``."""
        ...

    def rank_refusal(self, name: str) -> str | None:
        """Why adapter ``name``'s rank cannot adapt, or None."""
        ...

    def grow_rank(self, name: str, r: int) -> None:
        """New components, initialized so the layer's function is unchanged."""
        ...

    def keep_ranks(self, name: str, keep: torch.Tensor) -> None:
        """Keep only the components ``keep`` (bool, (r,)) marks, same scaling."""
        ...


# ---------------------------------------------------------------------------- model state


def records(model: nn.Module) -> dict[str, AdapterRecord]:
    """The adapters injected into ``model``, by name, in injection order."""
    found = model.__dict__.get(_RECORDS)
    if found is None:
        found = {}
        model.__dict__[_RECORDS] = found
    return found


def module_copies(model: nn.Module) -> dict[str, dict[str, nn.Module]]:
    """Per module trained in full (a head): the original under ``BASE`` and each adapter's own
    copy under the adapter's name. Kept off the module tree, like the records."""
    found = model.__dict__.get(_SAVED)
    if found is None:
        found = {}
        model.__dict__[_SAVED] = found
    return found


def mixed_rows(
    names: Sequence[str],
    x: torch.Tensor,
    out: torch.Tensor,
    has: Callable[[str], bool],
    apply: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """A layer's mixed-batch forward: example i of ``out`` (the base output for input ``x``)
    gets adapter ``names[i]`` added by ``apply(name, x_rows, out_rows)``; BASE rows and names
    this layer lacks (``has``) keep the base output."""
    if len(names) != x.shape[0]:
        raise LeantuneError(
            f"mixed batch has {len(names)} adapter names for a batch of {x.shape[0]} examples"
        )
    for name in dict.fromkeys(names):
        if name == BASE or not has(name):
            continue
        idx = torch.tensor([i for i, n in enumerate(names) if n == name], device=out.device)
        rows = apply(name, x[idx], out[idx].clone())
        out = out.index_copy(0, idx, rows.to(out.dtype))  # autocast may give another dtype
    return out


# ---------------------------------------------------------------------------- layer base

_LAYER_CLASSES: dict[tuple[type[nn.Module], type[nn.Module]], type[nn.Module]] = {}


class AdapterLayer(nn.Module):
    """Base of a layer type holding named adapters; it implements ``AdapterModule``.

    An adapter layer *is* the layer it adapts: ``adopt`` gives an object of a class derived
    from both the method's layer class and the base layer's own type, sharing the base layer's
    parameters, buffers and hooks under the same names. The adapters live in a ``ModuleDict``
    child named ``store`` (``<layer>.lora.<adapter name>``). The forward is the base forward,
    then ``apply_adapter`` for the active adapter (or row by row in a mixed batch).

    A method subclass defines ``apply_adapter``, ``merge_adapter``, ``unmerge_adapter``, its
    file entries (``file_tensors``, ``file_targets``) and its change (``change_entries``); it
    may override ``base_forward``, ``drop_adapter``, ``init_state``, ``l2_change``,
    ``lr_multipliers`` and ``file_entry``.
    """

    method: ClassVar[str] = ""
    store: ClassVar[str] = ""
    """Name of the child ModuleDict holding the adapters (part of the saved key names)."""
    layer_state: ClassVar[tuple[str, ...]] = ()
    """Attributes a method keeps on the layer beyond the base's; ``unwrap`` drops them."""
    merged: list[str]
    weight: nn.Parameter
    _base_class: type[nn.Module]
    _active: str | None
    _disabled: bool
    _batch_names: list[str] | None
    _OWN_STATE: ClassVar[tuple[str, ...]] = (
        "_base_class",
        "merged",
        "_active",
        "_disabled",
        "_batch_names",
    )

    # --- what a method defines

    def apply_adapter(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (the base output for input ``x``) with adapter ``name``'s effect added."""
        raise NotImplementedError

    def merge_adapter(self, name: str) -> None:
        """Fold adapter ``name`` into the base parameters, in place (under no_grad)."""
        raise NotImplementedError

    def unmerge_adapter(self, name: str) -> None:
        """Take merged adapter ``name`` back out of the base parameters, in place."""
        raise NotImplementedError

    def drop_adapter(self, name: str) -> None:
        """Delete unmerged adapter ``name`` from this layer."""
        del self.adapter_store()[name]

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors as files store them (``AdapterModule.file_tensors``)."""
        raise NotImplementedError

    def file_targets(self, name: str) -> dict[str, torch.Tensor]:
        """Where loaded values go, by the keys of file_tensors."""
        raise NotImplementedError

    def change_entries(self, name: str) -> list[Change]:
        """Adapter ``name``'s change of each base parameter (``AdapterModule.change_entries``)."""
        raise NotImplementedError

    def l2_change(self, name: str) -> torch.Tensor:
        return torch.stack([c.values.pow(2).sum() for c in self.change_entries(name)]).sum()

    def lr_multipliers(self, name: str, options: Mapping[str, Any]) -> dict[str, float]:
        return {}

    def file_entry(self, name: str) -> dict[str, Any]:
        size = sum(p.numel() for p in self.adapter_params(name).values())
        return {"method": self.method, "size": size}

    loads_base_weights: ClassVar[bool] = False
    """Whether a file may carry this layer's own base weights (peft saves a resized embedding
    table as ``<layer>.base_layer.weight``)."""

    def init_state(self) -> None:
        """Set the ``layer_state`` attributes of a newly adopted layer."""

    def base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._base_class.forward(self, x, *args, **kwargs)

    # --- construction

    @classmethod
    def layer_class(cls, base: type[nn.Module]) -> type[Self]:
        """This layer class for base type ``base``: ``cls`` itself when it already derives
        from ``base`` (``LoraLinear`` for ``nn.Linear``), else a class made from both, once."""
        if issubclass(cls, base):
            return cls
        key = (cls, base)
        if key not in _LAYER_CLASSES:
            name = f"{cls.__name__}{base.__name__}"
            _LAYER_CLASSES[key] = type(name, (cls, base), {"__module__": cls.__module__})
        return cast(type[Self], _LAYER_CLASSES[key])

    @classmethod
    def adopt(cls, base: nn.Module) -> Self:
        """A layer sharing ``base``'s parameters, buffers and hooks (``base`` is unchanged)."""
        layer_cls = cls.layer_class(type(base))
        new = layer_cls.__new__(layer_cls)
        new.__dict__.update(
            {k: copy.copy(v) if isinstance(v, dict) else v for k, v in base.__dict__.items()}
        )
        new._base_class = type(base)
        setattr(new, cls.store, nn.ModuleDict())
        new.merged = []
        new._active, new._disabled, new._batch_names = None, False, None
        new.init_state()
        return new

    @classmethod
    def wrap(cls, module: nn.Module, module_name: str) -> Self:
        """``module`` itself when it already is this method's layer, else a new one adopting it."""
        if isinstance(module, cls):
            return module
        if isinstance(module, AdapterModule):
            raise TargetError(
                f"{module_name} already holds a {type(module).__name__} adapter; leantune puts "
                f"one method on a module, so {cls.method} cannot go there too"
            )
        return cls.adopt(module)

    def unwrap(self) -> nn.Module:
        plain = self._base_class.__new__(self._base_class)
        state = {k: copy.copy(v) if isinstance(v, dict) else v for k, v in self.__dict__.items()}
        for key in (*self._OWN_STATE, *self.layer_state):
            state.pop(key, None)
        state["_modules"].pop(self.store, None)
        plain.__dict__.update(state)
        return plain

    def adapter_store(self) -> nn.ModuleDict:
        """The adapters of this layer, by name."""
        return cast(nn.ModuleDict, getattr(self, self.store))

    # --- AdapterModule protocol

    def adapter_names(self) -> list[str]:
        return list(self.adapter_store().keys())

    def adapter_params(self, name: str | None = None) -> dict[str, nn.Parameter]:
        return {
            f"{self.store}.{n}.{k}": p
            for n, adapter in self.adapter_store().items()
            if name is None or n == name
            for k, p in adapter.named_parameters()
        }

    def remove_adapter(self, name: str) -> None:
        if name in self.merged:
            with torch.no_grad():
                self.unmerge_adapter(name)
            self.merged.remove(name)
        self.drop_adapter(name)

    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        with torch.no_grad():
            self.merge_adapter(name)
        self.merged.append(name)

    def unmerge(self) -> None:
        with torch.no_grad():
            while self.merged:
                self.unmerge_adapter(self.merged.pop())

    def set_adapter_state(
        self, active: str | None, disabled: bool, batch_names: Sequence[str] | None
    ) -> None:
        self._active, self._disabled = active, disabled
        self._batch_names = None if batch_names is None else list(batch_names)

    def active_name(self) -> str | None:
        name = self._active
        if name is None or name in self.merged or name not in self.adapter_store():
            return None
        return name

    def merged_names(self) -> list[str]:
        return list(self.merged)

    # --- forward

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_forward(x, *args, **kwargs)
        store = self.adapter_store()
        if self._batch_names is not None:
            has = store.__contains__
            return mixed_rows(self._batch_names, x, out, has, self.apply_adapter)
        name = self._active
        if self._disabled or name is None or name not in store or name in self.merged:
            return out
        return self.apply_adapter(name, x, out)
