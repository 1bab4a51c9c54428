"""LayerNorm tuning: train only the scale (and shift) of normalization layers.

A LayerNorm computes γ ⊙ n(x) + β with n(x) the normalized input; an RMSNorm γ ⊙ x / rms(x).
Each adapted norm gets learned changes Δγ (and Δβ when it has a bias); the unmerged forward adds
Δγ ⊙ n(x) + Δβ to the base output, merging adds them into γ and β. Which form a norm has is
measured on a random input, not guessed from its class name (T5's "LayerNorm" is an RMSNorm);
other forms (Gemma's 1 + γ, for one) are refused rather than tuned wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch import nn

from leantune.errors import TargetError
from leantune.methods.base import AdapterConfig, register
from leantune.methods.delta import DeltaLayer


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm or an RMSNorm (torch's, or a model's own class of that name) with a weight."""
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    return (
        isinstance(module, nn.LayerNorm | nn.RMSNorm)
        or name.endswith(("LayerNorm", "RMSNorm", "LayerNormalization"))
    ) and isinstance(weight, nn.Parameter)


def _eps(module: nn.Module, dtype: torch.dtype) -> float:
    for attr in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, float | int):
            return float(value)
    return float(torch.finfo(dtype).eps)


def normalize(x: torch.Tensor, rms: bool, eps: float) -> torch.Tensor:
    """n(x): x / rms(x) (RMSNorm) or (x - mean) / std (LayerNorm), over the last dimension,
    computed in float32 and returned in x's dtype."""
    x32 = x.float()
    if not rms:
        x32 = x32 - x32.mean(-1, keepdim=True)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@torch.no_grad()
def norm_form(module: nn.Module) -> str | None:
    """ "layernorm" or "rms" when ``module`` computes weight · n(x) (+ bias) in that form (tried
    on a random input, whatever its class is called), else None (Gemma's (1 + weight), ...)."""
    if not is_norm(module):
        return None
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    x = torch.randn(2, 3, weight.numel(), device=weight.device).to(weight.dtype)
    forward = getattr(module, "_base_class", type(module)).forward
    got = forward(module, x).float()
    bias = getattr(module, "bias", None)
    tol = max(1e-3, 4 * float(torch.finfo(weight.dtype).eps))
    for form in ("layernorm", "rms"):
        want = weight.float() * normalize(x, form == "rms", _eps(module, weight.dtype)).float()
        if isinstance(bias, torch.Tensor):
            want = want + bias.float()
        if torch.allclose(got, want, atol=tol, rtol=tol):
            return form
    return None


@dataclass
class LayerNormConfig(AdapterConfig):
    """LayerNorm tuning: a trainable change to each targeted norm's scale and shift."""

    method: ClassVar[str] = "layernorm"

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


register("layernorm", LayerNormConfig)


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
        return normalize(x, self.rms, _eps(self, self.weight.dtype))

    def new_delta(self, size: int, module_name: str) -> nn.Module:
        return NormDelta(size, self.weight.dtype, self.shift() is not None)

    def contribution(self, delta: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        d = cast(NormDelta, delta)
        change = d.weight * self.normalized(x)
        if d.bias is not None:
            change = change + d.bias
        return out + change.to(out.dtype)  # autocast may run the norm in another dtype

    def fold(self, delta: nn.Module, sign: float) -> None:
        d = cast(NormDelta, delta)
        self.weight.add_(d.weight.to(self.weight.dtype), alpha=sign)
        bias = self.shift()
        if d.bias is not None and bias is not None:
            bias.add_(d.bias.to(bias.dtype), alpha=sign)
