"""What an adapter costs: trainable and total parameters, and the bytes of its file."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from leantune.formats import adapter_file_bytes
from leantune.methods.base import records


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
