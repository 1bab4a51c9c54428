"""Putting adapters into any ``nn.Module`` and working with them afterwards.

The user's model stays their object. Injection walks ``named_modules()``, matches targets and
swaps each matched layer for an adapter layer that keeps the same base parameters under the same
names, so a base checkpoint still loads. Everything else here is a free function over a model:
find adapter parameters (by type, never by name), freeze, merge, unmerge, unload, switch or
disable adapters, mix adapters within one batch.

Modules trained in full with an adapter (``modules_to_save``: a task head) are per adapter, as
in peft: injection keeps the original module aside and gives each adapter its own copy. The
model holds the copy of the active adapter at the module's usual name (so ``classifier.weight``
is the active adapter's head), the original while disabled or unloaded, and in a mixed batch a
router sending each example through its adapter's copy.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

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


@dataclass
class AdapterRecord:
    """What the model remembers of one injected adapter (kept off the user's config)."""

    config: AdapterConfig
    modules: list[str]
    modules_to_save: list[str]
    task_type: str | None


# ---------------------------------------------------------------------------- registry

METHODS: dict[str, type[AdapterConfig]] = {}


def register(name: str, config_cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Make a method known by name (for files and the CLI). Refuses a name already taken."""
    if name in METHODS:
        raise LeantuneError(f"method {name!r} is already registered by {METHODS[name].__name__}")
    METHODS[name] = config_cls
    return config_cls


# ---------------------------------------------------------------------------- matching

_DEFAULT_LAYER_LISTS = ("layers", "layer", "h", "blocks", "block")


def layer_index(module_name: str, layers_pattern: str | None = None) -> int | None:
    """The transformer-block index a module sits in, or None."""
    names = [layers_pattern] if layers_pattern else list(_DEFAULT_LAYER_LISTS)
    pattern = r"(?:^|\.)(?:" + "|".join(names) + r")\.(\d+)(?:\.|$)"
    m = re.search(pattern, module_name)
    return int(m.group(1)) if m else None


def name_matches(name: str, targets: str | Sequence[str]) -> bool:
    """peft's rule: a string is a regex full-match; a list matches exact names or dotted suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the model's output layer: its output embeddings, else its last linear layer."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        return {n for n, m in model.named_modules() if m is head}
    linears = [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)]
    if not callable(get_out) and linears:
        return {linears[-1]}
    return set()


def infer_task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in (
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
        ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ):
        if cls.endswith(suffix):
            return task
    return None


def resolve_modules_to_save(
    model: nn.Module, config: AdapterConfig, task_type: str | None
) -> list[str]:
    names = dict(model.named_modules())
    if config.modules_to_save is None:
        wanted = ["classifier", "score"] if task_type == "SEQ_CLS" else []
        strict = False
    else:
        wanted, strict = list(config.modules_to_save), True
    found = [n for n in names if n and name_matches(n, wanted)]
    # A module inside another saved module is saved with it.
    found = [n for n in found if not any(n.startswith(o + ".") for o in found)]
    missing = [w for w in wanted if not any(name_matches(n, [w]) for n in found)]
    if strict and missing:
        raise TargetError(
            f"modules_to_save {missing} match no module; {_closest(missing[0], names)}"
        )
    return found


def _closest(target: str, names: Sequence[str] | dict[str, Any]) -> str:
    full = [n for n in names if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in full})
    close = difflib.get_close_matches(target, leaves + full, n=5, cutoff=0.4)
    if close:
        return "closest module names: " + ", ".join(close)
    return "module names here include: " + ", ".join(leaves[:12])


def match_targets(model: nn.Module, config: AdapterConfig, skip: Sequence[str] = ()) -> list[str]:
    """Names of the modules ``config`` adapts, or a TargetError saying why there are none."""
    supported = config.supported_types()
    modules = dict(model.named_modules())
    skip = [*skip, *saved_store(model)]  # modules trained in full are never adapted (as in peft)
    head = output_head_names(model) | set(skip)
    inside_head = tuple(h + "." for h in skip)
    chosen: list[str] = []
    unsupported: list[str] = []
    for name, module in modules.items():
        if not name or name in skip or name.startswith(inside_head):
            continue
        if config.targets == "all-linear":
            # Adapter layers subclass the layers they adapt, so they are found again here.
            if not isinstance(module, LINEAR_TYPES) or name in head:
                continue
        elif config.targets == "all":
            if name in head or not config.includes(module):
                continue
        elif not name_matches(name, config.targets):
            continue
        if config.exclude and name_matches(name, config.exclude):
            continue
        if (
            config.layers is not None
            and layer_index(name, config.layers_pattern) not in config.layers
        ):
            continue
        if not isinstance(module, supported):
            unsupported.append(f"{name} ({type(module).__name__})")
            continue
        chosen.append(name)
    if chosen:
        return chosen
    if unsupported:
        kinds = ", ".join(t.__name__ for t in supported)
        raise TargetError(
            f"targets {config.targets!r} match only layers {config.method} cannot adapt: "
            f"{', '.join(unsupported[:5])}; it adapts {kinds}"
        )
    where = "" if config.layers is None else f" in layers {config.layers}"
    first = config.targets if isinstance(config.targets, str) else config.targets[0]
    raise TargetError(
        f"targets {config.targets!r} match no module{where}; {_closest(first, modules)}"
    )


# ---------------------------------------------------------------------------- injection


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterModule):
            yield name, module


def records(model: nn.Module) -> dict[str, AdapterRecord]:
    """The adapters injected into ``model``, by name, in injection order."""
    found = model.__dict__.get(_RECORDS)
    if found is None:
        found = {}
        model.__dict__[_RECORDS] = found
    return found


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ---------------------------------------------------------------------------- saved modules


def saved_store(model: nn.Module) -> dict[str, dict[str, nn.Module]]:
    """Per module trained in full (a head): the original under ``BASE`` and each adapter's own
    copy under the adapter's name. Kept off the module tree, like the records."""
    found = model.__dict__.get(_SAVED)
    if found is None:
        found = {}
        model.__dict__[_SAVED] = found
    return found


def saved_module(model: nn.Module, module_name: str, name: str) -> nn.Module:
    """Adapter ``name``'s own copy of the saved module ``module_name``."""
    return saved_store(model)[module_name][name]


class SavedModuleRouter(nn.Module):
    """Stands in for a saved module inside ``mixed_batch``: example i goes through the copy of
    adapter ``names[i]`` (the original for ``BASE`` and adapters that do not save it)."""

    def __init__(self, base: nn.Module, copies: dict[str, nn.Module], names: Sequence[str]):
        super().__init__()
        self.base = base
        self.copies = nn.ModuleDict(copies)
        self.names = list(names)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base(*args, **kwargs)
        # The batch rides on the first argument (a head's hidden states), given by position
        # or by keyword; the other arguments are passed to every copy unchanged.
        key = None if args else next(iter(kwargs), None)
        x = args[0] if args else kwargs.get(key) if key is not None else None
        if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
            raise LeantuneError(
                f"a mixed batch routes saved modules (heads) row by row, but "
                f"{type(self.base).__name__} does not map a tensor to a tensor; "
                "run one adapter at a time with set_active()"
            )

        def apply(name: str, xs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            if key is None:
                return self.copies[name](xs, *args[1:], **kwargs)
            return self.copies[name](*args, **{**kwargs, key: xs})

        return mixed_rows(self.names, x, out, lambda name: name in self.copies, apply)


def _align(module: nn.Module, like: nn.Module) -> nn.Module:
    """Move ``module``'s tensors to the device and dtype of ``like``'s tensors of the same name
    (the model may have been moved or cast while ``module`` was kept aside)."""
    if isinstance(like, SavedModuleRouter):
        like = like.base
    ref = dict(like.named_parameters()) | dict(like.named_buffers())
    for key, t in [*module.named_parameters(), *module.named_buffers()]:
        want = ref.get(key)
        if want is not None and (t.device != want.device or t.dtype != want.dtype):
            t.data = t.data.to(device=want.device, dtype=want.dtype)
    module.train(like.training)
    return module


def _show_saved(
    model: nn.Module, active: str | None, batch_names: Sequence[str] | None = None
) -> None:
    """Put at each saved module's name: adapter ``active``'s copy (the original when it has
    none, or for None), or a router for a mixed batch."""
    for module_name, entry in saved_store(model).items():
        current = model.get_submodule(module_name)
        new: nn.Module
        if batch_names is not None:
            copies = {n: m for n, m in entry.items() if n != BASE}
            new = SavedModuleRouter(entry[BASE], copies, batch_names)
            for m in entry.values():
                _align(m, current)
        else:
            new = entry.get(active, entry[BASE]) if active is not None else entry[BASE]
            if new is current:
                continue
            _align(new, current)
        _replace(model, module_name, new)


def _check_saveable(model: nn.Module, to_save: Sequence[str]) -> None:
    """Refuse saved modules holding adapter layers or overlapping another adapter's."""
    for module_name in to_save:
        module = model.get_submodule(module_name)
        inner = next((n for n, m in module.named_modules() if isinstance(m, AdapterModule)), None)
        if inner is not None:
            where = module_name + (f".{inner}" if inner else "")
            raise TargetError(
                f"modules_to_save {module_name!r} holds an adapter layer ({where}) of another "
                "adapter; a module is either adapted or trained in full. Leave it out of one"
            )
        for other in saved_store(model):
            if other != module_name and (
                other.startswith(module_name + ".") or module_name.startswith(other + ".")
            ):
                raise TargetError(
                    f"modules_to_save {module_name!r} overlaps {other!r}, which another adapter "
                    f"saves; save the same module ({other!r}) instead"
                )


def _all_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The model's parameters and those of the saved-module copies kept aside, each once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    for entry in saved_store(model).values():
        for module in entry.values():
            for p in module.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


def check_finite(
    tensors: Mapping[str, torch.Tensor],
    where: str,
    then: str,
    error: type[LeantuneError] = LeantuneError,
) -> None:
    """Refuse NaN/inf: ``where`` names the source, ``then`` what was not done."""
    for key, t in tensors.items():
        floating = t.is_floating_point() or t.is_complex()
        if floating and not bool(torch.isfinite(t.detach()).all()):
            raise error(
                f"{where}: tensor {key!r} holds NaN/inf values, so the training run that made "
                f"it diverged; {then}. Retrain with a lower --lr"
            )


def inject(
    model: nn.Module, config: AdapterConfig, adapter_name: str = "default", *, freeze: bool = True
) -> nn.Module:
    """Add adapter ``adapter_name`` to the modules ``config`` targets, in place.

    Base parameter names do not change. The new adapter becomes the active one. With
    ``freeze`` (the default) only adapter parameters and ``modules_to_save`` stay trainable.
    Returns ``model`` itself.
    """
    if not adapter_name or adapter_name == BASE or "." in adapter_name:
        raise LeantuneError(f"adapter name {adapter_name!r} is reserved or has a dot; pick another")
    taken = set(records(model)) | {
        n for _, layer in adapter_layers(model) for n in layer.adapter_names()
    }
    if adapter_name in taken:
        raise LeantuneError(
            f"adapter {adapter_name!r} is already in this model; pick another name, "
            "or remove_adapter() it first"
        )
    task_type = config.task_type or infer_task_type(model)
    to_save = resolve_modules_to_save(model, config, task_type)
    _check_saveable(model, to_save)
    names = match_targets(model, config, skip=to_save)
    tied = tied_modules(model)
    if config.rewrites_base_weight():
        clash = [n for n in names if n in tied]
        if clash:
            raise TargetError(
                f"{clash[0]} shares its weight with {tied[clash[0]]}; this init rewrites that "
                "weight and would change both. Leave it out of the targets or untie the weights"
            )
    done: list[str] = []
    try:
        for name in names:
            module = model.get_submodule(name)
            new = config.adapt(module, adapter_name, name)
            if new is not module:
                _replace(model, name, new)
            done.append(name)
    except Exception:
        for name in done:  # leave the model as it was
            layer = model.get_submodule(name)
            assert isinstance(layer, AdapterModule)
            layer.remove_adapter(adapter_name)
            if not layer.adapter_names():
                _replace(model, name, layer.unwrap())
        raise
    store = saved_store(model)
    for module_name in to_save:  # the adapter's own copy, made from the original module
        entry = store.setdefault(module_name, {BASE: model.get_submodule(module_name)})
        entry[adapter_name] = _align(copy.deepcopy(entry[BASE]), model.get_submodule(module_name))
    records(model)[adapter_name] = AdapterRecord(config, names, to_save, task_type)
    set_active(model, adapter_name)
    if freeze:
        mark_trainable(model, adapter_name)
    return model


# ---------------------------------------------------------------------------- helpers


def _record(model: nn.Module, name: str | None) -> tuple[str, AdapterRecord]:
    recs = records(model)
    if not recs:
        raise LeantuneError(
            "this model holds no leantune adapter; inject() or load_adapter() first"
        )
    if name is None:
        name = active_adapter(model)
    if name not in recs:
        raise LeantuneError(f"no adapter {name!r} in this model; it has {sorted(recs)}")
    return name, recs[name]


def active_adapter(model: nn.Module) -> str:
    return model.__dict__.get("_leantune_active") or next(iter(records(model)))


def adapter_parameters(model: nn.Module, name: str | None = None) -> dict[str, nn.Parameter]:
    """Adapter parameters by full name, found by visiting adapter layers (all adapters if None)."""
    out: dict[str, nn.Parameter] = {}
    for layer_name, layer in adapter_layers(model):
        for key, p in layer.adapter_params(name).items():
            out[f"{layer_name}.{key}"] = p
    return out


def saved_module_parameters(model: nn.Module, name: str | None = None) -> dict[str, nn.Parameter]:
    """Parameters of the fully trained modules (heads) of adapter ``name``."""
    name, rec = _record(model, name)
    out: dict[str, nn.Parameter] = {}
    for mod_name in rec.modules_to_save:
        for key, p in saved_module(model, mod_name, name).named_parameters():
            out[f"{mod_name}.{key}"] = p
    return out


def mark_trainable(
    model: nn.Module, name: str | None = None, modules: Sequence[str] = ()
) -> dict[str, nn.Parameter]:
    """Freeze everything except adapter ``name``, its saved modules and ``modules``.

    ``modules`` are extra module names (exact or dotted suffix) trained in full. Returns the
    trainable parameters by name.
    """
    name, _ = _record(model, name)
    trainable = adapter_parameters(model, name) | saved_module_parameters(model, name)
    if modules:
        mods = [n for n, _ in model.named_modules() if n and name_matches(n, modules)]
        if not mods:
            raise TargetError(
                f"modules {list(modules)} match no module; {_closest(modules[0], dict(model.named_modules()))}"
            )
        for mod_name in mods:
            for key, p in model.get_submodule(mod_name).named_parameters():
                trainable[f"{mod_name}.{key}"] = p
    keep = {id(p) for p in trainable.values()}
    for p in _all_parameters(model):
        p.requires_grad_(id(p) in keep)
    return trainable


def _broadcast(
    model: nn.Module, batch_names: Sequence[str] | None = None, disabled: bool = False
) -> None:
    active = active_adapter(model) if records(model) else None
    for _, layer in adapter_layers(model):
        layer.set_adapter_state(active, disabled, batch_names)
    _show_saved(model, None if disabled else active, batch_names)


def set_active(model: nn.Module, name: str) -> None:
    """Make adapter ``name`` the one used in forward passes (one adapter is active at a time)."""
    _record(model, name)
    model.__dict__["_leantune_active"] = name
    _broadcast(model)


@contextlib.contextmanager
def disable(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model with every adapter switched off inside the ``with`` block."""
    merged = [n for _, layer in adapter_layers(model) for n in getattr(layer, "merged", [])]
    if merged:
        raise LeantuneError(
            f"adapter {merged[0]!r} is merged into the weights; unmerge() before disabling it"
        )
    _broadcast(model, disabled=True)
    try:
        yield model
    finally:
        _broadcast(model)


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


@contextlib.contextmanager
def mixed_batch(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Inside the block, example i of each batch goes through adapter ``names[i]``.

    ``"__base__"`` runs an example through the base model alone. Adapters must be unmerged.
    """
    known = set(records(model))
    unknown = sorted(set(names) - known - {BASE})
    if unknown:
        raise LeantuneError(f"mixed batch names unknown adapters {unknown}; known: {sorted(known)}")
    with disable(model):  # also refuses merged adapters
        _broadcast(model, batch_names=list(names))
        yield model


def tied_modules(model: nn.Module) -> dict[str, list[str]]:
    """Modules whose weight is shared with other modules (tied embeddings), with those others."""
    owners: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(mod_name)
    return {
        n: [o for o in group if o != n]
        for group in owners.values()
        if len(group) > 1
        for n in group
    }


def merge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold adapter ``name`` (default: the active one) into the base weights. Idempotent."""
    name, _ = _record(model, name)
    tied = tied_modules(model)
    check_finite(
        adapter_parameters(model, name), f"adapter {name!r}", "merging it would ruin the weights"
    )
    for layer_name, layer in adapter_layers(model):
        if name in layer.adapter_names() and layer_name in tied:
            raise LeantuneError(
                f"{layer_name} shares its weight with {tied[layer_name]}; merging would change "
                "both. Leave it out of the targets, or untie the weights before merging"
            )
    for _, layer in adapter_layers(model):
        if name in layer.adapter_names():
            layer.merge(name)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of the base weights."""
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


def remove_adapter(model: nn.Module, name: str) -> nn.Module:
    """Delete adapter ``name``; layers left with no adapter go back to their plain type."""
    name, _ = _record(model, name)
    for layer_name, layer in list(adapter_layers(model)):
        if name in layer.adapter_names():
            layer.remove_adapter(name)
            if not layer.adapter_names():
                _replace(model, layer_name, layer.unwrap())
    del records(model)[name]
    if model.__dict__.get("_leantune_active") == name:
        model.__dict__.pop("_leantune_active")
    store = saved_store(model)
    for entry in store.values():
        entry.pop(name, None)
    _broadcast(model)
    for module_name in [m for m, entry in store.items() if len(entry) == 1]:
        del store[module_name]  # the original is back in place and no adapter saves it
    return model


def unload(model: nn.Module, merge_active: bool = False) -> nn.Module:
    """Return ``model`` as a plain model with no adapter layers left in it.

    With ``merge_active`` the active adapter is merged first, so its effect stays in the
    weights, and its own copies of the saved modules (its trained head) stay in the model;
    otherwise the model comes back as it was before injection, original heads included.
    """
    keep = None
    if merge_active and records(model):
        keep = active_adapter(model)
        heads = saved_module_parameters(model, keep)
        check_finite(heads, f"adapter {keep!r}", "merging it would ruin the weights")
        merge(model)
    else:
        unmerge(model)
    for layer_name, layer in list(adapter_layers(model)):
        _replace(model, layer_name, layer.unwrap())
    _show_saved(model, keep)
    model.__dict__.pop(_SAVED, None)
    model.__dict__.pop(_RECORDS, None)
    model.__dict__.pop("_leantune_active", None)
    return model


# ---------------------------------------------------------------------------- accounting


@dataclass(frozen=True)
class ParameterReport:
    """What training costs in parameters and what the adapter costs on disk."""

    trainable: int
    total: int
    adapter_bytes: int
    """Size of adapter_model.safetensors as save_adapter writes it (heads included)."""

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "trainable_params": self.trainable,
            "total_params": self.total,
            "trainable_percent": round(self.percent, 4),
            "adapter_bytes": self.adapter_bytes,
        }

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f} || adapter file: {_human(self.adapter_bytes)}"
        )


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    raise AssertionError  # pragma: no cover


def parameter_report(model: nn.Module, name: str | None = None) -> ParameterReport:
    """Trainable and total parameters (shared tensors counted once) and adapter file bytes."""
    from leantune.formats import adapter_file_bytes

    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():  # parameters() already yields a shared tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    size = adapter_file_bytes(model, name) if records(model) else 0
    return ParameterReport(trainable=trainable, total=total, adapter_bytes=size)
