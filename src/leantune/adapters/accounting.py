"""What an adapter costs: trainable and total parameters, the bytes of its file; and the frozen
base beside it (its bytes, and casting it to a half-precision dtype with the adapters in fp32)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leantune.adapters.base import records
from leantune.adapters.formats import adapter_file_bytes
from leantune.adapters.inject import adapter_parameters, module_copy_parameters
from leantune.models.precision import dtype_of, is_quantized_tensor, tensor_bytes


@dataclass(frozen=True)
class ParameterReport:
    """What training costs in parameters and what the adapter costs on disk."""

    trainable: int
    total: int
    adapter_bytes: int
    """Size of adapter_model.safetensors as save_adapter writes it (heads included)."""

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "trainable_params": self.trainable,
            "total_params": self.total,
            "trainable_percent": round(self.percent, 4),
            "adapter_bytes": self.adapter_bytes,
        }

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f} || adapter file: {_human(self.adapter_bytes)}"
        )


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    raise AssertionError  # pragma: no cover


def parameter_report(model: nn.Module, name: str | None = None) -> ParameterReport:
    """Trainable and total parameters (shared tensors counted once) and adapter file bytes."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():  # parameters() already yields a shared tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    size = adapter_file_bytes(model, name) if records(model) else 0
    return ParameterReport(trainable=trainable, total=total, adapter_bytes=size)


# ---------------------------------------------------------------------------- the frozen base


def _kept(model: nn.Module) -> set[int]:
    """ids of the parameters that train or may train: trainable now, adapters (gradual
    unfreezing switches them on later) and modules trained in full (heads)."""
    from leantune.adapters.base import records

    kept = {id(p) for p in model.parameters() if p.requires_grad}
    kept |= {id(p) for p in adapter_parameters(model).values()}
    for name in records(model):
        kept |= {id(p) for p in module_copy_parameters(model, name).values()}
    return kept


def base_bytes(model: nn.Module) -> int:
    """Bytes of the frozen base: parameters that never train, and buffers."""
    kept = _kept(model)
    params = [p for p in model.parameters() if id(p) not in kept]
    return sum(tensor_bytes(t) for t in [*params, *model.buffers()])


def cast_base(model: nn.Module, dtype: torch.dtype | str) -> int:
    """Hold the frozen base's floating-point parameters in ``dtype``; adapters, heads and
    anything trainable are (made) fp32. Call it after inject: a layer adapted afterwards would
    create its adapter in the base dtype. Buffers (rotary frequencies ...) keep their dtype.
    Returns the number of base parameters cast. Train and evaluate under ``autocast``."""
    dtype = dtype_of(dtype) if isinstance(dtype, str) else dtype
    kept = _kept(model)
    cast = 0
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_floating_point() or is_quantized_tensor(p):
                continue
            want = torch.float32 if id(p) in kept else dtype
            if p.dtype != want:
                p.data = p.data.to(want)
                cast += id(p) not in kept
    return cast
