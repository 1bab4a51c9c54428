"""Hotswap: replace a loaded adapter's weights with another adapter's, in place, so a compiled
model (``torch.compile``) serves the new adapter without recompiling.

A compiled graph is specialized to tensor shapes and to the Python numbers it reads, so the
swap changes neither: ``prepare_hotswap(model, max_rank)``, called once before compiling, pads
the adapter to a rank every later adapter fits in (zero ranks: the output is unchanged), and
``hotswap(model, folder)`` copies the new tensors into the existing parameters
(``param.copy_``). The method says how (``AdapterConfig.swapper``; LoRA's in
``adapters/methods/lora/arith.py`` folds the new scaling into B, so the layer's scaling stays the same
number). The new adapter must target the same modules, with the same heads; what does not fit
is refused before anything is copied.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import nn

from leantune.adapters.base import AdapterModule
from leantune.adapters.config import PEFT_FORMATS, AdapterConfig
from leantune.adapters.formats import (
    LEANTUNE_TYPE,
    PREFIX,
    config_from_leantune,
    read_adapter_files,
)
from leantune.adapters.inject import _record, adapter_layers, check_finite, module_copy
from leantune.core.errors import AdapterFileError, LeantuneError

Source = str | os.PathLike[str] | tuple[Mapping[str, Any], Mapping[str, torch.Tensor]]
"""An adapter folder, or (adapter_config.json as a dict, tensors by their peft keys): what
``adapter_config`` and ``adapter_state_dict`` give."""


class Swapper(Protocol):
    """A method's rule for hotswapping its adapters (``AdapterConfig.swapper``)."""

    def pad(self, layer: AdapterModule, module: str, name: str, max_rank: int) -> None:
        """Make adapter ``name`` on ``layer`` big enough for any adapter up to ``max_rank``,
        with the same output."""
        ...

    def swap_refusal(
        self,
        layer: AdapterModule,
        module: str,
        name: str,
        config: AdapterConfig,
        tensors: Mapping[str, torch.Tensor],
    ) -> str | None:
        """Why ``tensors`` (the new adapter's on ``module``, by the keys of ``file_targets``;
        ``config`` its config) cannot replace adapter ``name`` in place, or None."""
        ...

    def swap(
        self,
        layer: AdapterModule,
        module: str,
        name: str,
        config: AdapterConfig,
        tensors: Mapping[str, torch.Tensor],
    ) -> None:
        """Copy ``tensors`` into adapter ``name``'s parameters, in place."""
        ...


def _unwrap(model: nn.Module) -> nn.Module:
    """The model itself under a ``torch.compile`` wrapper."""
    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, nn.Module) else model


def _swapper(config: AdapterConfig, name: str) -> Swapper:
    swapper = config.swapper()
    if swapper is None:
        kind = config.title or config.method
        raise LeantuneError(
            f"adapter {name!r} is {kind}; hotswap has no rule for it (it swaps LoRA adapters)"
        )
    return swapper


def prepare_hotswap(model: nn.Module, max_rank: int, name: str | None = None) -> nn.Module:
    """Pad adapter ``name`` (default: the active one) so any adapter of rank up to ``max_rank``
    can be swapped in. Call it before ``torch.compile``; the outputs do not change."""
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise LeantuneError(f"max_rank must be a positive integer, got {max_rank!r}")
    model = _unwrap(model)
    name, rec = _record(model, name)
    swapper = _swapper(rec.config, name)
    for module, layer in adapter_layers(model):
        if name in layer.adapter_names():
            swapper.pad(layer, module, name, max_rank)
    return model


def _read(source: Source) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The config and tensors (prefix removed) of an adapter folder or (config, tensors)."""
    if isinstance(source, tuple):
        raw, tensors = dict(source[0]), dict(source[1])
        check_finite(tensors, "the new adapter", "nothing was swapped", AdapterFileError)
    else:
        raw, tensors = read_adapter_files(source)
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise AdapterFileError(f"tensor {bad[0]!r} lacks the {PREFIX!r} prefix peft files have")
    tensors = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
    fmt = PEFT_FORMATS.get(str(raw.get("peft_type")))
    if raw.get("peft_type") == LEANTUNE_TYPE:
        return config_from_leantune(raw, tensors), tensors
    if fmt is None:
        raise AdapterFileError(f"peft_type {raw.get('peft_type')!r} is not supported")
    return fmt.read(raw), tensors


def hotswap(model: nn.Module, source: Source, name: str | None = None) -> nn.Module:
    """Replace adapter ``name``'s weights (default: the active one) with those of ``source``
    (an adapter folder, or an adapter_config dict and its tensors), in place.

    The new adapter must be of the same method, target the same modules and save the same
    modules (heads); its ranks may be any up to the one ``prepare_hotswap`` padded to. Works
    on a compiled model (or its ``torch.compile`` wrapper) without recompiling. Nothing is
    copied unless everything fits. Returns ``model``.
    """
    model = _unwrap(model)
    name, rec = _record(model, name)
    config, tensors = _read(source)
    if config.method != rec.config.method:
        raise LeantuneError(
            f"the new adapter is {config.method} but {name!r} is {rec.config.method}; hotswap "
            "replaces an adapter with one of the same method"
        )
    swapper = _swapper(rec.config, name)
    plan: list[tuple[str, AdapterModule, dict[str, torch.Tensor]]] = []
    used: set[str] = set()
    for module, layer in adapter_layers(model):
        if name not in layer.adapter_names():
            continue
        keys = {k: f"{module}.{k}" for k in layer.file_targets(name)}
        missing = [full for full in keys.values() if full not in tensors]
        if missing:
            raise LeantuneError(
                f"the new adapter lacks {missing[0]}: {name!r} adapts {module} and hotswap "
                "needs the same target modules"
            )
        own = {k: tensors[full] for k, full in keys.items()}
        why = swapper.swap_refusal(layer, module, name, config, own)
        if why is not None:
            raise LeantuneError(why)
        plan.append((module, layer, own))
        used |= set(keys.values())
    heads = _heads(model, name, rec.modules_to_save, tensors)
    extra = sorted(set(tensors) - used - set(heads))
    if extra:
        raise LeantuneError(
            f"the new adapter has {extra[0]}, which {name!r} does not adapt or save; hotswap "
            "needs the same target modules and heads"
        )
    for module, layer, own in plan:
        swapper.swap(layer, module, name, config, own)
    with torch.no_grad():
        for key, dst in heads.items():
            dst.copy_(tensors[key].to(dtype=dst.dtype, device=dst.device))
    return model


def _heads(
    model: nn.Module, name: str, to_save: list[str], tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s own copies of its saved modules' tensors, by file key, checked
    against the new adapter's."""
    out: dict[str, torch.Tensor] = {}
    for m in to_save:
        for key, t in module_copy(model, m, name).state_dict(keep_vars=True).items():
            full = f"{m}.{key}"
            if full not in tensors:
                raise LeantuneError(
                    f"the new adapter lacks {full}: {name!r} trains its own {m}, so the new one "
                    "must bring it too"
                )
            if tensors[full].shape != t.shape:
                raise LeantuneError(
                    f"the new adapter's {full} has shape {tuple(tensors[full].shape)}, the "
                    f"model's {tuple(t.shape)}; was it made for another model or label set?"
                )
            out[full] = t
    return out
