"""The common instruction-tuning formats beside leantune's own (prompt / response columns, or a
``messages`` column), detected from the columns, turned into ``{role, content}`` messages that
``models/chat.py`` validates and renders like any other conversation:

- **Alpaca**: ``instruction``, optional ``input``, ``output`` (and optional ``system``); the
  user turn is the instruction, then a blank line and the input when there is one;
- **ShareGPT**: ``conversations``, a list of ``{from, value}`` turns, ``from`` one of system,
  human / user, gpt / assistant (in CSV the list's JSON text).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

FORMAT_COLUMNS = ("instruction", "input", "output", "conversations")
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SPEAKERS |= {"system": "system", "chatgpt": "assistant", "model": "assistant"}


def sft_format(columns: Collection[str]) -> str | None:
    """ "alpaca", "sharegpt" or None (leantune's own columns), from the file's columns."""
    if "conversations" in columns:
        return "sharegpt"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    return None


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return value if isinstance(value, str) else str(value)


def as_messages(row: dict[str, Any], fmt: str) -> Any:
    """The row's conversation as a list of ``{role, content}`` (validated by the caller);
    a cell that is not what the format expects comes back as it is, for the caller's error."""
    if fmt == "alpaca":
        prompt, extra = _text(row.get("instruction")), _text(row.get("input")).strip()
        messages = (
            [{"role": "system", "content": _text(row["system"])}] if row.get("system") else []
        )
        messages.append({"role": "user", "content": f"{prompt}\n\n{extra}" if extra else prompt})
        return [*messages, {"role": "assistant", "content": _text(row.get("output"))}]
    turns = row.get("conversations")
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except ValueError:
            return turns
    if not isinstance(turns, list):
        return turns
    out = []
    for turn in turns:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            out.append(turn)  # refused by the caller, which names the message
            continue
        speaker = str(turn["from"]).lower()
        out.append({"role": SPEAKERS.get(speaker, speaker), "content": turn["value"]})
    return out
