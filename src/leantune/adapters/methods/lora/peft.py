"""LoRA in adapter files: peft's ``LORA`` adapter_config.json (written and read), LoRA modules in
a ``LEANTUNE`` folder's ``modules`` table, and the check that a file's factors fit its config.

``formats`` drives saving and loading; this module knows only LoRA. Tensor keys come from
``LoraLayer.file_tensors`` / ``file_targets`` (peft's ``lora_A.weight`` ...).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from leantune.adapters.config import AdapterRecord
from leantune.adapters.methods.lora.config import LoraConfig
from leantune.adapters.methods.lora.layers import LoraLayer, plain_number
from leantune.core import checks
from leantune.core.errors import AdapterFileError

PEFT_TYPE = "LORA"

_UNSUPPORTED = {
    "bias": ("none", "bias training is not supported; save the adapter with bias='none'"),
    "lora_bias": (False, "lora_bias is not supported"),
    "target_parameters": (None, "target_parameters is not supported"),
    "trainable_token_indices": (None, "trainable_token_indices is not supported"),
    "layer_replication": (None, "layer_replication is not supported"),
}


# ---------------------------------------------------------------------------- writing


def peft_config(
    rec: AdapterRecord,
    name: str,
    layers: Iterable[tuple[str, LoraLayer]],
    base: str | None,
) -> dict[str, Any]:
    """The ``LORA`` adapter_config.json peft needs to rebuild adapter ``name`` (whose record is
    ``rec`` and whose LoRA layers are ``layers``) on the base model ``base``."""
    cfg = rec.config
    assert isinstance(cfg, LoraConfig)
    per_module: dict[str, tuple[int, float]] = {}
    fan_in_fan_out = False
    for layer_name, layer in layers:
        per_module[layer_name] = layer.saved_rank_alpha(name)
        fan_in_fan_out |= layer._base_class.__name__ == "Conv1D"
    r = Counter(ra[0] for ra in per_module.values()).most_common(1)[0][0]
    alpha = Counter(ra[1] for ra in per_module.values()).most_common(1)[0][0]
    # Keys are full module names: peft matches them against the same names (regex suffix rule).
    rank_pattern = {m: ra[0] for m, ra in per_module.items() if ra[0] != r}
    alpha_pattern = {m: plain_number(ra[1]) for m, ra in per_module.items() if ra[1] != alpha}
    return {
        "peft_type": PEFT_TYPE,
        "task_type": rec.task_type,
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": plain_number(alpha),
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


# ---------------------------------------------------------------------------- reading


def peft_rows(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What ``leantune info`` shows of a peft ``LORA`` adapter_config.json: method, sizes,
    targets."""
    targets = config.get("target_modules")
    dora = " (DoRA)" if config.get("use_dora") else ""
    return [
        ("method", f"{config.get('peft_type')}{dora}"),
        ("rank / alpha", f"{config.get('r')} / {config.get('lora_alpha')}"),
        ("rank_pattern", json.dumps(config.get("rank_pattern") or {})),
        ("rsLoRA", str(bool(config.get("use_rslora")))),
        ("targets", targets if isinstance(targets, str) else f"{len(targets or [])} modules"),
    ]


def config_from_peft(cfg: Mapping[str, Any]) -> LoraConfig:
    """A LoraConfig from a peft (or leantune) adapter_config.json. Values of the wrong type are
    refused rather than coerced (a string "false" is not False, 4.5 is not rank 4)."""
    if cfg.get("peft_type") != PEFT_TYPE:
        raise AdapterFileError(
            f"peft_type {cfg.get('peft_type')!r} is not supported; leantune loads LORA adapters "
            "and its own 'LEANTUNE' ones"
        )
    for key, (ok, why) in _UNSUPPORTED.items():
        if cfg.get(key, ok) not in (ok, None, {}, []):
            raise AdapterFileError(f"adapter config {key}={cfg[key]!r}: {why}")
    init = cfg.get("init_lora_weights", True)
    if not isinstance(init, bool | str):
        raise checks.bad("init_lora_weights", init, "true, false or an init name")
    # EVA starts A on the inputs' principal directions with B zero and leaves the base weight
    # as it was: its file is a plain LoRA update, like gaussian's.
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva"):
        raise AdapterFileError(
            f"init_lora_weights={init!r}: such adapters need a rewritten base model; convert it "
            "to a plain LoRA with peft (path_initial_model_for_weight_conversion) first"
        )
    targets = cfg.get("target_modules")
    if not targets:
        raise AdapterFileError("adapter config has no target_modules")
    if not isinstance(targets, str):
        targets = checks.names("target_modules", targets)
    try:
        return LoraConfig(
            targets=targets,
            layers=checks.layers(cfg.get("layers_to_transform")),
            layers_pattern=checks.layers_pattern(cfg.get("layers_pattern")),
            exclude=checks.names("exclude_modules", cfg.get("exclude_modules")),
            modules_to_save=checks.names("modules_to_save", cfg.get("modules_to_save")),
            task_type=checks.optional_str("task_type", cfg.get("task_type")),
            r=checks.rank("r", cfg.get("r", 8)),
            alpha=checks.positive_number("lora_alpha", cfg.get("lora_alpha", 8)),
            dropout=checks.dropout("lora_dropout", cfg.get("lora_dropout")),
            rslora=checks.flag("use_rslora", cfg.get("use_rslora")),
            dora=checks.flag("use_dora", cfg.get("use_dora")),
            rank_pattern=checks.pattern("rank_pattern", cfg.get("rank_pattern"), checks.rank),
            alpha_pattern=checks.pattern(
                "alpha_pattern", cfg.get("alpha_pattern"), checks.positive_number
            ),
        )
    except (TypeError, ValueError) as e:
        if isinstance(e, AdapterFileError):
            raise
        raise AdapterFileError(
            f"adapter config does not describe a usable LoRA adapter: {e}"
        ) from None


class LoraFormat:
    """peft's ``LORA`` format, as ``register`` takes it (``PeftFormat``)."""

    peft_type = PEFT_TYPE

    def write(
        self, rec: AdapterRecord, name: str, layers: list[tuple[str, Any]], base: str | None
    ) -> dict[str, Any]:
        return peft_config(rec, name, layers, base)

    def read(self, raw: Mapping[str, Any]) -> LoraConfig:
        return config_from_peft(raw)

    def describe(self, raw: Mapping[str, Any]) -> list[tuple[str, str]]:
        return peft_rows(raw)


LORA_FORMAT = LoraFormat()
