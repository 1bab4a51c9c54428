"""Which layers are normalization layers, and in which form they compute.

A LayerNorm computes γ ⊙ n(x) + β with n(x) the normalized input; an RMSNorm γ ⊙ x / rms(x).
Which form a norm has is measured on a random input, not guessed from its class name (T5's
"LayerNorm" is an RMSNorm); other forms (Gemma's 1 + γ, for one) give None. Used by scoring
(``select``) and by LayerNorm tuning.
"""

from __future__ import annotations

import torch
from torch import nn


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm or an RMSNorm (torch's, or a model's own class of that name) with a weight."""
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    return (
        isinstance(module, nn.LayerNorm | nn.RMSNorm)
        or name.endswith(("LayerNorm", "RMSNorm", "LayerNormalization"))
    ) and isinstance(weight, nn.Parameter)


def norm_eps(module: nn.Module, dtype: torch.dtype) -> float:
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
        want = weight.float() * normalize(x, form == "rms", norm_eps(module, weight.dtype)).float()
        if isinstance(bias, torch.Tensor):
            want = want + bias.float()
        if torch.allclose(got, want, atol=tol, rtol=tol):
            return form
    return None
