"""LayerNorm tuning: train only the scale (and shift) of normalization layers.

A LayerNorm computes γ ⊙ n(x) + β with n(x) the normalized input; an RMSNorm γ ⊙ x / rms(x).
Each adapted norm gets learned changes Δγ (and Δβ when it has a bias); the unmerged forward adds
Δγ ⊙ n(x) + Δβ to the base output, merging adds them into γ and β. Which form a norm has is
measured (``leantune.models.norms``); other forms (Gemma's 1 + γ, for one) are refused rather than
tuned wrongly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, cast

import torch
from torch import nn

from leantune.adapters.base import Change
from leantune.adapters.config import AdapterConfig, PlanSize
from leantune.adapters.methods.delta import DeltaLayer
from leantune.core.errors import TargetError
from leantune.models.norms import is_norm, norm_eps, norm_form, normalize

if TYPE_CHECKING:
    from leantune.adapters.planning import Scores


@dataclass
class LayerNormConfig(AdapterConfig):
    """LayerNorm tuning: a trainable change to each targeted norm's scale and shift."""

    method: ClassVar[str] = "layernorm"
    title: ClassVar[str] = "LayerNorm tuning"

    targets: str | list[str] = "all"
    """Norm layers to tune; "all" is every LayerNorm and RMSNorm."""

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return (nn.Module,)  # the type is checked by is_norm and when adapting

    def includes(self, module: nn.Module) -> bool:
        return norm_form(module) is not None

    def adapt(self, module: nn.Module, adapter_name: str, module_name: str) -> nn.Module:
        if not is_norm(module):
            raise TargetError(
                f"{module_name} ({type(module).__name__}) is not a LayerNorm or RMSNorm"
            )
        form = norm_form(module)
        if form is None:
            raise TargetError(
                f"{module_name} ({type(module).__name__}) does not compute weight * "
                "normalize(x) + bias; leantune cannot tune it as a LayerNorm, leave it out"
            )
        layer = LayerNormLayer.wrap(module, module_name)
        assert isinstance(layer, LayerNormLayer)
        layer.rms = form == "rms"
        layer.add_adapter(adapter_name, layer.weight.numel(), module_name)
        return layer

    # --- the planner: a norm's scale and shift are one unit, gain ‖ḡ_γ‖² + ‖ḡ_β‖²

    @classmethod
    def plan_modules(cls, scores: Scores) -> Iterable[str]:
        return [n.name for n in scores.norms]

    @classmethod
    def plan_unit(
        cls, scores: Scores, module: str, i: int, max_rank: int
    ) -> tuple[float, int] | None:
        norm = scores.norm(module)
        return (norm.gain, norm.size) if i == 0 else None

    @classmethod
    def plan_size(cls, scores: Scores, module: str, n: int) -> PlanSize:
        size = scores.norm(module).size
        return PlanSize(size, size)


class NormDelta(nn.Module):
    def __init__(self, size: int, dtype: torch.dtype, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(size, dtype=dtype)) if bias else None


class LayerNormLayer(DeltaLayer):
    method: ClassVar[str] = "layernorm"
    layer_state: ClassVar[tuple[str, ...]] = ("rms",)

    def shift(self) -> nn.Parameter | None:
        """The base norm's bias β (RMSNorms have none)."""
        bias = getattr(self, "bias", None)
        return bias if isinstance(bias, nn.Parameter) else None

    rms: bool = False
    """Set when adapted: the base norm is an RMSNorm (no mean subtracted)."""

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """n(x): the base layer's output before its scale and shift."""
        return normalize(x, self.rms, norm_eps(self, self.weight.dtype))

    def new_delta(self, size: int, module_name: str) -> nn.Module:
        return NormDelta(size, self.weight.dtype, self.shift() is not None)

    def contribution(self, delta: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        d = cast(NormDelta, delta)
        change = d.weight * self.normalized(x)
        if d.bias is not None:
            change = change + d.bias
        return out + change.to(out.dtype)  # autocast may run the norm in another dtype

    def change_entries(self, name: str) -> list[Change]:
        d = cast(NormDelta, self.delta[name])
        return [Change("weight", d.weight)] + (
            [Change("bias", d.bias)] if d.bias is not None else []
        )

    def fold(self, delta: nn.Module, sign: float) -> None:
        d = cast(NormDelta, delta)
        self.weight.add_(d.weight.to(self.weight.dtype), alpha=sign)
        bias = self.shift()
        if d.bias is not None and bias is not None:
            bias.add_(d.bias.to(bias.dtype), alpha=sign)
