"""Prefix tuning (Li & Liang, 2021): n trained keys and values before every layer's own.

Each attention layer attends over ``[K_p; K]`` and ``[V_p; V]``, with the prefix keys and values
(n per layer and key/value head) trained and the model frozen. They reach the layers the way
past tokens do: through the model's cache (a ``transformers`` ``DynamicCache``, filled with the
prefix when a call brings no filled cache), so it needs a model whose forward takes one (causal
LMs; BERT's sequence classifier takes none, and peft refuses it too). The attention mask gets n
ones in front and given ``position_ids`` move by n, as in peft; the outputs keep their length.

The prefix is one tensor (n, layers·2·heads·head size), laid out as peft's. With
``prefix_projection`` it is made during training by an MLP (Li & Liang's reparametrization:
embedding (n, d) → Linear(d, h) → tanh → Linear(h, width)), which stabilizes training; a saved
adapter holds the prefix it makes, as peft's do, and loads as a plain prefix. Saved in peft's
``PREFIX_TUNING`` format (``prompt_embeddings``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from leantune.adapters.config import AdapterRecord
from leantune.adapters.methods.virtual import (
    Tokens,
    VirtualConfig,
    VirtualFormat,
    VirtualLayer,
    extend_mask,
)
from leantune.core import checks
from leantune.core.errors import LeantuneError, TargetError

CACHE_ARGS = ("cache", "past_key_values")
"""The forward argument that takes the cache: transformers 5's name, then 4's."""


class KVShape(NamedTuple):
    """Where a prefix goes: layers, key/value heads per layer, head size."""

    layers: int
    heads: int
    head_dim: int

    @property
    def width(self) -> int:
        """Values per virtual token: a key and a value per layer and head."""
        return self.layers * 2 * self.heads * self.head_dim


def kv_shape(model: nn.Module) -> KVShape:
    """The cache's shape per token, read from the model's config as peft reads it (grouped
    query attention: the key/value heads)."""
    config = getattr(model, "config", None)

    def get(*names: str) -> Any:
        return next((getattr(config, n) for n in names if getattr(config, n, None)), None)

    layers = get("num_hidden_layers", "num_layers", "n_layer")
    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head", "num_heads")
    if not (layers and hidden and heads):
        raise TargetError(
            f"prefix tuning needs the layer count, hidden size and heads of "
            f"{type(model).__name__}, which it has no transformers config to give"
        )
    head_dim = get("head_dim") or hidden // heads
    return KVShape(int(layers), int(get("num_key_value_heads") or heads), int(head_dim))


class Prefix(nn.Module):
    """The prefix made by Li & Liang's MLP from n trained embeddings."""

    def __init__(self, n: int, dim: int, hidden: int, width: int, like: torch.Tensor):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(n, dim).to(like))
        self.transform = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        self.transform.to(like)

    @property
    def n(self) -> int:
        return self.embedding.shape[0]

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding)


class PrefixLayer(VirtualLayer):
    method: ClassVar[str] = "prefix"
    store: ClassVar[str] = "prefix"
    layer_state: ClassVar[tuple[str, ...]] = (*VirtualLayer.layer_state, "_kv")
    prefix: nn.ModuleDict
    _kv: KVShape

    def add_adapter(self, name: str, config: VirtualConfig, model: nn.Module) -> None:
        assert isinstance(config, PrefixConfig)
        self._kv = shape = kv_shape(model)
        n, dim = config.num_virtual_tokens, shape.heads * shape.head_dim
        if config.prefix_projection:
            hidden = config.encoder_hidden_size or dim
            self.prefix[name] = Prefix(n, dim, hidden, shape.width, self.weight)
        else:
            self.prefix[name] = Tokens(torch.randn(n, shape.width).to(self.weight))

    def rewrite(self, model: nn.Module, kwargs: dict[str, Any], rows: list[str]) -> dict[str, Any]:
        n = self.count(rows[0])
        key = next(a for a in CACHE_ARGS if a in self._model_params)
        cache = kwargs.pop("past_key_values", None) if key != "past_key_values" else None
        cache = kwargs.get(key) if cache is None else cache
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=getattr(model, "config", None))
        if not cache.get_seq_length():  # a new sequence: the prefix goes in first
            self.fill(cache, self.stacked(rows, self.weight.dtype))
        kwargs[key] = cache
        kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), n)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n
        return kwargs

    def fill(self, cache: Any, prefix: torch.Tensor) -> None:
        """Put ``prefix`` (batch, n, width) in ``cache``, layer by layer, as peft lays it out."""
        batch, n = prefix.shape[:2]
        kv = self._kv
        per = prefix.view(batch, n, kv.layers * 2, kv.heads, kv.head_dim).permute(2, 0, 3, 1, 4)
        for i in range(kv.layers):
            cache.update(per[2 * i], per[2 * i + 1], i)


@dataclass
class PrefixConfig(VirtualConfig):
    """Prefix tuning: n trained keys and values before every attention layer's own."""

    method: ClassVar[str] = "prefix"
    title: ClassVar[str] = "prefix tuning"
    layer_class: ClassVar[type[VirtualLayer]] = PrefixLayer
    needs: ClassVar[tuple[str, ...]] = CACHE_ARGS
    default_lr: ClassVar[float] = 1e-2

    prefix_projection: bool = False
    """Make the prefix with an MLP during training (Li & Liang's reparametrization)."""
    encoder_hidden_size: int | None = None
    """The MLP's hidden size; None: the key/value size of a layer (peft's default)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        h = self.encoder_hidden_size
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h <= 0):
            raise LeantuneError(f"encoder_hidden_size must be a positive integer, got {h!r}")

    def model_refusal(self, model: nn.Module) -> str:
        return (
            f"prefix tuning passes its keys and values through the model's cache, and "
            f"{type(model).__name__}.forward takes none (no cache or past_key_values); use "
            "prompt tuning (--method prompt) for it"
        )

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> PrefixConfig:
        n = options.get("num_virtual_tokens")
        projection = bool(options.get("prefix_projection", False))
        if n is None:
            return cls(prefix_projection=projection)
        return cls(num_virtual_tokens=n, prefix_projection=projection)


class PrefixFormat(VirtualFormat):
    """peft's ``PREFIX_TUNING`` format, as ``register`` takes it."""

    peft_type = "PREFIX_TUNING"
    config_class: ClassVar[type[VirtualConfig]] = PrefixConfig

    def write(
        self, rec: AdapterRecord, name: str, layers: list[tuple[str, Any]], base: str | None
    ) -> dict[str, Any]:
        layer = layers[0][1]
        assert isinstance(layer, PrefixLayer)
        kv = layer._kv
        return {
            **self.fields(rec, layer, name, base),
            "token_dim": kv.heads * kv.head_dim,
            "num_attention_heads": kv.heads,
            "num_layers": kv.layers,
            # The file holds the prefix itself (an MLP's output is saved, not the MLP).
            "prefix_projection": False,
            "encoder_hidden_size": kv.heads * kv.head_dim,
            "init_weights": None,
        }

    def read(self, raw: Mapping[str, Any]) -> PrefixConfig:
        checks.flag("prefix_projection", raw.get("prefix_projection"))
        return PrefixConfig(**self.common(raw))  # a plain prefix: files hold the prefix itself


PREFIX_FORMAT = PrefixFormat()
