"""File helpers shared by the jobs: atomic text writes, YAML reading, safetensors in and out.

Every write goes to a hidden temporary file beside the target and is moved into place with
``os.replace``, so a reader never sees half a file.

Every tensor leantune reads comes through :func:`read_tensors`, which first recognises a
safetensors file by its structure (:func:`check_tensors`): the header's length as an 8-byte
little-endian integer, a JSON object of that length, and entries whose dtypes, shapes and
offsets tile the rest of the file exactly. A file's first byte says nothing: the low byte of
the header length is 0x80 (pickle's PROTO opcode) or 0x50 ('P' of a zip) each in one file of 32.
Nothing is ever unpickled; a file that fails the check and starts like a pickle or a zip is
refused as one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save_file
from torch import nn

from leantune.core.distributed import full_tensor, like
from leantune.core.errors import LeantuneError


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


# ---------------------------------------------------------------------------- safetensors in

_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2": 8, "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8, "U16": 16, "I16": 16, "F16": 16, "BF16": 16, "U32": 32, "I32": 32, "F32": 32,
    "U64": 64, "I64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
_HEADER_LIMIT = 100_000_000  # safetensors' own limit on the header's size


def _pickle_error(where: object, error: type[LeantuneError]) -> LeantuneError:
    return error(
        f"{where} is a pickle/torch.save file; leantune never unpickles files, since loading one "
        "can run arbitrary code. Convert it where you trust it: load it with peft, then "
        "save_pretrained(..., safe_serialization=True)"
    )


def _header_problem(head: bytes, size: int) -> str | None:
    """Why ``head`` (a file's first bytes, at least its header) of a ``size``-byte file is not a
    safetensors header, or None when it is one whose entries tile the rest of the file."""
    if size < 8:
        return f"it holds {size} bytes, fewer than a safetensors header's 8-byte length"
    n = int.from_bytes(head[:8], "little")
    if n < 2 or n > _HEADER_LIMIT or 8 + n > size:
        return f"its header length ({n:,} bytes) does not fit the file's {size:,} bytes"
    try:
        header = json.loads(head[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    data, spans = size - 8 - n, []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                return "its __metadata__ is not a table of strings"
            continue
        if not isinstance(entry, dict):
            return f"its entry {name!r} is not an object"
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _DTYPE_BITS:
            return f"{name!r} has dtype {dtype!r}, which safetensors does not define"
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            return f"{name!r} has shape {shape!r}, not a list of sizes"
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data
        ):
            return (
                f"{name!r} has offsets {offsets!r} outside the file's {data:,} data bytes "
                "(truncated, or a bad header)"
            )
        if offsets[1] - offsets[0] != math.ceil(math.prod(shape) * _DTYPE_BITS[dtype] / 8):
            return f"{name!r} spans {offsets[1] - offsets[0]:,} bytes, not its {dtype} {shape}"
        spans.append((offsets[0], offsets[1]))
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            return "its tensors overlap or leave gaps"
        end = stop
    if end != data:
        return f"its tensors cover {end:,} of its {data:,} data bytes (truncated or padded)"
    return None


def _head(source: Path | bytes, where: object, error: type[LeantuneError]) -> tuple[bytes, int]:
    """The first bytes of ``source`` (its header, when the length is plausible) and its size."""
    if isinstance(source, Path):
        try:
            size = source.stat().st_size
            with source.open("rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else 0
                if len(head) == 8 and 0 < n <= min(_HEADER_LIMIT, size - 8):
                    head += f.read(n)
        except OSError as e:
            raise error(f"cannot read {where}: {e.strerror or e}") from None
        return head, size
    return source, len(source)


def _pickled(head: bytes) -> bool:
    return head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"


def refuse_pickle(path: Path, error: type[LeantuneError] = LeantuneError) -> None:
    """Raise the pickle refusal when ``path`` is not a safetensors file and starts like a
    pickle or a zip (``torch.save``); any other file passes."""
    head, size = _head(path, path, error)
    if _header_problem(head, size) is not None and _pickled(head):
        raise _pickle_error(path, error)


def check_tensors(
    source: Path | bytes, where: object = None, error: type[LeantuneError] = LeantuneError
) -> None:
    """Refuse, in one line, anything but a whole safetensors file (a path or its bytes): a
    pickle or zip (``torch.save``) as such, any other file as damaged. Reads the header only."""
    where = where if where is not None else source if isinstance(source, Path) else "the data"
    head, size = _head(source, where, error)
    problem = _header_problem(head, size)
    if problem is None:
        return
    if _pickled(head):
        raise _pickle_error(where, error)
    raise error(
        f"{where} is truncated or corrupt (not a whole safetensors file: {problem}); re-save "
        "or re-copy it"
    )


def read_tensors(
    source: Path | bytes, where: object = None, error: type[LeantuneError] = LeantuneError
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (a path or its bytes), checked by
    :func:`check_tensors` first, then parsed by the safetensors library (never unpickled)."""
    check_tensors(source, where, error)
    try:
        return load(source) if isinstance(source, bytes) else load_file(str(source))
    except (SafetensorError, OSError, ValueError) as e:
        where = where if where is not None else source if isinstance(source, Path) else "the data"
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise error(f"{where} is truncated or corrupt ({first}); re-save or re-copy it") from None


# ---------------------------------------------------------------------------- safetensors out


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
