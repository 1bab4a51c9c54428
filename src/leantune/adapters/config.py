"""A method's config and the registry of methods.

``AdapterConfig`` is what every method's config extends: where the adapter goes, and the hooks
through which the core builds it from a run's options, reads it from a file and buys it in a
plan. ``register`` makes a method known by name (``methods/__init__.py`` registers leantune's
own), with the peft format its adapters are written in when peft has the method. Nothing here
knows a concrete method.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol, Self, runtime_checkable

import torch
from torch import nn

from leantune.core.errors import LeantuneError, TargetError

if TYPE_CHECKING:  # the planner's types; plan and select import this module, not the reverse
    from leantune.adapters.combine import Combiner
    from leantune.adapters.hotswap import Swapper
    from leantune.adapters.planning import PlanEntry, Scores


class PlanSize(NamedTuple):
    """What ``n`` units bought on a module come to: the entry's size and parameter count, and a
    tensor the plan keeps beside plan.json (sparse masks), if any."""

    size: int
    params: int
    tensor: torch.Tensor | None = None


@dataclass
class AdapterConfig:
    """Where an adapter goes. Each method's config extends this with its own fields."""

    method: ClassVar[str] = ""
    title: ClassVar[str] = ""
    """The method's name in messages (``LoRA``); the registry name when empty."""

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

    def attach(self, model: nn.Module, adapter_name: str, modules: list[str]) -> None:
        """Called by ``inject`` once the adapter's layers (``modules``) are in ``model``: a
        method that acts on the model's inputs rather than in a layer (virtual tokens) hooks the
        model's forward here, and its layers' ``unwrap`` removes the hook. Raising undoes the
        injection."""

    def part_for(self, module_name: str) -> AdapterConfig:
        """The config that adapts ``module_name`` (a config made of parts says which)."""
        return self

    def default_l2(self) -> float:
        """The L2 weight a run uses when the user gives none."""
        return 0.0

    def penalty_refusal(self) -> str | None:
        """Why penalties on this adapter's change would be wrong (the change it trains is not
        the change from the pretrained weights), or None."""
        return None

    def merge_refusal(self) -> str | None:
        """Why this adapter cannot be folded into the base weights (``merge``), or None."""
        return None

    def combiner(self) -> Combiner | None:
        """How ``leantune.adapters.combine`` makes weighted combinations of this method's
        adapters: what the method registered (``register(..., combiner=)``)."""
        return _COMBINER_OF.get(self.method)

    def swapper(self) -> Swapper | None:
        """How ``leantune.adapters.hotswap`` replaces this method's adapters in place: what the
        method registered (``register(..., swapper=)``)."""
        return _SWAPPER_OF.get(self.method)

    # --- runs: building the config from a run's options

    default_lr: ClassVar[float] = 2e-3
    """Peak learning rate of a run of this method when the user gives none."""

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Self:
        """The config for ``tune --method <name>``: ``options`` are the run's flat options
        (``targets``, ``layers`` as lists, ``r``, ``dora`` ...); a method takes what it uses."""
        return cls(layers=options.get("layers"))

    adapts_rank: ClassVar[bool] = False
    """Its layers are ``RankAdaptable``: ``tune --adapt`` may grow and prune their ranks."""
    placed_by_plan: ClassVar[bool] = False
    """Only a plan can place this method (sparse masks): ``tune --method`` makes one."""

    @classmethod
    def run_refusal(cls, options: Mapping[str, Any]) -> str | None:
        """Why a run's options do not go with this method (checked before anything is
        written), or None."""
        return None

    # --- files

    def check_file(self, module_name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Check an adapter file's tensors fit this config on ``module_name`` before any layer
        is built (a file saying r=10**12 must not allocate it). Raises AdapterFileError."""

    @classmethod
    def from_file_entries(
        cls, entries: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, torch.Tensor]
    ) -> AdapterConfig:
        """The config of this method's modules in a ``LEANTUNE`` folder: ``entries`` are their
        rows of the ``modules`` table, ``tensors`` the file's tensors (prefix removed)."""
        return cls(targets=list(entries), modules_to_save=[])

    # --- the planner: units of gain and cost, and the config a plan's entries make

    plan_keeps_tensor: ClassVar[bool] = False
    """A plan entry of this method keeps a tensor (``PlanSize.tensor``) beside plan.json."""
    ranks_entries: ClassVar[bool] = False
    """The planner's units are single weight entries: scoring ranks them (costly, so only
    when a method asks)."""

    @classmethod
    def plannable(cls) -> bool:
        """Whether the planner can spend on this method (it defines ``plan_size``)."""
        return any("plan_size" in vars(c) for c in cls.__mro__ if c is not AdapterConfig)

    @classmethod
    def plan_modules(cls, scores: Scores) -> Iterable[str]:
        """Modules the planner may spend on with this method (asked only of plannable ones):
        the scored linear layers unless a method says otherwise (LayerNorm: the norms)."""
        return [m.name for m in scores.modules]

    @classmethod
    def plan_unit(
        cls, scores: Scores, module: str, i: int, max_rank: int
    ) -> tuple[float, int] | None:
        """(gain, parameter cost) of unit ``i`` (0-based) of this method on ``module``, or None
        when there is no such unit. Gains are gradient energy, comparable across methods."""
        return None

    @classmethod
    def plan_size(cls, scores: Scores, module: str, n: int) -> PlanSize:
        """The plan entry ``n`` units on ``module`` make."""
        raise NotImplementedError

    @classmethod
    def plan_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """A run's options (flat, as ``from_options`` gets them) as this method's plan entries
        carry them; empty when the method takes none."""
        return {}

    @classmethod
    def plan_option_error(cls, options: Mapping[str, Any]) -> str | None:
        """What is wrong with a plan entry's options for this method, or None."""
        return f"takes no options, got {dict(options)}" if options else None

    @classmethod
    def from_plan(
        cls, entries: Sequence[PlanEntry], tensors: Mapping[str, torch.Tensor]
    ) -> AdapterConfig:
        """The config adapting a plan's entries of this method (one adapter); ``tensors`` are
        the plan's kept tensors by module."""
        return cls(targets=[e.module for e in entries], modules_to_save=[])

    @classmethod
    def size_label(cls, size: int) -> str:
        """An entry's size as a person reads it (``r=4``, ``bitfit 768``)."""
        return f"{cls.method} {size:,}"


# ---------------------------------------------------------------------------- registry

METHODS: dict[str, type[AdapterConfig]] = {}


class PeftFormat(Protocol):
    """How a method's adapters are written in and read from one of peft's own formats."""

    peft_type: str

    def write(
        self, rec: AdapterRecord, name: str, layers: list[tuple[str, Any]], base: str | None
    ) -> dict[str, Any]:
        """adapter_config.json for adapter ``name`` (``layers``: its adapted layers by name)."""
        ...

    def read(self, raw: Mapping[str, Any]) -> AdapterConfig:
        """The config an adapter_config.json of this ``peft_type`` describes."""
        ...

    def describe(self, raw: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Rows for ``leantune info``: the method and its main settings."""
        ...


@runtime_checkable
class FileKeys(Protocol):
    """A peft format whose tensor keys are not ``base_model.model.<module>.<key>`` (peft's
    prompt learning: ``prompt_embeddings``, and heads as ``base_model.<head>.<param>``)."""

    def keys_to_file(
        self, model: nn.Module, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Tensors keyed as leantune keys them, keyed as the format's files do."""
        ...

    def keys_from_file(
        self, model: nn.Module, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """A file's tensors keyed as leantune keys them (for ``model``)."""
        ...


_COMBINER_OF: dict[str, Combiner] = {}
_SWAPPER_OF: dict[str, Swapper] = {}
PEFT_FORMATS: dict[str, PeftFormat] = {}
"""peft's formats by peft_type ("LORA"); a method without one is saved as ``LEANTUNE``."""
_PEFT_OF: dict[str, PeftFormat] = {}


def register(
    name: str,
    config_cls: type[AdapterConfig],
    peft: PeftFormat | None = None,
    *,
    combiner: Combiner | None = None,
    swapper: Swapper | None = None,
) -> type[AdapterConfig]:
    """Make a method known by name (for files, plans and the CLI), with the peft format its
    adapters are written in when peft has the method, and its rules for combining
    (``leantune.adapters.combine``) and hot-swapping (``leantune.adapters.hotswap``) its
    adapters when it has them. Refuses a name already taken."""
    if name in METHODS:
        raise LeantuneError(f"method {name!r} is already registered by {METHODS[name].__name__}")
    if config_cls.method != name:
        raise LeantuneError(f"{config_cls.__name__}.method is {config_cls.method!r}, not {name!r}")
    METHODS[name] = config_cls
    if peft is not None:
        PEFT_FORMATS[peft.peft_type] = peft
        _PEFT_OF[name] = peft
    if combiner is not None:
        _COMBINER_OF[name] = combiner
    if swapper is not None:
        _SWAPPER_OF[name] = swapper
    return config_cls


def unregister(name: str) -> None:
    """Forget method ``name`` (a test's toy method)."""
    METHODS.pop(name, None)
    _COMBINER_OF.pop(name, None)
    _SWAPPER_OF.pop(name, None)
    peft = _PEFT_OF.pop(name, None)
    if peft is not None:
        PEFT_FORMATS.pop(peft.peft_type, None)


def peft_format(config: AdapterConfig) -> PeftFormat | None:
    """The peft format ``config``'s adapters are written in, or None (``LEANTUNE``)."""
    return _PEFT_OF.get(config.method)


def method_config(name: str) -> type[AdapterConfig]:
    """The registered config class of method ``name``."""
    if name not in METHODS:
        raise LeantuneError(f"method {name!r} is unknown; leantune knows {', '.join(METHODS)}")
    return METHODS[name]


def name_matches(name: str, targets: str | Sequence[str]) -> bool:
    """peft's rule: a string is a regex full-match; a list matches exact names or dotted suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


@dataclass
class AdapterRecord:
    """What the model remembers of one injected adapter (kept off the user's config)."""

    config: AdapterConfig
    modules: list[str]
    modules_to_save: list[str]
    task_type: str | None


# ---------------------------------------------------------------------------- several methods


@dataclass
class MixedConfig(AdapterConfig):
    """Several methods in one adapter, each part on the modules it lists by name (a Plan's
    adapter); a Plan of one method gives that method's own config instead (peft loads it)."""

    method: ClassVar[str] = "mixed"

    parts: list[AdapterConfig] = field(default_factory=list)
    """One config per method, each listing its modules by name (the first part naming a
    module adapts it). Saved in leantune's own format (docs/FORMAT.md)."""

    def __post_init__(self) -> None:
        if not self.parts:
            raise LeantuneError("a mixed adapter needs at least one part")
        names: list[str] = []
        for part in self.parts:
            if not isinstance(part.targets, list):
                raise LeantuneError(
                    f"each part of a mixed adapter lists its modules by name; the {part.method} "
                    f"part has targets {part.targets!r}"
                )
            names += part.targets
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise LeantuneError(f"{twice} is in two parts of a mixed adapter; one method a module")
        self.targets = names
        super().__post_init__()

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return tuple({t for part in self.parts for t in part.supported_types()})

    def part_for(self, module_name: str) -> AdapterConfig:
        for part in self.parts:
            if name_matches(module_name, part.targets):
                return part
        raise LeantuneError(f"no part of the mixed adapter names {module_name}")

    def adapt(self, module: nn.Module, adapter_name: str, module_name: str) -> nn.Module:
        return self.part_for(module_name).adapt(module, adapter_name, module_name)

    def rewrites_base_weight(self) -> bool:
        return any(part.rewrites_base_weight() for part in self.parts)

    def penalty_refusal(self) -> str | None:
        return next((r for p in self.parts if (r := p.penalty_refusal())), None)

    def merge_refusal(self) -> str | None:
        return next((r for p in self.parts if (r := p.merge_refusal())), None)

    def default_l2(self) -> float:
        """The parts' largest default, none when a part's change cannot be penalized."""
        return 0.0 if self.penalty_refusal() else max(p.default_l2() for p in self.parts)
