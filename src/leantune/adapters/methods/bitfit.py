"""BitFit (Ben Zaken et al., 2022): train only bias terms.

Each adapted layer gets a learned change Δb to its bias, added to its output; merging adds Δb
into the bias. Adapts linear layers (nn.Linear, GPT-2 Conv1D) and LayerNorms that have a bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, cast

import torch
from torch import nn

from leantune.adapters.base import LINEAR_TYPES, Change
from leantune.adapters.config import AdapterConfig, PlanSize
from leantune.adapters.methods.delta import DeltaLayer
from leantune.core.errors import TargetError

if TYPE_CHECKING:
    from leantune.adapters.planning import Scores


@dataclass
class BitFitConfig(AdapterConfig):
    """BitFit: a trainable change to the bias of each targeted layer."""

    method: ClassVar[str] = "bitfit"
    title: ClassVar[str] = "BitFit"

    targets: str | list[str] = "all"
    """Modules whose bias is trained; "all" is every linear layer and LayerNorm with a bias."""

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return (*LINEAR_TYPES, nn.LayerNorm)

    def includes(self, module: nn.Module) -> bool:
        bias = getattr(module, "bias", None)
        return isinstance(module, self.supported_types()) and isinstance(bias, torch.Tensor)

    def adapt(self, module: nn.Module, adapter_name: str, module_name: str) -> nn.Module:
        bias = getattr(module, "bias", None)
        if not isinstance(bias, torch.Tensor):
            raise TargetError(f"{module_name} has no bias for BitFit to train; leave it out")
        layer = BitFitLayer.wrap(module, module_name)
        layer.add_adapter(adapter_name, bias.numel(), module_name)
        return layer

    # --- the planner: a linear layer's bias is one unit, gain ‖ḡ_b‖²

    @classmethod
    def plan_unit(
        cls, scores: Scores, module: str, i: int, max_rank: int
    ) -> tuple[float, int] | None:
        m = scores.module(module)
        return (m.bias_gain, m.bias_size) if i == 0 and m.bias_size else None

    @classmethod
    def plan_size(cls, scores: Scores, module: str, n: int) -> PlanSize:
        size = scores.module(module).bias_size
        return PlanSize(size, size)


class BiasDelta(nn.Module):
    def __init__(self, size: int, dtype: torch.dtype):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(size, dtype=dtype))


class BitFitLayer(DeltaLayer):
    method: ClassVar[str] = "bitfit"
    bias: nn.Parameter

    def new_delta(self, size: int, module_name: str) -> nn.Module:
        return BiasDelta(size, self.bias.dtype)

    def contribution(self, delta: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + cast(BiasDelta, delta).bias.to(out.dtype)  # autocast: keep out's dtype

    def change_entries(self, name: str) -> list[Change]:
        return [Change("bias", cast(BiasDelta, self.delta[name]).bias)]

    def fold(self, delta: nn.Module, sign: float) -> None:
        self.bias.add_(cast(BiasDelta, delta).bias.to(self.bias.dtype), alpha=sign)
