"""Adapter arithmetic: a new adapter made from a weighted combination of adapters on a model.

``combine(model, {"a": 0.7, "b": 0.3}, method="ties", density=0.5, name="c")`` adds adapter
``c``, built from adapters ``a`` and ``b`` as peft's ``add_weighted_adapter`` builds it, with
the same combinations and the same math (peft's ``utils/merge_utils.py``):

- ``linear``: the weighted sum Σ wᵢ·Tᵢ of the task tensors Tᵢ.
- ``ties``: each Tᵢ keeps its ``density`` share of largest magnitudes; a sign is elected per
  entry (``majority_sign_method`` "total": sign of Σ Tᵢ; "frequency": of Σ sign(Tᵢ)); the
  weighted entries that agree with it are averaged.
- ``dare_linear`` / ``dare_ties``: each entry of Tᵢ is kept with probability ``density`` and
  rescaled by 1/density (``torch.bernoulli``), then summed as linear / merged as ties.
- ``magnitude_prune``: ties' pruning, then the weighted sum.
- ``cat``: the adapters side by side (the rank is the sum of theirs), the exact weighted sum of
  the updates; ``svd``: that sum cut to ``svd_rank`` singular vectors; ``ties_svd``,
  ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the merge on the updates,
  then the SVD.

What the task tensors are (LoRA: the factors A and B, or the updates for the SVD kinds) is the
method's hook (``AdapterConfig.combiner``, ``adapters/methods/lora/arith.py``, registered with the method); only LoRA has one today.
A single adapter is always combined linearly, as in peft. The new adapter is not made active.
Its trained modules (heads, ``modules_to_save``) are copied from one source: the only one that
has them, or ``head`` (peft instead gives the new adapter untrained copies of the first
adapter's modules and refuses two adapters saving the same module).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from leantune.adapters.base import AdapterModule, records
from leantune.adapters.config import AdapterConfig
from leantune.adapters.inject import (
    _record,
    active_adapter,
    adapter_layers,
    check_finite,
    inject,
    module_copy,
    remove_adapter,
    set_active,
)
from leantune.core.errors import LeantuneError

COMBINATIONS = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
PRUNED = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
"""Task merges that need a density."""
SIGN_METHODS = ("total", "frequency")


@dataclass
class Combination:
    """How to combine: the kind and its options, checked."""

    method: str = "linear"
    density: float | None = None
    majority_sign_method: str = "total"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    generator: torch.Generator | None = None
    """Draws DARE's masks; None uses torch's global generator (as peft does)."""

    @property
    def svd(self) -> bool:
        """The merged updates are cut to a rank by SVD."""
        return self.method.endswith("svd")

    @property
    def task(self) -> str:
        """The merge of the task tensors: linear, ties, dare_linear, dare_ties, magnitude_prune."""
        return "linear" if self.method in ("svd", "cat") else self.method.removesuffix("_svd")

    def tasks(self, tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """The task tensors (same shape) merged with ``weights`` (1-d, one per tensor)."""
        kind, density = self.task, self.density
        if kind in PRUNED and density is not None and density < 1:
            if kind.startswith("dare"):
                tensors = [_drop(t, density, self.generator) for t in tensors]
            else:
                tensors = [_magnitude(t, density) for t in tensors]
        stacked = torch.stack(list(tensors), dim=0)
        weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
        if kind not in ("ties", "dare_ties"):
            return weighted.sum(dim=0)
        sign = stacked.sign()
        votes = stacked.sum(dim=0) if self.majority_sign_method == "total" else sign.sum(dim=0)
        agree = sign == torch.where(votes >= 0, 1, -1)
        return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def _magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its int(density · n) largest magnitudes zeroed."""
    mask = torch.zeros_like(t).reshape(-1)
    top = torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)
    mask[top[1]] = 1
    return t * mask.reshape(t.shape)


def _drop(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: each entry kept with probability ``density``, the kept ones scaled by 1/density."""
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


class Combiner(Protocol):
    """A method's rule for combining its adapters (``AdapterConfig.combiner``)."""

    def combine(
        self,
        layers: Sequence[tuple[str, AdapterModule, list[tuple[str, float]]]],
        how: Combination,
        configs: Sequence[AdapterConfig],
        to_save: list[str],
        task_type: str | None,
    ) -> tuple[AdapterConfig, dict[str, dict[str, torch.Tensor]]]:
        """The combined adapter's config and tensors (by module, then by the keys of the layer's
        ``file_targets``) from ``layers``: each adapted module with the sources it holds and
        their weights. Raises LeantuneError for sources it cannot combine; changes nothing."""
        ...


def combination(
    method: str = "linear",
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    seed: int | None = None,
) -> Combination:
    """A checked ``Combination``; with ``seed``, DARE's masks come from a generator seeded so."""
    if method not in COMBINATIONS:
        raise LeantuneError(
            f"combination {method!r} is unknown; use one of {', '.join(COMBINATIONS)}"
        )
    if density is not None and (
        isinstance(density, bool)
        or not isinstance(density, int | float)
        or not 0 < density <= 1
        or math.isnan(density)
    ):
        raise LeantuneError(f"density must be in (0, 1], got {density!r}")
    how = Combination(method, density, majority_sign_method, svd_rank, svd_clamp, svd_full_matrices)
    if how.task in PRUNED and density is None:
        raise LeantuneError(f"{method} prunes: give the share to keep, density in (0, 1]")
    if majority_sign_method not in SIGN_METHODS:
        raise LeantuneError(
            f"majority_sign_method {majority_sign_method!r} is unknown; use total or frequency"
        )
    if svd_rank is not None and (
        isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1
    ):
        raise LeantuneError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise LeantuneError(f"svd_clamp is a quantile in [0, 1], got {svd_clamp!r}")
    if seed is not None:
        how.generator = torch.Generator().manual_seed(seed)
    return how


def _sources(model: nn.Module, weights: Mapping[str, float], name: str) -> list[AdapterConfig]:
    """The configs of the source adapters, checked: known, of one method, finite weights."""
    if not weights:
        raise LeantuneError("combine needs at least one adapter and its weight")
    if name in records(model):
        raise LeantuneError(
            f"adapter {name!r} is already in this model; name the combined adapter otherwise"
        )
    configs = [_record(model, n)[1].config for n in weights]
    for n, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise LeantuneError(f"the weight of adapter {n!r} must be a finite number, got {w!r}")
    kinds = {n: c.method for n, c in zip(weights, configs, strict=True)}
    if len(set(kinds.values())) > 1:
        shown = ", ".join(f"{n} ({m})" for n, m in kinds.items())
        raise LeantuneError(f"adapters {shown} are of different methods; combine one method's")
    return configs


def _heads(model: nn.Module, names: Sequence[str], head: str | None) -> tuple[list[str], str]:
    """The modules the combined adapter saves and the source whose copies it takes."""
    recs = records(model)
    having = [n for n in names if recs[n].modules_to_save]
    if head is not None:
        if head not in names:
            raise LeantuneError(f"head {head!r} is not one of the combined adapters {list(names)}")
        return list(recs[head].modules_to_save), head
    if len(having) > 1:
        mods = ", ".join(recs[having[0]].modules_to_save)
        raise LeantuneError(
            f"adapters {', '.join(having)} each train their own {mods}; choose whose the "
            f"combined adapter keeps with head= (--head)"
        )
    return (list(recs[having[0]].modules_to_save), having[0]) if having else ([], "")


def combine(
    model: nn.Module,
    weights: Mapping[str, float],
    method: str = "linear",
    name: str = "combined",
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    seed: int | None = None,
    head: str | None = None,
) -> nn.Module:
    """Add adapter ``name``: the adapters named in ``weights`` combined with those weights.

    ``method`` is one of ``COMBINATIONS`` (module docstring); ``density`` (the share kept, in
    (0, 1]) is needed by the pruning ones; ``svd_rank`` (default: the largest source rank),
    ``svd_clamp`` (a quantile of the factors' entries to clamp at) and ``svd_full_matrices``
    tune the SVD kinds as in peft. ``seed`` seeds DARE's masks (default: torch's global
    generator). ``head`` names the source whose trained modules (heads) the new adapter takes.
    Everything is checked and computed before the model changes. Returns ``model``.
    """
    how = combination(
        method, density, majority_sign_method, svd_rank, svd_clamp, svd_full_matrices, seed
    )
    configs = _sources(model, weights, name)
    names = list(weights)
    combiner = configs[0].combiner()
    if combiner is None:
        kind = configs[0].title or configs[0].method
        raise LeantuneError(f"combine has no rule for {kind} adapters; it combines LoRA adapters")
    if len(names) == 1:  # peft: one adapter is combined linearly
        how.method = "linear"
    to_save, head_of = _heads(model, names, head)
    layers = [
        (m, layer, [(n, float(weights[n])) for n in names if n in layer.adapter_names()])
        for m, layer in adapter_layers(model)
    ]
    layers = [entry for entry in layers if entry[2]]
    task_type = records(model)[names[0]].task_type
    config, tensors = combiner.combine(layers, how, configs, to_save, task_type)
    check_finite(
        {f"{m}.{k}": t for m, ts in tensors.items() for k, t in ts.items()},
        f"combining {', '.join(names)}",
        "no adapter was added",
    )
    before = active_adapter(model)
    inject(model, config, name, freeze=False)
    try:
        _fill(model, name, tensors, to_save, head_of)
    except Exception:
        remove_adapter(model, name)
        raise
    finally:
        if before in records(model):
            set_active(model, before)
    return model


def _fill(
    model: nn.Module,
    name: str,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    to_save: list[str],
    head_of: str,
) -> None:
    """Copy the combined tensors into adapter ``name`` and its heads from ``head_of``; frozen."""
    with torch.no_grad():
        for m, layer in adapter_layers(model):
            if name not in layer.adapter_names():
                continue
            for key, dst in layer.file_targets(name).items():
                src = tensors[m][key]
                assert dst.shape == src.shape, (m, key)  # the config was built from them
                dst.copy_(src.to(dtype=dst.dtype, device=dst.device))
            for p in layer.adapter_params(name).values():
                p.requires_grad_(False)
        for m in to_save:
            copy = module_copy(model, m, name)
            copy.load_state_dict(module_copy(model, m, head_of).state_dict())
            copy.requires_grad_(False)
