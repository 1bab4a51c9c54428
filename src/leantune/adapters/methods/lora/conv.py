"""LoRA on convolutions (``nn.Conv2d``, ``nn.Conv1d``), as peft does it.

A is a convolution with the base layer's kernel, stride and padding (in → r channels), B a
1×1 convolution (r → out); the unmerged forward adds ``s · B(A(dropout(x)))``. The update of
the (out, in, *kernel) weight is ``ΔW[o, i, …] = s · Σ_r B[o, r] · A[r, i, …]``: peft's
``get_delta_weight`` (its 1×1 case and its conv form are both this contraction). Files use
peft's keys: ``lora_A.weight`` (r, in, *kernel), ``lora_B.weight`` (out, r, 1, …).

LoRA adapts a convolution only when it is named in ``targets`` (or with "all"); "all-linear"
never picks one. Refused with one line: grouped or dilated convolutions, padding modes other
than zeros, DoRA and PiSSA (peft merges none of the first, and the last two need a per-row
view of the weight that a kernel does not have here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from leantune.adapters.methods.lora.layers import LoraAdapter, LoraLayer
from leantune.adapters.methods.lora.math import lora_l2
from leantune.core.errors import TargetError

if TYPE_CHECKING:
    from leantune.adapters.methods.lora.config import LoraConfig

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)
_CONV: dict[int, Callable[..., torch.Tensor]] = {3: F.conv1d, 4: F.conv2d}
"""The functional convolution for a weight of this many dimensions."""


class LoraConvAdapter(LoraAdapter):
    """A LoRA adapter of a convolution: A (r, in, *kernel), B (out, r, 1, …)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        r: int,
        alpha: float,
        config: LoraConfig,
        kernel_size: tuple[int, ...],
    ):
        super().__init__(in_channels, out_channels, r, alpha, config)
        self.A = nn.Parameter(torch.empty(r, in_channels, *kernel_size))
        self.B = nn.Parameter(torch.empty(out_channels, r, *(1,) * len(kernel_size)))

    def delta_weight(self) -> torch.Tensor:
        """s · Σ_r B[o, r] A[r, i, …], shaped like the conv weight (out, in, *kernel)."""
        return torch.tensordot(self.B.flatten(1), self.A, dims=1) * self.scaling


class LoraConvLayer(LoraLayer):
    """Base of the LoRA layers on convolutions; subclasses also inherit the conv type."""

    stride: Any
    padding: Any
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]

    def dims(self) -> tuple[int, int]:
        return self.in_channels, self.out_channels

    def new_adapter(
        self, inp: int, out: int, r: int, alpha: float, config: LoraConfig
    ) -> LoraAdapter:
        return LoraConvAdapter(inp, out, r, alpha, config, tuple(self.kernel_size))

    def conv(self, x: torch.Tensor, weight: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return _CONV[self.weight.ndim](x, weight, **kwargs)

    def lora_path(self, adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        """B(A(x)) without scaling."""
        h = self.conv(x, adapter.A, stride=self.stride, padding=self.padding)
        return self.conv(h, adapter.B)

    def apply_adapter(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        adapter = self.adapter(name)
        lora = self.lora_path(adapter, adapter.dropout(x).to(adapter.A.dtype))
        return out + (lora * adapter.scaling).to(out.dtype)  # autocast: keep out's dtype

    def l2_change(self, name: str) -> torch.Tensor:
        # ‖ΔW‖ over all kernel positions is ‖s·B·A‖ with A flattened to (r, in·k).
        a = self.adapter(name)
        return lora_l2(a.A.flatten(1), a.B.flatten(1), a.scaling)

    def rank_refusal(self, name: str) -> str | None:
        return "--adapt prunes the ranks of LoRA on linear layers, not on convolutions"


class LoraConv2d(LoraConvLayer, nn.Conv2d):  # type: ignore[misc]
    """LoRA on nn.Conv2d; the base forward is nn.Conv2d's own."""


class LoraConv1d(LoraConvLayer, nn.Conv1d):  # type: ignore[misc]
    """LoRA on torch's nn.Conv1d (not GPT-2's Conv1D, which is a linear layer)."""


def conv_layer_class(
    module: nn.Module, module_name: str, config: LoraConfig
) -> type[LoraLayer] | None:
    """The LoRA layer class for a convolution ``module`` (None when it is not one), or a
    TargetError saying why LoRA cannot go on it."""
    layers: dict[type[nn.Module], type[LoraLayer]] = {nn.Conv2d: LoraConv2d, nn.Conv1d: LoraConv1d}
    cls = next((lay for base, lay in layers.items() if isinstance(module, base)), None)
    if cls is None:
        return None
    conv = cast(nn.Conv2d, module)
    kind = type(module).__name__
    why = None
    if conv.groups != 1 or any(d != 1 for d in conv.dilation):
        why = f"groups={conv.groups}, dilation={conv.dilation}; LoRA takes plain convolutions"
    elif conv.padding_mode != "zeros":
        why = f"padding_mode={conv.padding_mode!r}; LoRA's A pads with zeros"
    elif config.dora or config.init == "pissa":
        why = "DoRA and PiSSA adapt linear layers only; turn them off"
    if why:
        raise TargetError(f"LoRA cannot adapt {module_name} ({kind}): {why}, or leave it out")
    return cls
