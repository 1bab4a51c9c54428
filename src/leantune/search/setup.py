"""The setup of a compare or sweep folder (or shared study): what it was made for, written once
(``setup.json``), and a folder made for other options or data refused."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from leantune.core.errors import LeantuneError
from leantune.core.files import atomic_write

SETUP = "setup.json"


def check_setup(folder: Path, setup: dict[str, Any], what: str) -> None:
    """Write setup.json into a new folder; refuse a folder whose setup.json differs."""
    path = folder / SETUP
    if path.exists():
        old = json.loads(path.read_text())
        if old != setup:
            diff = sorted(differences(old, setup))
            raise LeantuneError(
                f"{folder} was made for another {what} ({', '.join(diff)} differ); "
                "use a new folder or the same options"
            )
        return
    if folder.exists() and any(folder.iterdir()):
        raise LeantuneError(f"{folder} exists and is not a leantune {what} folder; use a new one")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(setup, indent=1, sort_keys=True) + "\n")


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ; inside common options, the option names."""
    out = []
    for key in set(old) | set(new):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "common" and isinstance(a, dict) and isinstance(b, dict):
            out += [k for k in set(a) | set(b) if a.get(k) != b.get(k)]
        else:
            out.append(key)
    return out
