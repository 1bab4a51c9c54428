"""What prompt tuning and prefix tuning share: n trained virtual tokens the model reads before
its own input, in peft's ``PROMPT_TUNING`` / ``PREFIX_TUNING`` formats.

Neither method changes what a layer computes. An adapter's tensors live on the model's input
embedding (a ``VirtualLayer`` adopting it), so they are saved, loaded, switched and disabled
like any adapter's; ``attach`` adds them there and hooks the whole model's forward (a pre-hook,
removed by ``unwrap``) that rewrites each call's inputs: prompt tuning prepends its embeddings
to the input embeddings, prefix tuning puts its keys and values in the model's cache. Both
extend a 2-D ``attention_mask`` by n ones, as peft does. Each row of a mixed batch may name
another adapter of the same method and n; rows without one cannot go in the same batch (their
sequences would be n shorter). Not mergeable: the tokens are inputs, not a change of weights.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from leantune.adapters.base import AdapterLayer, Change
from leantune.adapters.config import AdapterConfig, AdapterRecord
from leantune.adapters.targets import match_targets
from leantune.core import checks
from leantune.core.errors import AdapterFileError, LeantuneError, TargetError
from leantune.models.loading import max_positions

FILE_KEY = "prompt_embeddings"
"""The one tensor of peft's prompt-learning files: the virtual tokens (n, width)."""
_MODEL_KEYS, _PEFT_KEYS = "base_model.model.", "base_model."
"""How leantune keys a head's tensors, and how peft's prompt-learning files do."""

INPUT_EMBEDDINGS = ["word_embeddings", "embed_tokens", "wte", "embed_in", "tok_embeddings"]
"""Names the input embedding goes by (BERT, Llama, GPT-2, GPT-NeoX, Mistral-style)."""


class Tokens(nn.Module):
    """n trained vectors (the rows of ``weight``)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    def forward(self) -> torch.Tensor:
        return self.weight


def extend_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A 2-D attention mask with n ones in front (the virtual tokens are always seen)."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise LeantuneError(
            f"virtual tokens extend a 2-D attention_mask, got {mask.dim()}-D; pass the "
            "(batch, length) mask and let the model build its own"
        )
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def cached_length(kwargs: Mapping[str, Any]) -> int:
    """How many positions the call's cache (``cache`` or ``past_key_values``) holds."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return 0 if cache is None else int(cache.get_seq_length())


class VirtualLayer(AdapterLayer):
    """The model's input embedding, holding the virtual tokens of named adapters."""

    layer_state: ClassVar[tuple[str, ...]] = ("_model_hook", "_model_params")
    _model_hook: RemovableHandle | None
    _model_params: tuple[str, ...]

    # --- what a method defines

    def add_adapter(self, name: str, config: VirtualConfig, model: nn.Module) -> None:
        """Add adapter ``name``'s virtual tokens, as ``config`` says, for ``model``."""
        raise NotImplementedError

    def rewrite(self, model: nn.Module, kwargs: dict[str, Any], rows: list[str]) -> dict[str, Any]:
        """The call's keyword arguments with row i reading adapter ``rows[i]``'s tokens."""
        raise NotImplementedError

    def tokens(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s virtual tokens (n, width), as the forward uses and files keep them."""
        return self.adapter_store()[name]()

    def count(self, name: str) -> int:
        """n, adapter ``name``'s number of virtual tokens."""
        return cast(Tokens, self.adapter_store()[name]).n  # or Prefix.n: both say n

    # --- AdapterLayer hooks

    def init_state(self) -> None:
        self._model_hook, self._model_params = None, ()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base_forward(x, *args, **kwargs)  # the tokens enter through the model's inputs

    def merge_adapter(self, name: str) -> None:
        raise LeantuneError(not_mergeable(self.method))

    def drop_adapter(self, name: str) -> None:
        store = self.adapter_store()
        if name in store:  # attach may have failed before adding it
            del store[name]

    def change_entries(self, name: str) -> list[Change]:
        return []  # no base parameter changes (penalty_refusal says so)

    def l2_change(self, name: str) -> torch.Tensor:
        return self.weight.new_zeros(())

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {FILE_KEY: self.tokens(name).detach()}

    def file_targets(self, name: str) -> dict[str, torch.Tensor]:
        weight = getattr(self.adapter_store()[name], "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise AdapterFileError(
                f"adapter {name!r} makes its {self.method} tokens with an MLP, which a file "
                "cannot fill; load the file as a new adapter (files hold the tokens themselves)"
            )
        return {FILE_KEY: weight}

    def unwrap(self) -> nn.Module:
        if self._model_hook is not None:
            self._model_hook.remove()
        return super().unwrap()

    # --- the model's forward

    def hook(self, model: nn.Module) -> None:
        """Rewrite ``model``'s inputs on each call (once, however many adapters)."""
        if self._model_hook is None:
            self._model_params = tuple(inspect.signature(model.forward).parameters)
            self._model_hook = model.register_forward_pre_hook(self._on_call, with_kwargs=True)

    def row_names(self, batch: int) -> list[str] | None:
        """The adapter each row of a batch reads, or None when no adapter applies."""
        store = self.adapter_store()
        names = self._batch_names
        if names is None:
            active = self._active
            if self._disabled or active is None or active not in store:
                return None
            return [active] * batch
        ours = [n for n in names if n in store]
        if not ours:
            return None
        sizes = {self.count(n) for n in set(ours)}
        if len(ours) != len(names) or len(names) != batch or len(sizes) > 1:
            raise LeantuneError(
                f"a mixed batch gives every row {self.method} tokens of one length or none, "
                f"since they lengthen the rows; got {names}. Run those groups apart"
            )
        return ours

    def stacked(self, rows: list[str], dtype: torch.dtype) -> torch.Tensor:
        """(batch, n, width): row i holds adapter ``rows[i]``'s tokens."""
        one = {n: self.tokens(n).to(dtype) for n in dict.fromkeys(rows)}
        if len(one) == 1:
            return next(iter(one.values())).unsqueeze(0).repeat(len(rows), 1, 1)  # as peft
        return torch.stack([one[n] for n in rows])

    def _on_call(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        named = {**dict(zip(self._model_params, args, strict=False)), **kwargs}
        first = named.get("input_ids")
        first = named.get("inputs_embeds") if first is None else first
        if not isinstance(first, torch.Tensor):
            return None
        rows = self.row_names(first.shape[0])
        if rows is None:
            return None
        n, length, limit = self.count(rows[0]), first.shape[1], max_positions(model)
        if limit is not None and n + length > limit and not cached_length(named):
            raise LeantuneError(
                f"{n} virtual tokens of {self.method} and {length} input tokens need {n + length} "
                f"positions, and the model has {limit}: truncate inputs to {limit - n} tokens, "
                "or use fewer virtual tokens"
            )
        return (), self.rewrite(model, named, rows)


def not_mergeable(method: str) -> str:
    return (
        f"{method} is not mergeable: its virtual tokens are inputs, not a change of weights; "
        "keep the adapter, or unload() it"
    )


@dataclass
class VirtualConfig(AdapterConfig):
    """What prompt and prefix tuning configs share: n virtual tokens on the input embedding."""

    layer_class: ClassVar[type[VirtualLayer]]
    needs: ClassVar[tuple[str, ...]] = ()
    """Arguments the model's forward must take (one of them, for a tuple of alternatives)."""

    targets: str | list[str] = field(default_factory=lambda: list(INPUT_EMBEDDINGS))
    """The model's input embedding (leave as is unless the model names it otherwise)."""
    num_virtual_tokens: int = 20
    """n, the number of virtual tokens."""

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise LeantuneError(f"num_virtual_tokens must be a positive integer, got {n!r}")

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return (nn.Embedding,)

    def adapt(self, module: nn.Module, adapter_name: str, module_name: str) -> nn.Module:
        return self.layer_class.wrap(module, module_name)  # attach adds the tokens

    def attach(self, model: nn.Module, adapter_name: str, modules: list[str]) -> None:
        get = getattr(model, "get_input_embeddings", None)
        embedding = get() if callable(get) else None
        if len(modules) != 1 or embedding not in (None, model.get_submodule(modules[0])):
            where = [n for n, m in model.named_modules() if m is embedding]
            raise TargetError(
                f"{self.method} goes on the model's input embedding ({', '.join(where)}), but "
                f"the targets match {modules}; give targets=[that name]"
            )
        params = inspect.signature(model.forward).parameters
        if self.needs and not any(p in params for p in self.needs):
            raise TargetError(self.model_refusal(model))
        layer = model.get_submodule(modules[0])
        assert isinstance(layer, VirtualLayer)
        layer.add_adapter(adapter_name, self, model)
        layer.hook(model)

    def model_refusal(self, model: nn.Module) -> str:
        """Why ``model`` cannot take this method (its forward lacks ``needs``)."""
        return (
            f"{self.method} feeds the model {' or '.join(self.needs)}, which "
            f"{type(model).__name__}.forward does not take"
        )

    def penalty_refusal(self) -> str | None:
        return (
            f"{self.method} trains virtual tokens, not a change of the model's weights: "
            "--l1, --l2 and --ewc do not apply to it; run without them"
        )

    def merge_refusal(self) -> str | None:
        return not_mergeable(self.method)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> VirtualConfig:
        n = options.get("num_virtual_tokens")
        return cls() if n is None else cls(num_virtual_tokens=n)


class VirtualFormat:
    """What peft's two prompt-learning formats share: keys, common fields, reading them."""

    peft_type: str
    config_class: ClassVar[type[VirtualConfig]]

    def keys_to_file(
        self, model: nn.Module, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {
            FILE_KEY if k.endswith("." + FILE_KEY) else _PEFT_KEYS + k.removeprefix(_MODEL_KEYS): t
            for k, t in tensors.items()
        }

    def keys_from_file(
        self, model: nn.Module, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        (embedding,) = match_targets(model, self.config_class())
        return {
            f"{_MODEL_KEYS}{embedding}.{k}"
            if k == FILE_KEY
            else _MODEL_KEYS + k.removeprefix(_PEFT_KEYS): t
            for k, t in tensors.items()
        }

    def fields(
        self, rec: AdapterRecord, layer: VirtualLayer, name: str, base: str | None
    ) -> dict[str, Any]:
        """The fields both formats' adapter_config.json have."""
        assert isinstance(rec.config, VirtualConfig)
        return {
            "peft_type": self.peft_type,
            "task_type": rec.task_type,
            "base_model_name_or_path": base,
            "num_virtual_tokens": layer.count(name),
            "num_transformer_submodules": 1,
            "modules_to_save": rec.modules_to_save or None,
            "inference_mode": True,
            "revision": None,
        }

    def common(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The config fields read from both formats (an adapter of one decoder stack)."""
        if raw.get("num_transformer_submodules") not in (None, 1):
            raise AdapterFileError(
                f"adapter config num_transformer_submodules={raw['num_transformer_submodules']!r}: "
                "leantune reads prompt learning for one stack (not encoder-decoder models)"
            )
        n = raw.get("num_virtual_tokens")
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise checks.bad("num_virtual_tokens", n, "a positive integer")
        return {
            "num_virtual_tokens": n,
            "modules_to_save": checks.names("modules_to_save", raw.get("modules_to_save")),
            "task_type": checks.optional_str("task_type", raw.get("task_type")),
        }

    def describe(self, raw: Mapping[str, Any]) -> list[tuple[str, str]]:
        return [
            ("method", str(raw.get("peft_type"))),
            ("virtual tokens", str(raw.get("num_virtual_tokens"))),
            ("token size", str(raw.get("token_dim"))),
        ]
