"""LoRA's helper math: the L2 of s·B·A and DoRA's row norms of W + s·B·A without building B·A, autocast switched
off for them, and A(dropout(x)) that keeps a 1-byte mask for backward instead of a dropped copy."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F


def lora_l2(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖s·B·A‖_F² without building B·A: s²·Σ (BᵀB) ⊙ (AAᵀ)."""
    return scaling**2 * ((B.T @ B) * (A @ A.T)).sum()


def row_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """Row norms of W + s·B·A without building B·A: |W|² + 2s·B⊙(W·Aᵀ) + s²·B⊙(B·A·Aᵀ),
    in the factors' dtype (a bf16 base weight with fp32 factors is computed in fp32)."""
    weight = weight.to(A.dtype)
    sq = (
        weight.pow(2).sum(1)
        + 2 * s * (B * (weight @ A.T)).sum(1)
        + s * s * (B * (B @ (A @ A.T))).sum(1)
    )
    return sq.clamp_min(0).sqrt()


def full_precision(t: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """Autocast switched off for ``t``'s device when it is on (DoRA's norms stay exact)."""
    kind = t.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


class DropoutDown(torch.autograd.Function):
    """A(dropout(x)) that keeps x and a 1-byte mask for backward instead of the dropped copy.

    x is usually kept anyway (query, key and value share it), so each LoRA layer with dropout
    costs a byte per input element instead of the four of a separate dropped tensor.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, A: torch.Tensor, p: float) -> torch.Tensor:
        dropped, keep = torch.native_dropout(x, p, True)
        ctx.save_for_backward(x, keep, A)
        ctx.p = p
        return F.linear(dropped, A)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, keep, A = ctx.saved_tensors
        # The dropout scale rides on the small (tokens, r) gradient, not on the wide tensors.
        # Under autocast the forward ran in bf16/fp16 while x and A may not: compute in the
        # wider of their dtypes and hand each gradient back in its input's dtype.
        dtype = torch.promote_types(x.dtype, A.dtype)
        grad_h = grad.reshape(-1, grad.shape[-1]).to(dtype) * (1.0 / (1.0 - ctx.p))
        grad_A = None
        if ctx.needs_input_grad[1]:
            grad_A = (grad_h.T @ (x * keep).reshape(-1, x.shape[-1]).to(dtype)).to(A.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_h @ A.to(dtype)).mul_(keep.reshape(-1, x.shape[-1])).reshape(x.shape)
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_A, None
