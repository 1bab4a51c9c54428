"""LayerNorm tuning: train only the scale (and shift) of normalization layers.

A LayerNorm computes γ ⊙ n(x) + β with n(x) the normalized input; an RMSNorm γ ⊙ x / rms(x).
Each adapted norm gets learned changes Δγ (and Δβ when it has a bias); the unmerged forward adds
Δγ ⊙ n(x) + Δβ to the base output, merging adds them into γ and β. Other norm types (Gemma's
1 + γ, for one) are detected when adapted and refused rather than tuned wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from leantune.errors import TargetError
from leantune.inject import AdapterConfig, register
from leantune.methods.delta import DeltaLayer


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm or an RMSNorm (torch's, or a model's own class of that name) with a weight."""
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    return (
        isinstance(module, nn.LayerNorm | nn.RMSNorm)
        or name.endswith(("LayerNorm", "RMSNorm", "LayerNormalization"))
    ) and isinstance(weight, nn.Parameter)


@dataclass
class LayerNormConfig(AdapterConfig):
    """LayerNorm tuning: a trainable change to each targeted norm's scale and shift."""

    method: ClassVar[str] = "layernorm"

    targets: str | list[str] = "all"
    """Norm layers to tune; "all" is every LayerNorm and RMSNorm."""

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return (nn.Module,)  # the type is checked by is_norm and when adapting

    def includes(self, module: nn.Module) -> bool:
        return is_norm(module)

    def adapt(self, module: nn.Module, adapter_name: str, module_name: str) -> nn.Module:
        if not is_norm(module):
            raise TargetError(
                f"{module_name} ({type(module).__name__}) is not a LayerNorm or RMSNorm"
            )
        layer = LayerNormLayer.wrap(module, module_name)
        assert isinstance(layer, LayerNormLayer)
        if not layer.adapter_names():
            layer.check_formula(module_name)
        layer.add_adapter(adapter_name, layer.weight.numel(), module_name)
        return layer


register("layernorm", LayerNormConfig)


class NormDelta(nn.Module):
    def __init__(self, size: int, dtype: torch.dtype, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(size, dtype=dtype)) if bias else None


class LayerNormLayer(DeltaLayer):
    method: ClassVar[str] = "layernorm"

    def shift(self) -> nn.Parameter | None:
        """The base norm's bias β (RMSNorms have none)."""
        bias = getattr(self, "bias", None)
        return bias if isinstance(bias, nn.Parameter) else None

    def _rms(self) -> bool:
        return not isinstance(self, nn.LayerNorm) and "LayerNorm" not in self._base_class.__name__

    def _eps(self, x: torch.Tensor) -> float:
        for attr in ("eps", "variance_epsilon", "epsilon"):
            value = getattr(self, attr, None)
            if isinstance(value, float | int):
                return float(value)
        return float(torch.finfo(x.dtype).eps)

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """n(x): the base layer's output before its scale and shift."""
        if not self._rms():
            return F.layer_norm(x, self.weight.shape, None, None, self._eps(x))
        x32 = x.float()
        n = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self._eps(x))
        return n.to(x.dtype)

    def check_formula(self, module_name: str) -> None:
        """Refuse a norm whose output is not γ ⊙ n(x) + β (tuning it here would be wrong)."""
        x = torch.randn(2, 3, self.weight.numel(), device=self.weight.device)
        x = x.to(self.weight.dtype)
        with torch.no_grad():
            got = self._base_class.forward(self, x)
            want = self.weight * self.normalized(x)
            bias = self.shift()
            if bias is not None:
                want = want + bias
        if not torch.allclose(got, want, atol=1e-4, rtol=1e-3):
            raise TargetError(
                f"{module_name} ({self._base_class.__name__}) does not compute weight * "
                "normalize(x) + bias; leantune cannot tune it as a LayerNorm, leave it out"
            )

    def new_delta(self, size: int, module_name: str) -> nn.Module:
        return NormDelta(size, self.weight.dtype, self.shift() is not None)

    def contribution(self, delta: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        d = cast(NormDelta, delta)
        out = out + d.weight * self.normalized(x)
        return out if d.bias is None else out + d.bias

    def fold(self, delta: nn.Module, sign: float) -> None:
        d = cast(NormDelta, delta)
        self.weight.add_(d.weight.to(self.weight.dtype), alpha=sign)
        bias = self.shift()
        if d.bias is not None and bias is not None:
            bias.add_(d.bias.to(bias.dtype), alpha=sign)
