"""Precision and memory: autocast (bf16/fp16) with fp32 adapters and optimizer state, fp16's loss
scaling, a frozen base held in bf16/fp16, activation checkpointing, and a frozen base quantized
to int8 or nf4 under LoRA (QLoRA-style).

- ``autocast(precision, device)``: matmuls in bf16/fp16, everything torch keeps in fp32 (losses,
  softmax, norms) stays there. Trainable parameters and AdamW's moments stay fp32: the adapter
  layers cast their contribution to the base output's dtype, so gradients arrive in fp32.
- ``LossScaler``: fp16 has 5 exponent bits, small gradients underflow; the loss is multiplied
  by a scale that halves on overflow (the step is skipped) and doubles after 2000 clean steps.
  A skipped step is normal scaler behaviour, not divergence; ``MAX_SKIPS`` in a row is.
- ``cast_base``: the frozen base in bf16/fp16 halves its bytes. It needs autocast while it
  runs: the adapter layers compute ``x @ Aᵀ`` with x in the base dtype and A in fp32.
- ``enable_checkpointing``: transformers' activation checkpointing, non-reentrant: gradients
  reach adapters with frozen inputs, and backward still stops at the lowest trainable layer.
- ``quantize_base``: the frozen ``nn.Linear`` layers become ``QuantizedLinear`` (an
  ``nn.Linear`` subclass, so LoRA adopts it) over a torchao weight: int8 weight-only per output
  row, or nf4 in blocks of 64 as in QLoRA. Its forward dequantizes one layer at a time and its
  backward keeps the packed weight, not a float copy. Runs on CPU and CUDA (torchao).

Measured (SmolLM2-135M, LoRA r=8 on every linear layer; torch 2.13 CPU): frozen base 538 MB in
fp32, 269 MB in bf16, 220 MB int8, 168 MB nf4 (the tied 113 MB embedding stays as it is).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leantune.core.errors import LeantuneError

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZE_KINDS = ("int8", "nf4")
MAX_SKIPS = 20
"""fp16 steps skipped in a row (overflowing gradients) that count as divergence: the scale has
then fallen from 65536 to below 0.1, so the gradients are not finite even unscaled."""
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256

MERGE_REFUSAL = (
    "the base model is quantized ({kind}): merging would round the adapter away into the "
    "quantized weights. Dequantize, merge, save: load the base model without --quantize "
    "(fp32 or bf16), load the adapter onto it, merge and save that"
)
"""Refusal of a merge into a quantized base; ``.format(kind=quantized_kind(model))``."""


def dtype_of(precision: str) -> torch.dtype:
    """torch dtype of ``fp32``, ``bf16`` or ``fp16``."""
    if precision not in DTYPES:
        raise LeantuneError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return DTYPES[precision]


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def check_precision(precision: str, device: torch.device | str) -> None:
    """Refuse a precision the device cannot autocast to, naming the one to use instead."""
    dtype = dtype_of(precision)
    if dtype == torch.float32:
        return
    kind = _device_type(device)
    if kind == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise LeantuneError("this GPU has no bf16; use --precision fp16 (with loss scaling)")
    try:
        with torch.autocast(kind, dtype=dtype):
            x = torch.ones(2, 2, device=device)
            F.linear(x, x)
    except (RuntimeError, ValueError) as e:
        other = "bf16" if precision == "fp16" else "fp32"
        raise LeantuneError(
            f"torch {torch.__version__} cannot autocast to {precision} on {kind} ({e}); use "
            f"--precision {other}"
        ) from None


def fast_bf16(device_spec: str) -> bool:
    """Whether the device a run will use (``--device`` spec; auto: CUDA when present) computes
    bf16 natively: a GPU with bf16, or a CPU with AVX512-BF16 / AMX (oneDNN's bf16)."""
    cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if cuda:
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@contextmanager
def autocast(precision: str, device: torch.device | str) -> Iterator[None]:
    """Run the block under autocast to ``precision`` (fp32: no autocast). Wrap evaluation in
    it to evaluate as the run trains."""
    dtype = dtype_of(precision)
    kind = _device_type(device)
    context: Any = nullcontext() if dtype == torch.float32 else torch.autocast(kind, dtype=dtype)
    with context:
        yield


class LossScaler:
    """fp16's dynamic loss scaling around one optimizer; does nothing for fp32 and bf16."""

    def __init__(self, precision: str, device: torch.device | str) -> None:
        self.enabled = precision == "fp16"
        self.amp = torch.amp.GradScaler(_device_type(device), enabled=self.enabled)
        self.skips = 0
        """Optimizer steps skipped in a row."""
        self.skipped = 0
        """Optimizer steps skipped in all (in this process)."""

    def backward(self, loss: torch.Tensor) -> None:
        self.amp.scale(loss).backward()

    def unscale(self, opt: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale (before clipping or reading them)."""
        if self.enabled:
            self.amp.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer) -> bool:
        """Step unless the gradients overflowed; update the scale. True when the step ran."""
        if not self.enabled:
            opt.step()
            return True
        before = self.amp.get_scale()
        self.amp.step(opt)
        self.amp.update()
        skipped = self.amp.get_scale() < before
        self.skips = self.skips + 1 if skipped else 0
        self.skipped += skipped
        return not skipped

    @property
    def scale(self) -> float:
        return float(self.amp.get_scale()) if self.enabled else 1.0

    def overflow(self) -> str:
        """What went wrong when ``skips`` reached MAX_SKIPS."""
        return (
            f"fp16 gradients overflowed {self.skips} steps in a row (loss scale now "
            f"{self.scale:g}); try --precision bf16"
        )

    def state_dict(self) -> dict[str, Any]:
        return dict(self.amp.state_dict()) | {"skips": self.skips} if self.enabled else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.enabled and state:
            state = dict(state)
            self.skips = int(state.pop("skips", 0))
            self.amp.load_state_dict(state)


# ---------------------------------------------------------------------------- the frozen base


def is_quantized_tensor(t: torch.Tensor) -> bool:
    """A tensor subclass holding packed values (torchao), or an integer weight (bitsandbytes)."""
    return hasattr(t, "__tensor_flatten__") or not (t.is_floating_point() or t.dtype == torch.bool)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a quantized one counts its packed data and scales."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def check_base_dtype(dtype: torch.dtype, device: torch.device | str) -> None:
    """Refuse a base dtype whose matmuls the device lacks (the base is cast before a run)."""
    try:
        x = torch.ones(2, 2, device=device, dtype=dtype)
        F.linear(x, x)
    except (RuntimeError, ValueError) as e:
        raise LeantuneError(
            f"torch {torch.__version__} has no {dtype} matmul on {_device_type(device)} ({e}); "
            "use --base-dtype bf16 or fp32"
        ) from None


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing (non-reentrant) on a transformers model: each layer's
    activations are recomputed in backward instead of kept. Gradients reach adapters with
    frozen embeddings; the input-grad hook transformers adds for reentrant checkpointing is
    taken off again, so backward still stops at the lowest trainable layer."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    old = getattr(model, "gradient_checkpointing_enable", None)
    if not getattr(model, "supports_gradient_checkpointing", False) or (enable or old) is None:
        raise LeantuneError(
            f"{type(model).__name__} does not support gradient checkpointing (it needs a "
            "transformers model that does); leave --gradient-checkpointing off"
        )
    kwargs = {"use_reentrant": False}
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        assert old is not None
        old(gradient_checkpointing_kwargs=kwargs)
    disable = getattr(model, "disable_input_require_grads", None)
    if disable is not None and hasattr(model, "_require_grads_hook"):
        disable()


def _dequantized(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not hasattr(weight, "__tensor_flatten__"):  # dequantized already (dequantize_base)
        return weight.to(dtype)
    unpack = getattr(weight, "get_original_weight", None) or weight.dequantize
    return unpack().to(dtype)


class _FrozenQuantLinear(torch.autograd.Function):
    """x·Wᵀ + b over a frozen quantized W that keeps only the packed W for backward: plain
    ``F.linear`` on a torchao weight would save its dequantized fp32 copy, layer by layer."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Any) -> torch.Tensor:
        kind = x.device.type
        auto = torch.is_autocast_enabled(kind)
        dtype = torch.get_autocast_dtype(kind) if auto else x.dtype
        ctx.weight, ctx.dtype, ctx.x_dtype = weight, dtype, x.dtype
        b = None if bias is None else bias.to(dtype)
        return F.linear(x.to(dtype), _dequantized(weight, dtype), b)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        w = _dequantized(ctx.weight, ctx.dtype)
        return (grad.to(ctx.dtype) @ w).to(ctx.x_dtype), None, None


class QuantizedLinear(nn.Linear):
    """``nn.Linear`` over a frozen quantized weight (a torchao tensor: reports the float dtype
    and shape). LoRA adopts it as any linear layer and calls this forward for the base."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 2-D inside the Function: its output must not be a view (LoRA adds to it in place).
        out = _FrozenQuantLinear.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return out.view(*x.shape[:-1], out.shape[-1])


def _swap(model: nn.Module, name: str, layer: nn.Linear, weight: torch.Tensor) -> None:
    new = QuantizedLinear(
        layer.in_features, layer.out_features, layer.bias is not None, device="meta"
    )
    new.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        new.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _nf4_scaler_block(numel: int) -> int | None:
    """Blocks per scale group: 256 as in QLoRA, fewer where the block count needs it."""
    if numel % NF4_BLOCK:
        return None
    blocks = numel // NF4_BLOCK
    return next((s for s in (NF4_SCALER_BLOCK, 128, 64, 32) if blocks % s == 0), None)


def _quiet_torchao() -> None:
    # torchao logs failing CUDA kernels (.so) at import and torch its pytree registrations.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _quantizable(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    from leantune.models.loading import HEAD_NAMES

    # An adapter layer (leantune.adapters.base.AdapterModule) lists its adapters.
    if any(callable(getattr(m, "adapter_names", None)) for m in model.modules()):
        raise LeantuneError("quantize the base before injecting adapters (LoRA goes on top)")
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and m is not out
        and not is_quantized_tensor(m.weight)
        and not set(name.split(".")) & (HEAD_NAMES | set(skip))
    ]


def quantize_base(model: nn.Module, kind: str, skip: Sequence[str] = ()) -> list[str]:
    """Quantize the frozen ``nn.Linear`` weights of the base in place: ``int8`` (weight-only,
    per output row) or ``nf4`` (4-bit NormalFloat, blocks of 64); quantized weights are frozen.
    Heads, the output embedding and modules with a name part in ``skip`` (those trained in
    full: ``modules_to_save``) stay as they are; so do nf4 layers whose size is not a multiple
    of 64·32. Inject LoRA afterwards. Returns the names of the quantized layers."""
    if kind not in QUANTIZE_KINDS:
        raise LeantuneError(f"quantize must be one of {', '.join(QUANTIZE_KINDS)}, not {kind!r}")
    _quiet_torchao()
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError as e:
        raise LeantuneError(f"--quantize needs torchao ({e}); pip install torchao") from None
    done = []
    for name, layer in _quantizable(model, skip):
        if kind == "int8":
            plain = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
            plain.weight = nn.Parameter(layer.weight.detach(), requires_grad=False)
            quantize_(plain, Int8WeightOnlyConfig())
            weight = plain.weight
        elif scaler_block := _nf4_scaler_block(layer.weight.numel()):
            weight = to_nf4(layer.weight.detach(), NF4_BLOCK, scaler_block)
        else:
            continue
        _swap(model, name, layer, weight)
        done.append(name)
    return done


def quantized_kind(model: nn.Module) -> str | None:
    """``int8``/``nf4``/the tensor type of the first quantized weight, or None."""
    for p in model.parameters():
        if is_quantized_tensor(p):
            name = type(p).__name__
            return "nf4" if "NF4" in name else "int8" if "Int8" in name else name
    return None


def is_quantized(model: nn.Module) -> bool:
    """Whether any parameter is quantized (merging into the model must then be refused)."""
    return quantized_kind(model) is not None


def dequantize_base(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace each quantized weight by its dequantized values in ``dtype`` (the way out
    before a merge). Returns the number of weights dequantized."""
    n = 0
    for module in model.modules():
        for key, p in list(module.named_parameters(recurse=False)):
            if hasattr(p, "__tensor_flatten__"):
                plain = nn.Parameter(_dequantized(p, dtype), requires_grad=p.requires_grad)
                setattr(module, key, plain)
                n += 1
    return n
