"""Checked reads of adapter_config.json values: a value of the wrong type is refused with a
message that names the key and the fix, never coerced (a string "false" is not False, 4.5 is not
rank 4). The readers of ``formats`` and ``adapters.methods.lora`` share them."""

from __future__ import annotations

import math
import re
from typing import Any

from leantune.core.errors import AdapterFileError


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def bad(key: str, value: Any, want: str) -> AdapterFileError:
    return AdapterFileError(
        f"adapter config {key}={short(value)} must be {want}; fix adapter_config.json or "
        "re-save the adapter"
    )


def rank(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterFileError(
            f"adapter config {key}={short(value)}: a LoRA rank r must be a positive integer; fix "
            "adapter_config.json or re-save the adapter"
        )
    return value


def positive_number(key: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise bad(key, value, "a positive finite number")
    return float(value)


def dropout(key: str, value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise bad(key, value, "a number in [0, 1)")
    return float(value)


def flag(key: str, value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(key, value, "true or false")
    return value


def names(key: str, value: Any) -> list[str]:
    """A list of module names (one name alone is taken as a list of one)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise bad(key, value, "a module name or a list of module names")


def optional_str(key: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise bad(key, value, "a string or null")
    return value


def pattern(key: str, value: Any, convert: Any) -> dict[str, Any]:
    """rank_pattern / alpha_pattern: regex keys (peft's rule), values checked by ``convert``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(key, value, "an object mapping module names to values")
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


def layers(value: Any) -> list[int] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
    ):
        raise bad("layers_to_transform", value, "a layer index or a list of layer indices")
    return list(items)


def layers_pattern(value: Any) -> str | None:
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return str(value[0])
    if value is None or (isinstance(value, str) and value):
        return value
    raise bad("layers_pattern", value, "the name of the layer list, like 'layers'")
