"""Learning-rate schedules, per-parameter rates and gradual unfreezing, in one place.

- ``lr_lambda``: the factor on each group's peak rate at each optimizer step: ``linear``
  (warmup, then linear decay to 0), ``cosine`` (warmup, then half a cosine to 0), ``constant``
  (warmup, then flat), ``slanted`` (slanted triangular, Howard & Ruder 2018: a short linear rise
  over the warmup share, a long linear fall to 1/32 of the peak).
- ``lr_scales``: a rate multiplier per trainable parameter: layer-wise decay (layer l of L gets
  decay^(L-1-l); parameters before the first layer, the embeddings, decay^L; those after the
  layers, the head, 1) times what the adapter layers ask for (``adapter_lr_scales``:
  LoRA+ gives LoRA's B matrices ``loraplus_ratio`` times the rate of A; sparse entries train at
  their config's ``lr_scale``).
- ``Unfreezer``: trainable parameters in groups from the top down (the head and the top layer
  first, the embeddings with the lowest layer last); one more group trains every N steps. Frozen
  groups keep ``requires_grad=False`` and get no gradient, so AdamW skips them until they join.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from leantune.adapters.inject import adapter_layers
from leantune.adapters.targets import layer_index
from leantune.core.errors import LeantuneError

SCHEDULES = ("linear", "cosine", "constant", "slanted")
SLANTED_RATIO = 32


def check_schedule(kind: str) -> None:
    if kind not in SCHEDULES:
        raise LeantuneError(f"--schedule {kind!r} is unknown; use one of {SCHEDULES}")


def check_layer_decay(decay: float) -> None:
    if not 0 < decay <= 1:
        raise LeantuneError(f"--layer-decay must be in (0, 1], got {decay}")


def lr_lambda(kind: str, total: int, warmup: int) -> Callable[[int], float]:
    """Factor on the peak rate at optimizer step ``step`` (0-based) of ``total``."""
    check_schedule(kind)
    total = max(1, total)

    def factor(step: int) -> float:
        if kind == "slanted":
            cut = max(1, warmup)
            p = step / cut if step < cut else max(0.0, 1 - (step - cut) / max(1, total - cut))
            return (1 + p * (SLANTED_RATIO - 1)) / SLANTED_RATIO
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1 - done)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        return 1.0

    return factor


def _layers(names: Sequence[str], n_layers: int) -> dict[str, int | None]:
    """The layer of each parameter, ``names`` in the model's order: -1 for those before the
    first layer (the embeddings), None for those after it outside the layers (head, pooler)."""
    out: dict[str, int | None] = {}
    seen_layer = False
    for name in names:
        index = layer_index(name)
        if index is not None and index < n_layers:
            seen_layer = True
            out[name] = index
        else:
            out[name] = None if seen_layer else -1
    if not seen_layer:  # nothing inside the layers: nothing is "below" them either
        out = dict.fromkeys(names)
    return out


def adapter_lr_scales(model: nn.Module, **options: Any) -> dict[str, float]:
    """Rate multipliers the adapter layers ask for (``lr_multipliers``: LoRA+'s B with
    ``loraplus_ratio``, sparse entries), by parameter name; 1 is left out."""
    out: dict[str, float] = {}
    for layer_name, layer in adapter_layers(model):
        for name in layer.adapter_names():
            for key, scale in layer.lr_multipliers(name, options).items():
                out[f"{layer_name}.{key}"] = scale
    return out


def lr_scales(
    params: Mapping[str, nn.Parameter],
    *,
    n_layers: int | None,
    layer_decay: float = 1.0,
    adapters: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Rate multiplier per parameter name (see the module doc); ``adapters`` are the adapter
    layers' own multipliers by parameter name (``adapter_lr_scales``)."""
    check_layer_decay(layer_decay)
    if layer_decay != 1 and not n_layers:
        raise LeantuneError("--layer-decay: the model's layer stack was not found")
    layers = _layers(list(params), n_layers or 0)
    out = {}
    for name in params:
        scale = (adapters or {}).get(name, 1.0)
        layer = layers[name]
        if layer_decay != 1 and n_layers and layer is not None:
            scale *= layer_decay ** (n_layers - 1 - layer)
        out[name] = scale
    return out


class Unfreezer:
    """Switches trainable groups on from the top down, one more every ``every`` steps."""

    def __init__(self, params: Mapping[str, nn.Parameter], n_layers: int, every: int, total: int):
        if every <= 0:
            raise LeantuneError(f"--unfreeze-every must be a positive step count, got {every}")
        if not n_layers:
            raise LeantuneError("--unfreeze-every: the model's layer stack was not found")
        layers = _layers(list(params), n_layers)
        by_layer: dict[int, list[nn.Parameter]] = {}
        for name, p in params.items():
            layer = layers[name]
            # Outside the layers (head, pooler, final norm) trains from the start.
            key = n_layers if layer is None else max(layer, 0)
            by_layer.setdefault(key, []).append(p)
        keys = sorted(by_layer, reverse=True)
        if len(keys) > 1 and keys[0] == n_layers:  # the head joins with the top layer
            by_layer[keys[1]] += by_layer.pop(keys[0])
            keys = keys[1:]
        self.groups = [by_layer[k] for k in keys]
        self.every = every
        if len(self.groups) < 2:
            raise LeantuneError(
                "--unfreeze-every: the trainable parameters sit in one layer group, so there is "
                "nothing to unfreeze gradually; drop the option or train more layers"
            )
        joined = 1 + (total - 1) // every
        if joined < len(self.groups):
            raise LeantuneError(
                f"--unfreeze-every {every}: with {total} optimizer steps only {joined} of "
                f"{len(self.groups)} layer groups would ever train; use at most "
                f"{max(1, (total - 1) // (len(self.groups) - 1))}"
            )

    def groups_at(self, step: int) -> int:
        return min(len(self.groups), 1 + step // self.every)

    def apply(self, step: int) -> None:
        on = self.groups_at(step)
        for i, group in enumerate(self.groups):
            for p in group:
                p.requires_grad_(i < on)

    def release(self) -> None:
        """Everything trainable again (the end of training)."""
        for group in self.groups:
            for p in group:
                p.requires_grad_(True)
