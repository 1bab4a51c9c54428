"""LoRA's adapters and layers: the factors A, B (and DoRA's magnitude) of one adapter, the
variants (plain, DoRA) as hooks on init, forward and merge, and the layer types LoRA adapts.

A LoRA layer *is* the layer it adapts (``LoraLinear`` subclasses ``nn.Linear``) and keeps the
same ``weight``/``bias`` parameters, so base names and checkpoints are untouched. Adapters live
in ``<layer>.lora.<adapter name>`` with parameters ``A`` (r, in) and ``B`` (out, r); the
unmerged forward adds ``scaling * B(A(dropout(x)))`` and never builds the (out, in) matrix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from leantune.adapters.base import AdapterLayer, Change, Conv1D
from leantune.adapters.methods.lora.math import DropoutDown, full_precision, lora_l2, row_norm
from leantune.core.errors import LeantuneError

if TYPE_CHECKING:
    from leantune.adapters.methods.lora.config import LoraConfig


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


# ---------------------------------------------------------------------------- adapter + variants


class LoraAdapter(nn.Module):
    """One named LoRA adapter of one layer: A (r, in), B (out, r) and, for DoRA, a magnitude."""

    def __init__(
        self, in_features: int, out_features: int, r: int, alpha: float, config: LoraConfig
    ):
        super().__init__()
        self.r, self.alpha, self.init = r, float(alpha), config.init
        self.rslora = config.rslora
        self.scaling = lora_scaling(r, alpha, config.rslora)
        self.A = nn.Parameter(torch.empty(r, in_features))
        self.B = nn.Parameter(torch.empty(out_features, r))
        self.dropout: nn.Module = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.variant: LoraVariant = DORA if config.dora else PLAIN
        self.magnitude: nn.Parameter | None = None

    def set_rank(self, r: int) -> None:
        """Rank r with the same scaling (alpha follows, as saved files give alpha / r)."""
        self.r = r
        self.alpha = self.scaling * (math.sqrt(r) if self.rslora else r)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, shape (out, in). Only merging and saving build it."""
        return (self.B @ self.A) * self.scaling

    def initial_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """PiSSA's A0, B0 (kept as buffers)."""
        return cast(torch.Tensor, self.A0), cast(torch.Tensor, self.B0)

    def initial_delta(self) -> torch.Tensor:
        A0, B0 = self.initial_factors()
        return B0 @ A0

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, init={self.init}, variant={self.variant.name}"


class LoraVariant(Protocol):
    """Hooks a LoRA variant attaches to init, forward and merge; plain LoRA is one of them."""

    name: str

    def init(self, layer: LoraLayer, adapter: LoraAdapter) -> None: ...

    def forward(
        self, layer: LoraLayer, adapter: LoraAdapter, x: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor: ...

    def merge(self, layer: LoraLayer, adapter: LoraAdapter, name: str) -> None: ...

    def unmerge(self, layer: LoraLayer, adapter: LoraAdapter, name: str) -> None: ...


class PlainLora:
    name = "lora"

    def init(self, layer: LoraLayer, adapter: LoraAdapter) -> None:
        pass

    def forward(
        self, layer: LoraLayer, adapter: LoraAdapter, x: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        h = layer.lora_down(adapter, x)
        # out += s·h·Bᵀ in one in-place addmm: the base op does not keep its output for
        # backward, so no (tokens, out) temporary is made for the update. In-place ops are not
        # autocast, so h and B follow out's dtype (bf16 under autocast; a no-op otherwise).
        flat = out.view(-1, out.shape[-1])
        B = adapter.B.T.to(out.dtype)
        flat.addmm_(h.reshape(-1, h.shape[-1]).to(out.dtype), B, alpha=adapter.scaling)
        return out

    def merge(self, layer: LoraLayer, adapter: LoraAdapter, name: str) -> None:
        layer.weight_oi().add_(adapter.delta_weight().to(layer.weight.dtype))

    def unmerge(self, layer: LoraLayer, adapter: LoraAdapter, name: str) -> None:
        layer.weight_oi().sub_(adapter.delta_weight().to(layer.weight.dtype))


class Dora:
    """DoRA (Liu et al., 2024): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, the norm taken per output row and
    held constant in backward, as in the paper and peft."""

    name = "dora"

    def init(self, layer: LoraLayer, adapter: LoraAdapter) -> None:
        if not isinstance(layer, LoraLinear | LoraConv1D):
            raise LeantuneError(
                f"DoRA adapts Linear and Conv1D layers, not {layer._base_class.__name__}; "
                "leave embeddings out of the targets or turn dora off"
            )
        with torch.no_grad():
            norm = row_norm(layer.weight_oi().float(), adapter.A, adapter.B, adapter.scaling)
        adapter.magnitude = nn.Parameter(norm.to(layer.weight.dtype))

    def forward(
        self, layer: LoraLayer, adapter: LoraAdapter, x: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        assert adapter.magnitude is not None
        weight = layer.weight_oi()
        with torch.no_grad(), full_precision(weight):
            norm = row_norm(weight, adapter.A, adapter.B, adapter.scaling)
        scale = adapter.magnitude / norm
        if isinstance(adapter.dropout, nn.Identity) or not layer.training:
            base = out if layer.bias is None else out - layer.bias
        else:  # peft's choice: the magnitude rescales the dropped-out input's base path
            x = adapter.dropout(x)
            base = F.linear(x, weight)
        lora = layer.lora_path(adapter, x) * adapter.scaling
        return (out + (scale - 1) * base + scale * lora).to(out.dtype)  # a bf16 base: stay bf16

    def merge(self, layer: LoraLayer, adapter: LoraAdapter, name: str) -> None:
        assert adapter.magnitude is not None
        weight = layer.weight_oi()
        norm = row_norm(weight, adapter.A, adapter.B, adapter.scaling)
        layer._dora_norms[name] = norm
        merged = (weight + adapter.delta_weight()) * (adapter.magnitude / norm)[:, None]
        weight.copy_(merged)

    def unmerge(self, layer: LoraLayer, adapter: LoraAdapter, name: str) -> None:
        assert adapter.magnitude is not None
        norm = layer._dora_norms.pop(name)
        weight = layer.weight_oi()
        weight.copy_(weight * (norm / adapter.magnitude)[:, None] - adapter.delta_weight())


PLAIN: LoraVariant = PlainLora()
DORA: LoraVariant = Dora()


# ---------------------------------------------------------------------------- layers


class LoraLayer(AdapterLayer):
    """Base of a layer type adapted with LoRA. Subclasses also inherit the base layer type."""

    method: ClassVar[str] = "lora"
    store: ClassVar[str] = "lora"
    layer_state: ClassVar[tuple[str, ...]] = ("_dora_norms",)
    lora: nn.ModuleDict
    bias: nn.Parameter | None
    _dora_norms: dict[str, torch.Tensor]
    # Names of the tensors in peft's files, per adapter parameter.
    peft_keys: ClassVar[dict[str, str]] = {
        "A": "lora_A.weight",
        "B": "lora_B.weight",
        "magnitude": "lora_magnitude_vector",
    }

    def init_state(self) -> None:
        self._dora_norms = {}

    # Subclasses say how their weight is oriented (and may say how the base layer computes).
    def weight_oi(self) -> torch.Tensor:
        """The base weight as an (out, in) view, so updates through it land in the parameter."""
        return self.weight

    def dims(self) -> tuple[int, int]:
        out, inp = self.weight_oi().shape
        return inp, out

    def lora_path(self, adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        """B(A(x)) without scaling."""
        return F.linear(F.linear(x, adapter.A), adapter.B)

    def lora_down(self, adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        """A(dropout(x)), shape (..., r)."""
        if self.training and isinstance(adapter.dropout, nn.Dropout) and torch.is_grad_enabled():
            return DropoutDown.apply(x, adapter.A, adapter.dropout.p)
        return F.linear(adapter.dropout(x), adapter.A)

    def init_adapter(self, adapter: LoraAdapter) -> None:
        """Standard and gaussian inits; PiSSA is shared by all layer types."""
        if adapter.init == "gaussian":
            nn.init.normal_(adapter.A, std=1 / adapter.r)
        else:
            nn.init.kaiming_uniform_(adapter.A, a=math.sqrt(5))
        nn.init.zeros_(adapter.B)

    def new_adapter(
        self, inp: int, out: int, r: int, alpha: float, config: LoraConfig
    ) -> LoraAdapter:
        """A new adapter of this layer type, not yet initialized."""
        return LoraAdapter(inp, out, r, alpha, config)

    def adapter(self, name: str) -> LoraAdapter:
        return cast(LoraAdapter, self.lora[name])

    def add_adapter(self, name: str, r: int, alpha: float, config: LoraConfig) -> None:
        if name in self.lora:
            raise LeantuneError(f"adapter {name!r} is already on this layer")
        inp, out = self.dims()
        adapter = self.new_adapter(inp, out, r, alpha, config)
        adapter.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            if config.init == "pissa":
                if self.lora:
                    raise LeantuneError(
                        "PiSSA rewrites the base weight; it cannot share a layer with another adapter"
                    )
                self._pissa_init(adapter)
            else:
                self.init_adapter(adapter)
        adapter.variant.init(self, adapter)
        self.lora[name] = adapter

    def _pissa_init(self, adapter: LoraAdapter) -> None:
        weight = self.weight_oi()
        U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
        r, s = adapter.r, adapter.scaling
        root = (S[:r] / s).sqrt()
        adapter.A.copy_(root[:, None] * Vh[:r])
        adapter.B.copy_(U[:, :r] * root[None, :])
        # The initial factors are kept to save the adapter as a plain LoRA update of W.
        adapter.register_buffer("A0", adapter.A.detach().clone(), persistent=False)
        adapter.register_buffer("B0", adapter.B.detach().clone(), persistent=False)
        weight.sub_(adapter.delta_weight().to(weight.dtype))

    # --- AdapterLayer hooks

    def apply_adapter(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        adapter = self.adapter(name)
        return adapter.variant.forward(self, adapter, x, out)

    def merge_adapter(self, name: str) -> None:
        self.adapter(name).variant.merge(self, self.adapter(name), name)

    def unmerge_adapter(self, name: str) -> None:
        self.adapter(name).variant.unmerge(self, self.adapter(name), name)

    def drop_adapter(self, name: str) -> None:
        adapter = self.adapter(name)
        if adapter.init == "pissa":  # give the base layer its original weight back
            with torch.no_grad():
                self.weight_oi().add_(adapter.scaling * adapter.initial_delta())
        super().drop_adapter(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name`` as peft stores it, keyed relative to this layer."""
        adapter = self.adapter(name)
        tensors = {k: p.detach() for k, p in adapter.named_parameters()}
        if adapter.init == "pissa":
            # PiSSA trained W_res + s·B·A where W_res = W - s·B0·A0: the same as plain LoRA on W
            # with A' = [A; A0], B' = [B, -B0], so the file loads onto the original base model.
            A0, B0 = adapter.initial_factors()
            tensors["A"] = torch.cat([tensors["A"], A0])
            tensors["B"] = torch.cat([tensors["B"], -B0], dim=1)
        return {self.peft_keys[k]: t for k, t in tensors.items()}

    def file_targets(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s parameters by their peft keys (a loaded file is plain LoRA)."""
        params = dict(self.adapter(name).named_parameters())
        return {key: params[short] for short, key in self.peft_keys.items() if short in params}

    def file_entry(self, name: str) -> dict[str, Any]:
        return leantune_entry(self, name)

    loads_base_weights: ClassVar[bool] = True

    def change_entries(self, name: str) -> list[Change]:
        delta = self.adapter(name).delta_weight()  # (out, in); the weight may be stored (in, out)
        return [Change("weight", delta if self.weight_oi() is self.weight else delta.T)]

    def l2_change(self, name: str) -> torch.Tensor:
        a = self.adapter(name)
        return lora_l2(a.A, a.B, a.scaling)

    def lr_multipliers(self, name: str, options: Mapping[str, Any]) -> dict[str, float]:
        """LoRA+ (Hayou et al., 2024): B at ``loraplus_ratio`` times A's rate."""
        ratio = float(options.get("loraplus_ratio") or 1.0)
        return {} if ratio == 1 else {f"{self.store}.{name}.B": ratio}

    # --- RankAdaptable (train/adapt.py)

    def rank_factors(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        a = self.adapter(name)
        return a.A, a.B

    def rank_refusal(self, name: str) -> str | None:
        a = self.adapter(name)
        if a.init == "pissa" or a.magnitude is not None:
            return "--adapt works on plain LoRA, not PiSSA or DoRA"
        return None

    def grow_rank(self, name: str, r: int) -> None:
        """r − rank new components: rows of A drawn like LoRA's, columns of B zero."""
        a = self.adapter(name)
        A, B = a.A.detach(), a.B.detach()
        extra = torch.empty(r - a.r, A.shape[1], dtype=A.dtype, device=A.device)
        nn.init.kaiming_uniform_(extra, a=math.sqrt(5))
        a.A = nn.Parameter(torch.cat([A, extra]))
        a.B = nn.Parameter(torch.cat([B, B.new_zeros(B.shape[0], r - a.r)], dim=1))
        a.set_rank(r)

    def keep_ranks(self, name: str, keep: torch.Tensor) -> None:
        a = self.adapter(name)
        a.A = nn.Parameter(a.A.detach()[keep].clone(), requires_grad=a.A.requires_grad)
        a.B = nn.Parameter(a.B.detach()[:, keep].clone(), requires_grad=a.B.requires_grad)
        a.set_rank(int(keep.sum()))

    def saved_rank_alpha(self, name: str) -> tuple[int, float]:
        """Rank and alpha of the adapter as written to a file (PiSSA is saved at rank 2r)."""
        adapter = self.adapter(name)
        if adapter.init != "pissa":
            return adapter.r, adapter.alpha
        r = 2 * adapter.r
        return r, adapter.scaling * (math.sqrt(r) if adapter.rslora else r)


class LoraLinear(LoraLayer, nn.Linear):  # type: ignore[misc]
    """LoRA on nn.Linear; the base forward is nn.Linear's own."""


class LoraConv1D(LoraLayer, Conv1D if Conv1D is not None else nn.Module):  # type: ignore[misc]
    """GPT-2's Conv1D: a linear layer whose weight is stored (in, out)."""

    def base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        size_out = (*x.shape[:-1], self.weight.shape[1])
        flat = x.reshape(-1, x.shape[-1])
        out = (
            torch.addmm(self.bias, flat, self.weight)
            if self.bias is not None
            else flat @ self.weight
        )
        return out.view(size_out)

    def weight_oi(self) -> torch.Tensor:
        return self.weight.T


class LoraEmbedding(LoraLayer, nn.Embedding):  # type: ignore[misc]
    """LoRA on an embedding table (num, dim): A is (r, num), B is (dim, r)."""

    peft_keys: ClassVar[dict[str, str]] = {"A": "lora_embedding_A", "B": "lora_embedding_B"}

    def weight_oi(self) -> torch.Tensor:
        return self.weight.T

    def init_adapter(self, adapter: LoraAdapter) -> None:
        # peft's embedding init: A zero, B normal (the product is still zero).
        nn.init.zeros_(adapter.A)
        nn.init.normal_(adapter.B)

    def lora_down(self, adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        # Rows of Aᵀ for each id; ids take no dropout (as in peft).
        return F.embedding(
            x,
            adapter.A.T,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )

    def lora_path(self, adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        return self.lora_down(adapter, x) @ adapter.B.T


_LAYERS: dict[type[nn.Module], type[LoraLayer]] = {
    nn.Linear: LoraLinear,
    nn.Embedding: LoraEmbedding,
}
if Conv1D is not None:
    _LAYERS[Conv1D] = LoraConv1D


def layer_class_for(module: nn.Module) -> type[LoraLayer]:
    """The LoRA layer class for ``module``'s kind of layer (a subclass of nn.Linear is linear)."""
    cls = _LAYERS.get(type(module)) or next(
        (lay for base, lay in _LAYERS.items() if isinstance(module, base)), None
    )
    if cls is None:
        raise LeantuneError(f"LoRA cannot adapt {type(module).__name__}")
    return cls


def plain_number(x: float) -> float | int:
    """An int when ``x`` is whole (files say r: 8, alpha: 16 as peft writes them)."""
    return int(x) if float(x).is_integer() else float(x)


def leantune_entry(layer: LoraLayer, name: str) -> dict[str, Any]:
    """Adapter ``name`` of ``layer`` as a row of a ``LEANTUNE`` folder's ``modules`` table."""
    r, alpha = layer.saved_rank_alpha(name)
    adapter = layer.adapter(name)
    dropout = adapter.dropout.p if isinstance(adapter.dropout, nn.Dropout) else 0.0
    return {
        "method": "lora",
        "r": r,
        "alpha": plain_number(alpha),
        "dropout": dropout,
        "rslora": adapter.rslora,
        "dora": adapter.variant is DORA,
    }
