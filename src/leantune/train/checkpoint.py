"""Checkpoints of the training loop: one unit per save (``step-NNNNNNN/``: the trainable
weights, optimizer moments and RNG states in safetensors, the progress in JSON, any extra files),
switched in by one rename of ``latest.json``. Under several processes every rank takes part in
a save (sharded tensors are gathered) and rank 0 writes; on resume rank 0 reads and the others
receive the bytes."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from leantune.core.distributed import (
    broadcast_bytes,
    current,
    full_tensor,
    gather_tensors,
    like,
    settle,
    together,
)
from leantune.core.errors import LeantuneError
from leantune.core.files import read_tensors
from leantune.models.precision import LossScaler
from leantune.train.interface import Progress

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
LATEST = "latest.json"


# ---------------------------------------------------------------------------- checkpoints


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    settle(model)  # FSDP: the sharded parameters, not a forward's whole copies
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def latest_checkpoint(directory: Path) -> Path | None:
    """The folder of the newest complete checkpoint in ``directory``, or None.

    A checkpoint is one unit: ``step-NNNNNNN/`` holds the tensors, the progress and any extra
    files (the best weights), and ``latest.json`` names it. The pointer is replaced by one
    rename after the unit is whole, so a kill at any moment leaves the previous unit in force.
    """
    pointer = Path(directory) / LATEST
    try:
        name = json.loads(pointer.read_text())["folder"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LeantuneError(f"checkpoint pointer {pointer} is unreadable ({e})") from None
    folder = Path(directory) / str(name)
    if Path(name).name != name or not (folder / STATE_JSON).is_file():
        raise LeantuneError(f"checkpoint pointer {pointer} names {name!r}, which is incomplete")
    return folder


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    progress: Progress,
    params: Mapping[str, nn.Parameter] | None = None,
    extra: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    meta: Mapping[str, Any] | None = None,
    scaler: Mapping[str, Any] | None = None,
) -> Path | None:
    """Trainable weights, optimizer moments and RNG state in safetensors; the rest (fp16's loss
    scale ``scaler`` among it) in JSON.

    Under several processes every rank calls it (sharded tensors are gathered, each rank's RNG
    state is kept as ``rng.cpu.<rank>``) and rank 0 alone writes; other ranks get None.

    ``extra`` adds safetensors files to the unit (name → tensors); extra files of the previous
    unit that are not given again are carried over (hard-linked). ``meta`` is stored beside
    the progress and read back by :func:`checkpoint_meta`. Returns the unit's folder.
    """
    params = trainable_parameters(model) if params is None else params
    tensors = {f"param.{n}": full_tensor(p).cpu().contiguous() for n, p in params.items()}
    opt_state = opt.state_dict()
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"opt.{index}.{key}"] = full_tensor(torch.as_tensor(value)).cpu().contiguous()
    for rank, rng in enumerate(gather_tensors(torch.get_rng_state())):
        tensors["rng.cpu" if rank == 0 else f"rng.cpu.{rank}"] = rng
    extra = {
        name: {k: full_tensor(t).cpu().contiguous() for k, t in file_tensors.items()}
        for name, file_tensors in (extra or {}).items()
    }
    if not current().main:
        return None
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    info = {
        "progress": asdict(progress),
        "param_groups": opt_state["param_groups"],
        "scheduler": {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"},
        "meta": dict(meta or {}),
        "scaler": dict(scaler or {}),
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    previous = latest_checkpoint(directory)
    unit = directory / f"step-{progress.step:07d}"
    n = 0
    while unit.exists():  # the same step again (Ctrl-C after an evaluation), or a torn unit
        n += 1
        unit = directory / f"step-{progress.step:07d}.{n}"
    unit.mkdir()
    save_file(tensors, str(unit / STATE_TENSORS), metadata={"format": "pt"})
    for name, file_tensors in extra.items():
        save_file(dict(file_tensors), str(unit / name), metadata={"format": "pt"})
    if previous is not None:
        for old in previous.iterdir():
            if old.name not in (STATE_TENSORS, STATE_JSON) and not (unit / old.name).exists():
                try:
                    os.link(old, unit / old.name)
                except OSError:
                    shutil.copy2(old, unit / old.name)
    (unit / STATE_JSON).write_text(json.dumps(info))  # last: a unit with it is whole
    tmp = directory / f".{LATEST}.tmp"
    tmp.write_text(json.dumps({"folder": unit.name, "step": progress.step}))
    os.replace(tmp, directory / LATEST)  # the one switch
    for stale in directory.iterdir():  # older units and units a kill left half-written
        if stale.is_dir() and stale != unit and re.fullmatch(r"step-\d{7}(\.\d+)?", stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    return unit


def checkpoint_meta(directory: Path) -> dict[str, Any]:
    """The ``meta`` stored with the newest checkpoint ({} when there is none)."""
    unit = latest_checkpoint(directory)
    if unit is None:
        return {}
    return dict(json.loads((unit / STATE_JSON).read_text()).get("meta") or {})


def _read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The newest checkpoint's progress and tensors. Under several processes rank 0 reads the
    files and the others receive their bytes: only rank 0 needs to see the run folder."""
    world = current()

    def read() -> tuple[bytes, bytes]:
        if not world.main:
            return b"", b""
        unit = latest_checkpoint(directory)
        if unit is None:
            raise LeantuneError(f"no checkpoint in {directory}; start the run without --resume")
        try:
            state, tensors = (unit / STATE_JSON).read_bytes(), (unit / STATE_TENSORS).read_bytes()
            json.loads(state), read_tensors(tensors, unit / STATE_TENSORS)
        except (OSError, ValueError) as e:
            raise LeantuneError(f"no usable checkpoint in {unit}: {e}") from None
        return state, tensors

    state, tensors = together(read, "reading the checkpoint")
    if world.parallel:
        state, tensors = broadcast_bytes(state), broadcast_bytes(tensors)
    return json.loads(state), read_tensors(tensors, "the checkpoint")


def load_checkpoint(
    directory: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    params: Mapping[str, nn.Parameter] | None = None,
    scaler: LossScaler | None = None,
) -> Progress:
    meta, tensors = _read_checkpoint(directory)
    params = trainable_parameters(model) if params is None else params
    saved = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    if set(saved) != set(params):
        raise LeantuneError(
            f"checkpoint in {directory} holds {len(saved)} trainable tensors, the model has "
            f"{len(params)}; resume with the run's own config"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(like(saved[name], p))
    by_index = [p for group in opt.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            param = by_index[int(index)] if int(index) < len(by_index) else None
            if param is not None and value.shape == param.shape:
                value = like(value, param)
            state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"] | {"lr_lambdas": [None] * len(opt.param_groups)})
    if scaler is not None:
        scaler.load_state_dict(meta.get("scaler") or {})
    rank = current().rank
    rng = tensors.get("rng.cpu" if rank == 0 else f"rng.cpu.{rank}")
    if rng is not None:  # a rank the checkpoint did not have keeps its seed
        torch.set_rng_state(rng)
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    progress = Progress(**meta["progress"])
    progress.curve = [(int(s), float(v)) for s, v in progress.curve]
    return progress
