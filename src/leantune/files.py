"""File helpers shared by the jobs: atomic text writes, YAML reading, safetensors in and out.

Every write goes to a hidden temporary file beside the target and is moved into place with
``os.replace``, so a reader never sees half a file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from leantune.distributed import full_tensor, like
from leantune.errors import LeantuneError


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's contents; unreadable or invalid files are one clear error."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise LeantuneError(f"cannot read {what} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise LeantuneError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None


def unique_tensors(named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tied tensors once (safetensors refuses shared memory), detached, on the CPU; FSDP's
    sharded tensors gathered whole (a collective: every rank calls it)."""
    seen: set[int] = set()
    out = {}
    for name, t in named.items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = full_tensor(t).cpu().contiguous()
    return out


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(dict(tensors), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def load_into(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: Path) -> None:
    """Copy ``tensors`` into the model's parameters of the same names and shapes."""
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in tensors if n not in params]
    if missing:
        raise LeantuneError(f"{where} holds {missing[0]!r}, which the model does not have")
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise LeantuneError(
                    f"{where}: {name} has shape {tuple(t.shape)}, the model "
                    f"{tuple(params[name].shape)}"
                )
            params[name].copy_(like(t, params[name]))  # FSDP: sharded as the parameter


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
