"""What every method shares, and nothing any one method owns.

The adapter layer protocol (``AdapterModule``), the config every method's config extends
(``AdapterConfig``), the registry of methods by name, what a model remembers of its adapters,
the mixed-batch forward, and ``AdapterLayer``: the one base of the layers that hold named
adapters beside a base layer's own parameters. This module imports no concrete method, so a
method (or a test) can build on it without pulling in the others.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self, cast, runtime_checkable

import torch
from torch import nn

from leantune.errors import LeantuneError, TargetError

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


@dataclass
class AdapterConfig:
    """Where an adapter goes. Each method's config extends this with its own fields."""

    method: ClassVar[str] = ""

    targets: str | list[str] = "all-linear"
    """Modules to adapt: a list of exact names or dotted suffixes ("query", "attn.c_attn"), one
    string taken as a regex that must match a whole module name, "all-linear" (every
    nn.Linear and Conv1D except the output head and the modules in ``modules_to_save``), or
    "all" (every layer the method can adapt, except those)."""
    layers: list[int] | None = None
    """Only modules inside these layer indices (the number after "layer.", "layers.", "h." ...)."""
    layers_pattern: str | None = None
    """Name of the layer list when it is not one of layer/layers/h/block/blocks."""
    exclude: list[str] = field(default_factory=list)
    """Modules never adapted, matched like ``targets``."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (a task head). None picks the
    classification head ("classifier" or "score") for sequence-classification models."""
    task_type: str | None = None
    """peft's task type (SEQ_CLS, CAUSAL_LM, ...); None infers it from the model class."""

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            if self.targets not in ("all-linear", "all"):
                try:
                    re.compile(self.targets)
                except re.error as e:
                    raise TargetError(f"targets {self.targets!r} is not a valid regex: {e}") from e
        elif not self.targets:
            raise TargetError("targets is empty: name at least one module, or use 'all-linear'")
        for key in ("targets", "exclude", "modules_to_save"):
            value = getattr(self, key)
            if isinstance(value, list | tuple) and not all(isinstance(v, str) for v in value):
                raise TargetError(f"{key} must list module names (strings), got {value!r}")
        if self.layers is not None and not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers
        ):
            raise TargetError(f"layers must be non-negative indices, got {self.layers}")
        if self.layers_pattern is not None:
            try:
                re.compile(self.layers_pattern)
            except (re.error, TypeError) as e:
                raise TargetError(
                    f"layers_pattern {self.layers_pattern!r} is not a valid regex: {e}"
                ) from None

    def rewrites_base_weight(self) -> bool:
        """True when injection changes the base weight itself (PiSSA's residual)."""
        return False

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        """Layer types this method can adapt."""
        raise NotImplementedError

    def includes(self, module: nn.Module) -> bool:
        """Whether targets="all" takes ``module``."""
        return isinstance(module, self.supported_types())

    def adapt(self, module: nn.Module, adapter_name: str, module_name: str) -> nn.Module:
        """Add adapter ``adapter_name`` to ``module``; return the layer to put in its place."""
        raise NotImplementedError


# ---------------------------------------------------------------------------- registry

METHODS: dict[str, type[AdapterConfig]] = {}


def register(name: str, config_cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Make a method known by name (for files and the CLI). Refuses a name already taken."""
    if name in METHODS:
        raise LeantuneError(f"method {name!r} is already registered by {METHODS[name].__name__}")
    METHODS[name] = config_cls
    return config_cls


# ---------------------------------------------------------------------------- model state


@dataclass
class AdapterRecord:
    """What the model remembers of one injected adapter (kept off the user's config)."""

    config: AdapterConfig
    modules: list[str]
    modules_to_save: list[str]
    task_type: str | None


def records(model: nn.Module) -> dict[str, AdapterRecord]:
    """The adapters injected into ``model``, by name, in injection order."""
    found = model.__dict__.get(_RECORDS)
    if found is None:
        found = {}
        model.__dict__[_RECORDS] = found
    return found


def saved_store(model: nn.Module) -> dict[str, dict[str, nn.Module]]:
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

    A method subclass defines ``apply_adapter``, ``merge_adapter``, ``unmerge_adapter`` and
    its file entries (``file_tensors``, ``file_targets``); it may override ``base_forward``, ``drop_adapter`` and ``init_state``.
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
