"""Prompt tuning (Lester et al., 2021): n trained embeddings prepended to the input embeddings.

Each call's input embeddings become ``[P; E(x)]`` with P (n, d) trained and the model frozen:
n·d parameters, and n more positions in every forward. The attention mask gets n ones in front,
causal-LM labels n ignored positions (-100) and token type ids n zeros, and the model's own
positions count the virtual tokens, as in peft (given ``position_ids`` are dropped, as peft
does). Outputs cover the virtual positions too: a causal LM's logits are (batch, n + length,
vocab). In ``generate()`` the prompt goes in once, with the first call, and stays in the cache.

P starts as N(0, 1) rows ("RANDOM", as peft) or as the embedding rows of a text's tokens
("TEXT"), repeated or cut to n. Rates are high: ``default_lr`` is 3e-2 (Lester et al. used 0.3
with Adafactor). Saved in peft's ``PROMPT_TUNING`` format (``prompt_embeddings``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from leantune.adapters.config import AdapterRecord
from leantune.adapters.methods.virtual import (
    Tokens,
    VirtualConfig,
    VirtualFormat,
    VirtualLayer,
    cached_length,
    extend_mask,
)
from leantune.core.errors import LeantuneError

INITS = ("RANDOM", "TEXT")


class PromptLayer(VirtualLayer):
    method: ClassVar[str] = "prompt"
    store: ClassVar[str] = "prompt"
    prompt: nn.ModuleDict

    def add_adapter(self, name: str, config: VirtualConfig, model: nn.Module) -> None:
        assert isinstance(config, PromptConfig)
        n, weight = config.num_virtual_tokens, self.weight
        if config.init == "TEXT":
            rows = weight.detach()[text_ids(config, weight.shape[0])].clone()
        else:
            rows = torch.randn(n, weight.shape[1], device=weight.device).to(weight.dtype)
        self.prompt[name] = Tokens(rows)

    def rewrite(self, model: nn.Module, kwargs: dict[str, Any], rows: list[str]) -> dict[str, Any]:
        n = self.count(rows[0])
        kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), n)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = None  # the model counts the virtual tokens itself
        if cached_length(kwargs):
            return kwargs  # decoding: the prompt went in with the first call
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        embeds = self(ids) if embeds is None else embeds
        batch, length = embeds.shape[:2]
        kwargs["inputs_embeds"] = torch.cat([self.stacked(rows, embeds.dtype), embeds], dim=1)
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and tuple(labels.shape[:2]) == (batch, length):
            kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        types = kwargs.get("token_type_ids")
        if isinstance(types, torch.Tensor):
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], dim=1)
        return kwargs


@dataclass
class PromptConfig(VirtualConfig):
    """Prompt tuning: n trained embeddings before every input."""

    method: ClassVar[str] = "prompt"
    title: ClassVar[str] = "prompt tuning"
    layer_class: ClassVar[type[VirtualLayer]] = PromptLayer
    needs: ClassVar[tuple[str, ...]] = ("inputs_embeds",)
    default_lr: ClassVar[float] = 3e-2

    init: str = "RANDOM"
    """"RANDOM" (N(0, 1) rows, as peft) or "TEXT" (the embedding rows of ``init_text``)."""
    init_text: str | None = None
    """The text whose tokens' embeddings start the prompt, repeated or cut to n (init "TEXT")."""
    tokenizer: str | None = None
    """The tokenizer (a path or name ``AutoTokenizer`` loads) that splits ``init_text``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in INITS:
            raise LeantuneError(f"prompt tuning init {self.init!r} is unknown; use RANDOM or TEXT")
        if self.init == "TEXT" and not (self.init_text and self.tokenizer):
            raise LeantuneError(
                "prompt tuning init TEXT needs init_text and tokenizer (the model's tokenizer)"
            )


def text_ids(config: PromptConfig, vocab: int) -> torch.Tensor:
    """The token ids of ``config.init_text``, repeated or cut to n (peft's rule)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
    except (OSError, ValueError) as e:
        raise LeantuneError(
            f"prompt tuning init TEXT: cannot load tokenizer {config.tokenizer!r} ({e}); give "
            "the model's folder"
        ) from None
    ids = list(tokenizer(config.init_text)["input_ids"])
    n = config.num_virtual_tokens
    if not ids or max(ids) >= vocab:
        raise LeantuneError(
            f"prompt tuning init TEXT: {config.init_text!r} gives token ids {ids[:8]} that do "
            f"not fit the model's {vocab} embedding rows; use the model's own tokenizer"
        )
    return torch.tensor((ids * math.ceil(n / len(ids)))[:n])


class PromptFormat(VirtualFormat):
    """peft's ``PROMPT_TUNING`` format, as ``register`` takes it."""

    peft_type = "PROMPT_TUNING"
    config_class: ClassVar[type[VirtualConfig]] = PromptConfig

    def write(
        self, rec: AdapterRecord, name: str, layers: list[tuple[str, Any]], base: str | None
    ) -> dict[str, Any]:
        config, layer = rec.config, layers[0][1]
        assert isinstance(config, PromptConfig) and isinstance(layer, PromptLayer)
        return {
            **self.fields(rec, layer, name, base),
            "token_dim": layer.weight.shape[1],
            "num_attention_heads": None,  # peft fills these from the model's config
            "num_layers": None,
            "prompt_tuning_init": config.init,
            "prompt_tuning_init_text": config.init_text,
            "tokenizer_name_or_path": config.tokenizer,
            "tokenizer_kwargs": None,
        }

    def read(self, raw: Mapping[str, Any]) -> PromptConfig:
        # The file holds the trained rows: however they started, a load starts them anywhere.
        return PromptConfig(**self.common(raw))


PROMPT_FORMAT = PromptFormat()
