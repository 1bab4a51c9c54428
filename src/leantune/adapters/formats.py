"""Adapter folders peft reads and writes: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are ``base_model.model.<module>.<peft name>`` (``lora_A.weight`` ...), trained heads
``base_model.model.<head>.<param>``. leantune writes explicit module names in ``target_modules``
and per-module ranks in ``rank_pattern``, so peft rebuilds exactly the layers leantune had.

A method registered with a peft format (LoRA: ``LORA``, in ``adapters/methods/lora/peft.py``) is
written in it. Adapters peft has no type for (BitFit, LayerNorm tuning, sparse masks, and Plans
mixing methods) are written in the same folder layout with ``"peft_type": "LEANTUNE"`` and a
``modules`` table giving each module's method and size (``file_entry``); their tensors are
``<module>.leantune_<method>.<name>`` (docs/FORMAT.md). Each layer gives its own tensors
(``file_tensors`` / ``file_targets``), and each method's config reads its rows back
(``from_file_entries``): this module knows no method. Only safetensors and JSON are ever read:
nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save, save_file
from torch import nn

from leantune.adapters.base import records
from leantune.adapters.config import (
    METHODS,
    PEFT_FORMATS,
    AdapterConfig,
    FileKeys,
    MixedConfig,
    name_matches,
    peft_format,
)
from leantune.adapters.inject import (
    _all_parameters,
    _record,
    adapter_layers,
    check_finite,
    inject,
    mark_trainable,
    module_copy,
    remove_adapter,
    set_active,
)
from leantune.adapters.targets import infer_task_type, match_targets, resolve_modules_to_save
from leantune.core import checks
from leantune.core.errors import AdapterFileError, LeantuneError
from leantune.core.files import read_tensors, refuse_pickle

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
LEANTUNE_TYPE = "LEANTUNE"
FORMAT_VERSION = 1
_PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt", "adapter_model.pth")


# ---------------------------------------------------------------------------- writing


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """Adapter ``name`` (default: the active one) as peft keys it, heads included."""
    name, rec = _record(model, name)
    out: dict[str, torch.Tensor] = {}
    for layer_name, layer in adapter_layers(model):
        if name in layer.adapter_names():
            for key, t in layer.file_tensors(name).items():
                out[f"{PREFIX}{layer_name}.{key}"] = t
    for mod_name in rec.modules_to_save:  # this adapter's own copy of the head
        for key, t in module_copy(model, mod_name, name).state_dict().items():
            out[f"{PREFIX}{mod_name}.{key}"] = t
    fmt = peft_format(rec.config)
    if isinstance(fmt, FileKeys):  # peft's prompt learning keys its files its own way
        out = fmt.keys_to_file(model, out)
    # safetensors wants contiguous tensors that share no memory.
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _base_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def adapter_config(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """The adapter_config.json peft needs to rebuild adapter ``name`` on the same base model."""
    name, rec = _record(model, name)
    fmt = peft_format(rec.config)
    if fmt is None:
        return leantune_config(model, name)
    layers = [(n, layer) for n, layer in adapter_layers(model) if name in layer.adapter_names()]
    return fmt.write(rec, name, layers, _base_name(model))


def leantune_config(model: nn.Module, name: str) -> dict[str, Any]:
    """adapter_config.json for an adapter peft has no type for: each module's method and size."""
    _, rec = _record(model, name)
    modules: dict[str, dict[str, Any]] = {}
    for layer_name, layer in adapter_layers(model):
        if name in layer.adapter_names():
            modules[layer_name] = layer.file_entry(name)
    return {
        "peft_type": LEANTUNE_TYPE,
        "format_version": FORMAT_VERSION,
        "task_type": rec.task_type,
        "base_model_name_or_path": _base_name(model),
        "modules_to_save": rec.modules_to_save or None,
        "modules": modules,
    }


def adapter_file_bytes(model: nn.Module, name: str | None = None) -> int:
    """Exact size of the adapter_model.safetensors that save_adapter would write."""
    return len(save(adapter_state_dict(model, name), metadata={"format": "pt"}))


def save_adapter(
    model: nn.Module, directory: str | os.PathLike[str], name: str | None = None
) -> Path:
    """Write adapter ``name`` (default: the active one) to ``directory`` in peft's format.

    Files are written to a temporary folder beside ``directory`` and moved into place at the
    end, so a failure never leaves a half-written adapter. An existing adapter folder is
    replaced; any other non-empty folder is refused.
    """
    dest = Path(directory)
    if dest.exists() and not dest.is_dir():
        raise AdapterFileError(f"{dest} is a file; give a folder path to save the adapter in")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / CONFIG_NAME).exists():
        raise AdapterFileError(
            f"{dest} is a non-empty folder that holds no adapter; save to a new or empty folder"
        )
    # An adapter folder is replaced whole, so it may hold nothing but the two adapter files.
    others = (
        sorted(p.name for p in dest.iterdir() if p.name not in (CONFIG_NAME, WEIGHTS_NAME))
        if dest.is_dir()
        else []
    )
    if others:
        raise AdapterFileError(
            f"{dest} holds {others[0]!r} besides the adapter; not replacing it. Move "
            f"{'it' if len(others) == 1 else f'those {len(others)} files'} out, or save to a new folder"
        )
    config = adapter_config(model, name)
    tensors = adapter_state_dict(model, name)
    check_finite(
        {k.removeprefix(PREFIX): t for k, t in tensors.items()},
        f"adapter {_record(model, name)[0]!r}",
        f"nothing was written to {dest}",
        AdapterFileError,
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / "a")
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ---------------------------------------------------------------------------- reading


def read_adapter_files(
    directory: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter_config.json and the tensors of an adapter folder, checked for safety and damage."""
    path = Path(directory)
    if path.is_file():
        refuse_pickle(path, AdapterFileError)
        raise AdapterFileError(f"{path} is a file; give the adapter folder (with {CONFIG_NAME})")
    if not path.is_dir():
        raise AdapterFileError(f"adapter folder {path} does not exist")
    weights = path / WEIGHTS_NAME
    if not weights.exists():
        pickled = [p for p in _PICKLE_NAMES if (path / p).exists()]
        if pickled:
            refuse_pickle(path / pickled[0], AdapterFileError)
            raise AdapterFileError(
                f"{path / pickled[0]} is a pickle file; leantune reads only safetensors. Convert "
                "it where you trust it: load with peft, then save_pretrained(safe_serialization=True)"
            )
        raise AdapterFileError(f"{path} has no {WEIGHTS_NAME}; is it an adapter folder?")
    refuse_pickle(weights, AdapterFileError)
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise AdapterFileError(f"{path} has no {CONFIG_NAME}; is it an adapter folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(
            f"{path / CONFIG_NAME} is not valid JSON ({e}); re-save the adapter"
        ) from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path / CONFIG_NAME} must hold a JSON object")
    tensors = read_tensors(weights, error=AdapterFileError)
    check_finite(tensors, str(weights), "leantune does not load it", AdapterFileError)
    return config, tensors


def describe(directory: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """What an adapter folder holds, as (key, value) rows: method, sizes, targets, files.

    Reads the folder as :func:`read_adapter_files` does (and raises its errors); builds no model.
    A peft ``LORA`` folder gives its rank, alpha, patterns and targets; a ``LEANTUNE`` folder the
    count of modules per method.
    """
    path = Path(directory)
    config, tensors = read_adapter_files(path)
    count = sum(t.numel() for t in tensors.values())
    size = f"{(path / WEIGHTS_NAME).stat().st_size:,} ({WEIGHTS_NAME})"
    if config.get("peft_type") == LEANTUNE_TYPE:
        modules = config.get("modules") or {}
        per = Counter(str(spec.get("method")) for spec in modules.values())
        return [
            ("method", f"{LEANTUNE_TYPE} (leantune format; peft cannot load it)"),
            ("modules", ", ".join(f"{n} {m}" for m, n in per.items())),
            ("modules_to_save", json.dumps(config.get("modules_to_save"))),
            ("task_type", str(config.get("task_type"))),
            ("tensors", f"{len(tensors)} holding {count:,} values"),
            ("file bytes", size),
            ("config", str(path / CONFIG_NAME)),
        ]
    fmt = PEFT_FORMATS.get(str(config.get("peft_type")))
    rows = (
        fmt.describe(config) if fmt else [("method", f"{config.get('peft_type')} (not loadable)")]
    )
    return [
        *rows,
        ("modules_to_save", json.dumps(config.get("modules_to_save"))),
        ("task_type", str(config.get("task_type"))),
        ("base model", str(config.get("base_model_name_or_path"))),
        ("tensors", f"{len(tensors)} holding {count:,} parameters"),
        ("file bytes", size),
        ("config", str(path / CONFIG_NAME)),
    ]


def config_from_leantune(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> MixedConfig:
    """The adapter config of a ``LEANTUNE`` folder: one part per method, each read by the
    method's ``from_file_entries``; ``tensors`` are the folder's tensors, prefix removed."""
    version = cfg.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise AdapterFileError(
            f"leantune adapter format_version {version!r} is not {FORMAT_VERSION}; "
            "update leantune to read it"
        )
    modules = cfg.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise AdapterFileError("leantune adapter config has no modules table")
    by_method: dict[str, dict[str, dict[str, Any]]] = {}
    for module, spec in modules.items():
        method = spec.get("method") if isinstance(spec, dict) else None
        if not isinstance(method, str) or method not in METHODS:
            raise AdapterFileError(
                f"adapter config: module {module!r} has method {method!r}; leantune knows "
                f"{', '.join(METHODS)}"
            )
        by_method.setdefault(method, {})[module] = spec
    to_save = checks.names("modules_to_save", cfg.get("modules_to_save"))
    task_type = checks.optional_str("task_type", cfg.get("task_type"))
    try:
        parts = [
            METHODS[m].from_file_entries(by_method[m], tensors) for m in METHODS if m in by_method
        ]
        return MixedConfig(parts=parts, modules_to_save=to_save, task_type=task_type)
    except (TypeError, ValueError, KeyError, LeantuneError) as e:
        if isinstance(e, AdapterFileError):
            raise
        raise AdapterFileError(f"adapter config does not describe a usable adapter: {e}") from None


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    name: str = "default",
    *,
    trainable: bool = False,
) -> nn.Module:
    """Load an adapter folder written by leantune or peft into ``model`` as adapter ``name``.

    Every tensor must fit a layer of the model, every adapted layer must get its tensors and
    every saved module (head) its weights; otherwise the model is left as it was (the adapter
    that was active stays active) and the error says what does not fit. NaN/inf tensors are
    refused. The loaded adapter becomes active; with ``trainable`` its parameters (and heads)
    are left trainable.
    """
    raw, tensors = read_adapter_files(directory)
    fmt = PEFT_FORMATS.get(str(raw.get("peft_type")))
    if isinstance(fmt, FileKeys):
        tensors = fmt.keys_from_file(model, tensors)
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise AdapterFileError(f"tensor {bad[0]!r} lacks the {PREFIX!r} prefix peft files have")
    tensors = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
    config: AdapterConfig
    if raw.get("peft_type") == LEANTUNE_TYPE:
        config = config_from_leantune(raw, tensors)
    elif fmt is not None:
        config = fmt.read(raw)
    else:
        raise AdapterFileError(
            f"peft_type {raw.get('peft_type')!r} is not supported; leantune loads "
            f"{', '.join(PEFT_FORMATS)} adapters and its own {LEANTUNE_TYPE!r} ones"
        )
    # peft lists both usual head names ("classifier", "score"); keep those this model has.
    names = [n for n, _ in model.named_modules() if n]
    present = [m for m in config.modules_to_save or [] if any(name_matches(n, [m]) for n in names)]
    config = dataclasses.replace(config, modules_to_save=present)
    _check_before_building(model, config, tensors)
    before = model.__dict__.get("_leantune_active")
    inject(model, config, name, freeze=False)
    try:
        _fill(model, name, tensors)
    except Exception:
        remove_adapter(model, name)
        if before in records(model):
            set_active(model, before)
        raise
    if trainable:
        mark_trainable(model, name)
    else:
        for p in _all_parameters(model):
            p.requires_grad_(False)
    return model


def _check_before_building(
    model: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor]
) -> None:
    """The file's tensors fit each target as its method says (``check_file``: LoRA's factors
    at the config's rank), and it holds the weights of each saved module; checked before any
    layer is built (a config saying r=10**12 must not allocate it)."""
    task_type = config.task_type or infer_task_type(model)
    to_save = resolve_modules_to_save(model, config, task_type)
    for module_name in match_targets(model, config, skip=to_save):
        config.part_for(module_name).check_file(module_name, tensors)
    for module_name in to_save:
        for key in model.get_submodule(module_name).state_dict():
            if f"{module_name}.{key}" not in tensors:
                raise AdapterFileError(
                    f"adapter file lacks {module_name}.{key}: adapter_config.json lists "
                    f"{module_name} in modules_to_save, so its trained weights must be in the "
                    "file; re-save the adapter"
                )


def _fill(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    wanted: dict[str, torch.Tensor] = {}  # file key -> model tensor to copy into
    for layer_name, layer in adapter_layers(model):
        if name in layer.adapter_names():
            for key, t in layer.file_targets(name).items():
                wanted[f"{layer_name}.{key}"] = t
    rec = records(model)[name]
    heads: dict[str, torch.Tensor] = {}
    for layer_name, layer in adapter_layers(model):
        # peft saves whole embedding layers (save_embedding_layers) as "<layer>.base_layer.*".
        if getattr(layer, "loads_base_weights", False) and name in layer.adapter_names():
            assert isinstance(layer, nn.Module)
            for pname, p in layer.named_parameters(recurse=False):
                heads[f"{layer_name}.base_layer.{pname}"] = p
    for mod_name in rec.modules_to_save:  # this adapter's own copy of the head
        for key, t in module_copy(model, mod_name, name).state_dict(keep_vars=True).items():
            heads[f"{mod_name}.{key}"] = t
    unknown = sorted(set(tensors) - set(wanted) - set(heads))
    if unknown:
        raise AdapterFileError(
            f"adapter tensor {unknown[0]!r} (and {len(unknown) - 1} more) fits no module of this "
            "model; was the adapter made for another model?"
        )
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise AdapterFileError(
            f"adapter file lacks {missing[0]!r} (and {len(missing) - 1} more) that its config "
            "targets; the file and adapter_config.json do not belong together"
        )
    for key, src in tensors.items():
        dst = wanted.get(key, heads.get(key))
        assert dst is not None
        if dst.shape != src.shape:
            raise AdapterFileError(
                f"adapter tensor {key!r} has shape {tuple(src.shape)} but the model needs "
                f"{tuple(dst.shape)}; was the adapter made for another model size?"
            )
        if dst.is_floating_point() != src.is_floating_point() or src.is_complex():
            raise AdapterFileError(
                f"adapter tensor {key!r} is {src.dtype} but the model needs {dst.dtype}; the "
                "file is damaged or was not written for this model"
            )
    with torch.no_grad():
        for key, src in tensors.items():
            dst = wanted.get(key, heads.get(key))
            assert dst is not None
            dst.copy_(src.to(dtype=dst.dtype, device=dst.device))
