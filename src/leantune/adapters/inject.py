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

The layer protocol lives in ``adapters/base.py``, ``AdapterConfig`` and the registry in
``adapters/config.py``, target matching in ``adapters/targets.py``, the parameter report in
``adapters/accounting.py``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from leantune.adapters.base import (
    _RECORDS,
    _SAVED,
    BASE,
    AdapterModule,
    mixed_rows,
    module_copies,
    records,
)
from leantune.adapters.config import AdapterConfig, AdapterRecord, name_matches
from leantune.adapters.targets import (
    _closest,
    infer_task_type,
    match_targets,
    resolve_modules_to_save,
    tied_modules,
)
from leantune.core.errors import LeantuneError, TargetError
from leantune.models.precision import MERGE_REFUSAL, quantized_kind

# ---------------------------------------------------------------------------- injection


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterModule):
            yield name, module


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ---------------------------------------------------------------------------- saved modules


def module_copy(model: nn.Module, module_name: str, name: str) -> nn.Module:
    """Adapter ``name``'s own copy of the saved module ``module_name``."""
    return module_copies(model)[module_name][name]


class ModuleCopyRouter(nn.Module):
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
    if isinstance(like, ModuleCopyRouter):
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
    for module_name, entry in module_copies(model).items():
        current = model.get_submodule(module_name)
        new: nn.Module
        if batch_names is not None:
            copies = {n: m for n, m in entry.items() if n != BASE}
            new = ModuleCopyRouter(entry[BASE], copies, batch_names)
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
        for other in module_copies(model):
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
    for entry in module_copies(model).values():
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
        config.attach(model, adapter_name, names)
    except Exception:
        for name in done:  # leave the model as it was
            layer = model.get_submodule(name)
            assert isinstance(layer, AdapterModule)
            layer.remove_adapter(adapter_name)
            if not layer.adapter_names():
                _replace(model, name, layer.unwrap())
        raise
    store = module_copies(model)
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


def module_copy_parameters(model: nn.Module, name: str | None = None) -> dict[str, nn.Parameter]:
    """Parameters of the fully trained modules (heads) of adapter ``name``."""
    name, rec = _record(model, name)
    out: dict[str, nn.Parameter] = {}
    for mod_name in rec.modules_to_save:
        for key, p in module_copy(model, mod_name, name).named_parameters():
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
    trainable = adapter_parameters(model, name) | module_copy_parameters(model, name)
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


def merge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold adapter ``name`` (default: the active one) into the base weights. Idempotent."""
    name, rec = _record(model, name)
    if (refusal := rec.config.merge_refusal()) is not None:
        raise LeantuneError(refusal)
    kind = quantized_kind(model)
    if kind is not None:
        raise LeantuneError(MERGE_REFUSAL.format(kind=kind))
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
    store = module_copies(model)
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
        heads = module_copy_parameters(model, keep)
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
