"""Skip the frozen bottom of the model after the first epoch.

When no parameter below layer k of the model's layer stack (and none in the embeddings) is
trained, the input of layer k depends only on the example. With dropout off in that frozen
prefix it is the same every epoch, so it is computed once — captured during the first epoch's
ordinary forward — and later epochs feed it straight to layer k while the prefix layers pass
their input through untouched. Backward already stops at layer k without this (autograd has
nothing to do below the first trainable parameter); the cache saves the prefix's forward.

Cost: the cached inputs stay in memory (examples × tokens × hidden × 4 bytes: 306 MB for BBC
News on MiniLM at 128 tokens). Results equal a run with the prefix in eval mode (tested to 1e-5).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class Passthrough(nn.Module):
    """Stands in for a cached layer: returns its hidden-states input."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's repeated block list (encoder.layer, model.layers, h, ...): the longest
    ModuleList whose children are all of one class."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 1
            and len({type(m) for m in module}) == 1
            and (best is None or len(module) > len(best[1]))
        ):
            best = (name, module)
    return best


class FrozenLayerCache:
    """Caches the input of the first layer with trainable parameters, per training example."""

    def __init__(self, model: nn.Module, lengths: Sequence[int]) -> None:
        self.model = model
        self.lengths = list(lengths)
        self.cache: dict[int, torch.Tensor] = {}
        self.start = 0
        self.layers: nn.ModuleList | None = None
        self.frozen: list[nn.Module] = []
        found = layer_stack(model)
        if found is None:
            return
        stack_name, layers = found
        trainable = [
            i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())
        ]
        if not trainable or trainable[0] == 0:
            return
        names = [n for n, _ in model.named_modules()]
        at = names.index(stack_name)
        ancestors = {n for n in names if n == "" or stack_name.startswith(n + ".")}
        before = [m for n, m in model.named_modules() if names.index(n) < at and n not in ancestors]
        if any(p.requires_grad for m in before for p in m.parameters()):
            return  # a trained embedding: the prefix output changes every step
        self.layers, self.start = layers, trainable[0]
        self.frozen = before + list(layers[: self.start])

    @property
    def active(self) -> bool:
        return self.layers is not None

    def freeze_mode(self) -> None:
        """Dropout off in the frozen prefix (called before every forward: model.train() turns
        it back on)."""
        for module in self.frozen:
            module.eval()

    def forward(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> Any:
        """The model's output on ``batch`` (which carries the example indices as ``rows``)."""
        inputs = {k: v for k, v in batch.items() if k != "rows"}
        if not self.active:
            return model(**inputs)
        self.freeze_mode()
        rows = [int(r) for r in batch["rows"]]
        if all(r in self.cache for r in rows):
            with self._skipping(rows):
                return model(**inputs)
        with self._capturing(rows):
            return model(**inputs)

    @contextmanager
    def _capturing(self, rows: list[int]) -> Iterator[None]:
        assert self.layers is not None

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0].detach()
            for j, r in enumerate(rows):
                self.cache[r] = hidden[j, : self.lengths[r]].clone()

        handle = self.layers[self.start].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextmanager
    def _skipping(self, rows: list[int]) -> Iterator[None]:
        assert self.layers is not None
        layers = self.layers
        cached = [self.cache[r] for r in rows]
        width = max(t.shape[0] for t in cached)

        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            hidden = args[0]
            fed = hidden.new_zeros(len(rows), max(width, hidden.shape[1]), hidden.shape[2])
            for j, t in enumerate(cached):
                fed[j, : t.shape[0]] = t
            return (fed[:, : hidden.shape[1]], *args[1:]), kwargs

        saved = [layers[i] for i in range(self.start)]
        for i in range(self.start):
            layers[i] = Passthrough()
        handle = layers[self.start].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for i, layer in enumerate(saved):
                layers[i] = layer
