"""Adapter folders peft reads and writes: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are ``base_model.model.<module>.<peft name>`` (``lora_A.weight`` ...), trained heads
``base_model.model.<head>.<param>``. leantune writes explicit module names in ``target_modules``
and per-module ranks in ``rank_pattern``, so peft rebuilds exactly the layers leantune had.

LoRA adapters are written as peft's ``LORA`` type. Adapters peft has no type for (BitFit,
LayerNorm tuning, sparse masks, and Plans mixing methods) are written in the same folder layout
with ``"peft_type": "LEANTUNE"`` and a ``modules`` table giving each module's method and size;
their tensors are ``<module>.leantune_<method>.<name>`` (docs/FORMAT.md).
Only safetensors and JSON are ever read: nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file
from torch import nn

from leantune.errors import AdapterFileError, LeantuneError
from leantune.inject import (
    _record,
    adapter_layers,
    inject,
    mark_trainable,
    name_matches,
    records,
    remove_adapter,
)
from leantune.methods.bitfit import BitFitConfig
from leantune.methods.delta import DeltaLayer
from leantune.methods.layernorm import LayerNormConfig
from leantune.methods.lora import DORA, LoraConfig, LoraLayer
from leantune.methods.mixed import MixedConfig
from leantune.methods.sparse import SparseConfig

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
        if name not in layer.adapter_names():
            continue
        if isinstance(layer, LoraLayer):
            for key, t in layer.peft_tensors(name).items():
                out[f"{PREFIX}{layer_name}.{key}"] = t
        elif isinstance(layer, DeltaLayer):
            for key, t in layer.file_tensors(name).items():
                out[f"{PREFIX}{layer_name}.leantune_{layer.method}.{key}"] = t
    for mod_name in rec.modules_to_save:
        for key, t in model.get_submodule(mod_name).state_dict().items():
            out[f"{PREFIX}{mod_name}.{key}"] = t
    # safetensors wants contiguous tensors that share no memory.
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def adapter_config(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """The adapter_config.json peft needs to rebuild adapter ``name`` on the same base model."""
    name, rec = _record(model, name)
    cfg = rec.config
    if not isinstance(cfg, LoraConfig):
        return leantune_config(model, name)
    per_module: dict[str, tuple[int, float]] = {}
    fan_in_fan_out = False
    for layer_name, layer in adapter_layers(model):
        if isinstance(layer, LoraLayer) and name in layer.adapter_names():
            per_module[layer_name] = layer.saved_rank_alpha(name)
            fan_in_fan_out |= layer._base_class.__name__ == "Conv1D"
    r = Counter(ra[0] for ra in per_module.values()).most_common(1)[0][0]
    alpha = Counter(ra[1] for ra in per_module.values()).most_common(1)[0][0]
    # Keys are full module names: peft matches them against the same names (regex suffix rule).
    rank_pattern = {m: ra[0] for m, ra in per_module.items() if ra[0] != r}
    alpha_pattern = {m: _num(ra[1]) for m, ra in per_module.items() if ra[1] != alpha}
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": rec.task_type,
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": _num(alpha),
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "use_dora": cfg.dora,
        # PiSSA is written as the equivalent plain LoRA update of the original weights.
        "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
        "target_modules": sorted(per_module),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": rec.modules_to_save or None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }


def leantune_config(model: nn.Module, name: str) -> dict[str, Any]:
    """adapter_config.json for an adapter peft has no type for: each module's method and size."""
    _, rec = _record(model, name)
    modules: dict[str, dict[str, Any]] = {}
    for layer_name, layer in adapter_layers(model):
        if name not in layer.adapter_names():
            continue
        if isinstance(layer, LoraLayer):
            r, alpha = layer.saved_rank_alpha(name)
            adapter = layer.adapter(name)
            dropout = adapter.dropout.p if isinstance(adapter.dropout, nn.Dropout) else 0.0
            modules[layer_name] = {
                "method": "lora",
                "r": r,
                "alpha": _num(alpha),
                "dropout": dropout,
                "rslora": adapter.rslora,
                "dora": adapter.variant is DORA,
            }
        elif isinstance(layer, DeltaLayer):
            size = layer.delta_size(layer.delta[name])
            modules[layer_name] = {"method": layer.method, "size": size}
        else:
            raise LeantuneError(f"{layer_name}: {type(layer).__name__} has no file format")
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": LEANTUNE_TYPE,
        "format_version": FORMAT_VERSION,
        "task_type": rec.task_type,
        "base_model_name_or_path": base,
        "modules_to_save": rec.modules_to_save or None,
        "modules": modules,
    }


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


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
    config = adapter_config(model, name)
    tensors = adapter_state_dict(model, name)
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


def _check_safe(path: Path) -> None:
    """Refuse pickles before any parser sees them."""
    with path.open("rb") as f:
        head = f.read(9)
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
        raise AdapterFileError(
            f"{path} is a pickle/torch.save file; leantune never unpickles files, since loading one "
            "can run arbitrary code. Convert it where you trust it: load it with peft, then "
            "save_pretrained(..., safe_serialization=True)"
        )


def read_adapter_files(
    directory: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter_config.json and the tensors of an adapter folder, checked for safety and damage."""
    path = Path(directory)
    if path.is_file():
        _check_safe(path)
        raise AdapterFileError(f"{path} is a file; give the adapter folder (with {CONFIG_NAME})")
    if not path.is_dir():
        raise AdapterFileError(f"adapter folder {path} does not exist")
    weights = path / WEIGHTS_NAME
    if not weights.exists():
        pickled = [p for p in _PICKLE_NAMES if (path / p).exists()]
        if pickled:
            _check_safe(path / pickled[0])
            raise AdapterFileError(
                f"{path / pickled[0]} is a pickle file; leantune reads only safetensors. Convert "
                "it where you trust it: load with peft, then save_pretrained(safe_serialization=True)"
            )
        raise AdapterFileError(f"{path} has no {WEIGHTS_NAME}; is it an adapter folder?")
    _check_safe(weights)
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
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(
            f"{weights} is truncated or corrupt ({e}); re-save or re-copy the adapter"
        ) from None
    return config, tensors


_UNSUPPORTED = {
    "bias": ("none", "bias training is not supported; save the adapter with bias='none'"),
    "lora_bias": (False, "lora_bias is not supported"),
    "target_parameters": (None, "target_parameters is not supported"),
    "trainable_token_indices": (None, "trainable_token_indices is not supported"),
    "layer_replication": (None, "layer_replication is not supported"),
}


DELTA_METHODS = {"bitfit": BitFitConfig, "layernorm": LayerNormConfig, "sparse": SparseConfig}


def config_from_leantune(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> MixedConfig:
    """The adapter config of a ``LEANTUNE`` folder; ``tensors`` are its tensors, prefix removed
    (sparse masks come from them)."""
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
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
        if method != "lora" and method not in DELTA_METHODS:
            raise AdapterFileError(
                f"adapter config: module {module!r} has method {method!r}; leantune knows "
                f"lora, {', '.join(DELTA_METHODS)}"
            )
        by_method.setdefault(method, {})[module] = spec
    to_save = _as_list(cfg.get("modules_to_save"))
    parts: list[Any] = []
    try:
        if "lora" in by_method:
            specs = by_method["lora"]
            first = next(iter(specs.values()))
            parts.append(
                LoraConfig(
                    targets=list(specs),
                    r=int(first["r"]),
                    alpha=float(first["alpha"]),
                    dropout=float(first.get("dropout", 0.0)),
                    rslora=bool(first.get("rslora", False)),
                    dora=bool(first.get("dora", False)),
                    rank_pattern={re.escape(m): int(s["r"]) for m, s in specs.items()},
                    alpha_pattern={re.escape(m): float(s["alpha"]) for m, s in specs.items()},
                    modules_to_save=[],
                )
            )
        for method, config_cls in DELTA_METHODS.items():
            if method not in by_method:
                continue
            names = list(by_method[method])
            extra: dict[str, Any] = {}
            if method == "sparse":
                missing = [m for m in names if f"{m}.leantune_sparse.indices" not in tensors]
                if missing:
                    raise AdapterFileError(f"adapter file lacks the sparse mask of {missing[0]}")
                extra["masks"] = {m: tensors[f"{m}.leantune_sparse.indices"] for m in names}
            parts.append(config_cls(targets=names, modules_to_save=[], **extra))
        return MixedConfig(parts=parts, modules_to_save=to_save, task_type=cfg.get("task_type"))
    except (TypeError, ValueError, KeyError, LeantuneError) as e:
        if isinstance(e, AdapterFileError):
            raise
        raise AdapterFileError(f"adapter config does not describe a usable adapter: {e}") from None


def config_from_peft(cfg: dict[str, Any]) -> LoraConfig:
    """A LoraConfig from a peft (or leantune) adapter_config.json."""
    if cfg.get("peft_type") != "LORA":
        raise AdapterFileError(
            f"peft_type {cfg.get('peft_type')!r} is not supported; leantune loads LORA adapters "
            f"and its own {LEANTUNE_TYPE!r} ones"
        )
    for key, (ok, why) in _UNSUPPORTED.items():
        if cfg.get(key, ok) not in (ok, None, {}, []):
            raise AdapterFileError(f"adapter config {key}={cfg[key]!r}: {why}")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian",):
        raise AdapterFileError(
            f"init_lora_weights={init!r}: such adapters need a rewritten base model; convert it "
            "to a plain LoRA with peft (path_initial_model_for_weight_conversion) first"
        )
    if "target_modules" not in cfg or not cfg["target_modules"]:
        raise AdapterFileError("adapter config has no target_modules")
    layers = cfg.get("layers_to_transform")
    pattern = cfg.get("layers_pattern")
    try:
        return LoraConfig(
            targets=cfg["target_modules"]
            if isinstance(cfg["target_modules"], str)
            else list(cfg["target_modules"]),
            layers=[layers] if isinstance(layers, int) else layers,
            layers_pattern=pattern[0] if isinstance(pattern, list) else pattern,
            exclude=_as_list(cfg.get("exclude_modules")),
            modules_to_save=_as_list(cfg.get("modules_to_save")),
            task_type=cfg.get("task_type"),
            r=int(cfg.get("r", 8)),
            alpha=float(cfg.get("lora_alpha", 8)),
            dropout=float(cfg.get("lora_dropout", 0.0)),
            rslora=bool(cfg.get("use_rslora", False)),
            dora=bool(cfg.get("use_dora", False)),
            rank_pattern=dict(cfg.get("rank_pattern") or {}),
            alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
        )
    except (TypeError, ValueError) as e:
        raise AdapterFileError(
            f"adapter config does not describe a usable LoRA adapter: {e}"
        ) from None


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    name: str = "default",
    *,
    trainable: bool = False,
) -> nn.Module:
    """Load an adapter folder written by leantune or peft into ``model`` as adapter ``name``.

    Every tensor must fit a layer of the model and every adapted layer must get its tensors;
    otherwise the model is left as it was and the error lists what does not fit. The loaded
    adapter becomes active; with ``trainable`` its parameters (and heads) are left trainable.
    """
    raw, tensors = read_adapter_files(directory)
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise AdapterFileError(f"tensor {bad[0]!r} lacks the {PREFIX!r} prefix peft files have")
    tensors = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
    config: LoraConfig | MixedConfig
    if raw.get("peft_type") == LEANTUNE_TYPE:
        config = config_from_leantune(raw, tensors)
    else:
        config = config_from_peft(raw)
    # peft lists both usual head names ("classifier", "score"); keep those this model has.
    names = [n for n, _ in model.named_modules() if n]
    present = [m for m in config.modules_to_save or [] if any(name_matches(n, [m]) for n in names)]
    config = dataclasses.replace(config, modules_to_save=present)
    inject(model, config, name, freeze=False)
    try:
        _fill(model, name, tensors)
    except Exception:
        remove_adapter(model, name)
        raise
    if trainable:
        mark_trainable(model, name)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _fill(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    wanted: dict[str, torch.Tensor] = {}  # file key -> model tensor to copy into
    for layer_name, layer in adapter_layers(model):
        if name not in layer.adapter_names():
            continue
        if isinstance(layer, DeltaLayer):
            for key, t in layer.file_targets(name).items():
                wanted[f"{layer_name}.leantune_{layer.method}.{key}"] = t
            continue
        if not isinstance(layer, LoraLayer):
            continue
        params = dict(layer.lora[name].named_parameters())
        for short, key in layer.peft_keys.items():
            if short in params:
                wanted[f"{layer_name}.{key}"] = params[short]
    rec = records(model)[name]
    heads: dict[str, torch.Tensor] = {}
    for layer_name, layer in adapter_layers(model):
        # peft saves whole embedding layers (save_embedding_layers) as "<layer>.base_layer.*".
        if isinstance(layer, LoraLayer) and name in layer.adapter_names():
            for pname, p in layer.named_parameters(recurse=False):
                heads[f"{layer_name}.base_layer.{pname}"] = p
    for mod_name in rec.modules_to_save:
        for key, t in model.get_submodule(mod_name).state_dict(keep_vars=True).items():
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
    with torch.no_grad():
        for key, src in tensors.items():
            dst = wanted.get(key, heads.get(key))
            assert dst is not None
            dst.copy_(src.to(dtype=dst.dtype, device=dst.device))
