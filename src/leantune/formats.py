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
import math
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
    _all_parameters,
    _record,
    adapter_layers,
    check_finite,
    inject,
    mark_trainable,
    records,
    remove_adapter,
    saved_module,
    set_active,
)
from leantune.methods.bitfit import BitFitConfig
from leantune.methods.delta import DeltaLayer
from leantune.methods.layernorm import LayerNormConfig
from leantune.methods.lora import DORA, LoraConfig, LoraLayer
from leantune.methods.mixed import MixedConfig
from leantune.methods.sparse import SparseConfig
from leantune.targets import infer_task_type, match_targets, name_matches, resolve_modules_to_save

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
    for mod_name in rec.modules_to_save:  # this adapter's own copy of the head
        for key, t in saved_module(model, mod_name, name).state_dict().items():
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
    targets = config.get("target_modules")
    dora = " (DoRA)" if config.get("use_dora") else ""
    return [
        ("method", f"{config.get('peft_type')}{dora}"),
        ("rank / alpha", f"{config.get('r')} / {config.get('lora_alpha')}"),
        ("rank_pattern", json.dumps(config.get("rank_pattern") or {})),
        ("rsLoRA", str(bool(config.get("use_rslora")))),
        ("targets", targets if isinstance(targets, str) else f"{len(targets or [])} modules"),
        ("modules_to_save", json.dumps(config.get("modules_to_save"))),
        ("task_type", str(config.get("task_type"))),
        ("base model", str(config.get("base_model_name_or_path"))),
        ("tensors", f"{len(tensors)} holding {count:,} parameters"),
        ("file bytes", size),
        ("config", str(path / CONFIG_NAME)),
    ]


_UNSUPPORTED = {
    "bias": ("none", "bias training is not supported; save the adapter with bias='none'"),
    "lora_bias": (False, "lora_bias is not supported"),
    "target_parameters": (None, "target_parameters is not supported"),
    "trainable_token_indices": (None, "trainable_token_indices is not supported"),
    "layer_replication": (None, "layer_replication is not supported"),
}


DELTA_METHODS = {"bitfit": BitFitConfig, "layernorm": LayerNormConfig, "sparse": SparseConfig}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(key: str, value: Any, want: str) -> AdapterFileError:
    return AdapterFileError(
        f"adapter config {key}={_short(value)} must be {want}; fix adapter_config.json or "
        "re-save the adapter"
    )


def _rank(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterFileError(
            f"adapter config {key}={_short(value)}: a LoRA rank r must be a positive integer; fix "
            "adapter_config.json or re-save the adapter"
        )
    return value


def _positive_number(key: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise _bad(key, value, "a positive finite number")
    return float(value)


def _dropout(key: str, value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise _bad(key, value, "a number in [0, 1)")
    return float(value)


def _flag(key: str, value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(key, value, "true or false")
    return value


def _names(key: str, value: Any) -> list[str]:
    """A list of module names (one name alone is taken as a list of one)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise _bad(key, value, "a module name or a list of module names")


def _optional_str(key: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _bad(key, value, "a string or null")
    return value


def _pattern(key: str, value: Any, convert: Any) -> dict[str, Any]:
    """rank_pattern / alpha_pattern: regex keys (peft's rule), values checked by ``convert``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(key, value, "an object mapping module names to values")
    out = {}
    for k, v in value.items():
        try:
            re.compile(rf"(.*\.)?({k})$")
        except re.error as e:
            raise AdapterFileError(
                f"adapter config {key} key {k!r} is not a valid regex ({e}); fix "
                "adapter_config.json or re-save the adapter"
            ) from None
        out[k] = convert(f"{key}[{k!r}]", v)
    return out


def _layers(value: Any) -> list[int] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
    ):
        raise _bad("layers_to_transform", value, "a layer index or a list of layer indices")
    return list(items)


def _layers_pattern(value: Any) -> str | None:
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return str(value[0])
    if value is None or (isinstance(value, str) and value):
        return value
    raise _bad("layers_pattern", value, "the name of the layer list, like 'layers'")


_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def config_from_leantune(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> MixedConfig:
    """The adapter config of a ``LEANTUNE`` folder; ``tensors`` are its tensors, prefix removed
    (sparse masks come from them)."""
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
        if not isinstance(method, str) or (method != "lora" and method not in DELTA_METHODS):
            raise AdapterFileError(
                f"adapter config: module {module!r} has method {method!r}; leantune knows "
                f"lora, {', '.join(DELTA_METHODS)}"
            )
        by_method.setdefault(method, {})[module] = spec
    to_save = _names("modules_to_save", cfg.get("modules_to_save"))
    task_type = _optional_str("task_type", cfg.get("task_type"))
    parts: list[Any] = []
    try:
        if "lora" in by_method:
            specs = by_method["lora"]
            settings: tuple[float, bool, bool] | None = None
            for m, spec in specs.items():
                if "r" not in spec or "alpha" not in spec:
                    raise AdapterFileError(f"adapter config: LoRA module {m!r} lacks r or alpha")
                _rank(f"modules[{m!r}].r", spec["r"])
                _positive_number(f"modules[{m!r}].alpha", spec["alpha"])
                these = (
                    _dropout(f"modules[{m!r}].dropout", spec.get("dropout")),
                    _flag(f"modules[{m!r}].rslora", spec.get("rslora")),
                    _flag(f"modules[{m!r}].dora", spec.get("dora")),
                )
                if settings is not None and these != settings:
                    raise AdapterFileError(
                        f"adapter config: LoRA module {m!r} differs from the others in dropout, "
                        "rslora or dora; leantune writes one setting for all its LoRA modules"
                    )
                settings = these
            assert settings is not None
            first = next(iter(specs.values()))
            dropout, rslora, dora = settings
            parts.append(
                LoraConfig(
                    targets=list(specs),
                    r=int(first["r"]),
                    alpha=float(first["alpha"]),
                    dropout=dropout,
                    rslora=rslora,
                    dora=dora,
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
                masks = {}
                for m in names:
                    mask = tensors.get(f"{m}.leantune_sparse.indices")
                    if mask is None:
                        raise AdapterFileError(f"adapter file lacks the sparse mask of {m}")
                    if mask.dtype not in _INTEGER_DTYPES or mask.ndim != 1:
                        raise AdapterFileError(
                            f"adapter tensor {m}.leantune_sparse.indices must be a 1-D integer "
                            f"tensor, not {mask.dtype} of shape {tuple(mask.shape)}"
                        )
                    masks[m] = mask
                extra["masks"] = masks
            parts.append(config_cls(targets=names, modules_to_save=[], **extra))
        return MixedConfig(parts=parts, modules_to_save=to_save, task_type=task_type)
    except (TypeError, ValueError, KeyError, LeantuneError) as e:
        if isinstance(e, AdapterFileError):
            raise
        raise AdapterFileError(f"adapter config does not describe a usable adapter: {e}") from None


def config_from_peft(cfg: dict[str, Any]) -> LoraConfig:
    """A LoraConfig from a peft (or leantune) adapter_config.json. Values of the wrong type are
    refused rather than coerced (a string "false" is not False, 4.5 is not rank 4)."""
    if cfg.get("peft_type") != "LORA":
        raise AdapterFileError(
            f"peft_type {cfg.get('peft_type')!r} is not supported; leantune loads LORA adapters "
            f"and its own {LEANTUNE_TYPE!r} ones"
        )
    for key, (ok, why) in _UNSUPPORTED.items():
        if cfg.get(key, ok) not in (ok, None, {}, []):
            raise AdapterFileError(f"adapter config {key}={cfg[key]!r}: {why}")
    init = cfg.get("init_lora_weights", True)
    if not isinstance(init, bool | str):
        raise _bad("init_lora_weights", init, "true, false or an init name")
    if isinstance(init, str) and init.lower() not in ("gaussian",):
        raise AdapterFileError(
            f"init_lora_weights={init!r}: such adapters need a rewritten base model; convert it "
            "to a plain LoRA with peft (path_initial_model_for_weight_conversion) first"
        )
    targets = cfg.get("target_modules")
    if not targets:
        raise AdapterFileError("adapter config has no target_modules")
    if not isinstance(targets, str):
        targets = _names("target_modules", targets)
    try:
        return LoraConfig(
            targets=targets,
            layers=_layers(cfg.get("layers_to_transform")),
            layers_pattern=_layers_pattern(cfg.get("layers_pattern")),
            exclude=_names("exclude_modules", cfg.get("exclude_modules")),
            modules_to_save=_names("modules_to_save", cfg.get("modules_to_save")),
            task_type=_optional_str("task_type", cfg.get("task_type")),
            r=_rank("r", cfg.get("r", 8)),
            alpha=_positive_number("lora_alpha", cfg.get("lora_alpha", 8)),
            dropout=_dropout("lora_dropout", cfg.get("lora_dropout")),
            rslora=_flag("use_rslora", cfg.get("use_rslora")),
            dora=_flag("use_dora", cfg.get("use_dora")),
            rank_pattern=_pattern("rank_pattern", cfg.get("rank_pattern"), _rank),
            alpha_pattern=_pattern("alpha_pattern", cfg.get("alpha_pattern"), _positive_number),
        )
    except (TypeError, ValueError) as e:
        if isinstance(e, AdapterFileError):
            raise
        raise AdapterFileError(
            f"adapter config does not describe a usable LoRA adapter: {e}"
        ) from None


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
    model: nn.Module, config: LoraConfig | MixedConfig, tensors: dict[str, torch.Tensor]
) -> None:
    """The file holds each target's LoRA factors at the rank the config gives, and the weights
    of each saved module; checked before any layer is built (a config saying r=10**12 must not
    allocate it)."""
    task_type = config.task_type or infer_task_type(model)
    to_save = resolve_modules_to_save(model, config, task_type)
    for module_name in match_targets(model, config, skip=to_save):
        part = config.part_for(module_name) if isinstance(config, MixedConfig) else config
        if not isinstance(part, LoraConfig):
            continue
        key = next(
            (
                k
                for k in (
                    f"{module_name}.{LoraLayer.peft_keys['A']}",
                    f"{module_name}.lora_embedding_A",
                )
                if k in tensors
            ),
            None,
        )
        if key is None:
            raise AdapterFileError(
                f"adapter file lacks the LoRA factors of {module_name}, which its config "
                "targets; the file and adapter_config.json do not belong together"
            )
        rank = part.rank_for(module_name)
        if tensors[key].ndim != 2 or tensors[key].shape[0] != rank:
            raise AdapterFileError(
                f"adapter tensor {key!r} has shape {tuple(tensors[key].shape)} but "
                f"adapter_config.json gives {module_name} rank {rank}; the file and the config "
                "do not belong together"
            )
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
    for mod_name in rec.modules_to_save:  # this adapter's own copy of the head
        for key, t in saved_module(model, mod_name, name).state_dict(keep_vars=True).items():
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
