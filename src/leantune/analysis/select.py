"""Which parameters matter for a task: importance scores from a few task batches.

For every linear layer (and the task head) of the model, on ``batches`` of task data:

- ``fisher``: the empirical Fisher diagonal summed over the layer, Σ mean_b(g_b²), with g_b the
  gradient of batch b's mean loss (per-batch, not per-example: one backward per batch);
- ``taylor``: first-order Taylor importance Σ |w · ḡ|, ḡ the gradient averaged over batches;
- ``grad_norm``: ‖ḡ‖;
- ``spectrum``: the squared singular values of ḡ (largest first). A rank-r update can capture
  Σ_{i≤r} σ_i² of the gradient's energy, so this prices LoRA rank directly: the first-order loss
  decrease of a rank-r step of fixed norm is ∝ ‖P_r(ḡ)‖. The Plan allocates ranks by it.

For the other methods a Plan can use, the same energy measure prices each unit: ‖ḡ_b‖² of a
linear layer's bias (BitFit), ‖ḡ_γ‖² + ‖ḡ_β‖² of a norm layer (LayerNorm tuning), and, for sparse
fine-tuning, Σ ḡ² over the entries the empirical Fisher ranks highest (a FISH mask), in chunks of
``SPARSE_CHUNK`` entries. A step of fixed norm inside a parameter subspace lowers the loss by at
most its norm times ‖P ḡ‖, so these gains are comparable across methods.

Scoring runs the model in eval mode (no dropout), so the same weights and batches give the same
scores. Parameters' ``requires_grad`` flags are restored afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leantune.adapters.base import LINEAR_TYPES
from leantune.adapters.planning import SPARSE_CHUNK, ModuleScore, NormScore, Scores
from leantune.adapters.targets import layer_index
from leantune.core.errors import LeantuneError
from leantune.models.norms import norm_form

Batch = Mapping[str, torch.Tensor]


def _weight(module: nn.Module) -> nn.Parameter:
    w = module.weight
    assert isinstance(w, nn.Parameter)
    return w


def scorable_modules(model: nn.Module, skip: Sequence[str] = ()) -> dict[str, nn.Module]:
    """Linear layers (nn.Linear and Conv1D) outside ``skip`` (the task head, scored apart)."""
    inside = tuple(s + "." for s in skip)
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, LINEAR_TYPES) and n not in skip and not n.startswith(inside)
    }


def score(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    skip: Sequence[str] = (),
    max_rank: int = 64,
    max_entries: int = 16 * SPARSE_CHUNK,
    directions: int = 0,
    only: Sequence[str] | None = None,
    forward: Callable[[nn.Module, Batch], Any] | None = None,
) -> Scores:
    """Importance of every linear layer (and norm layer) of ``model`` for the loss on
    ``batches``; ``max_entries`` bounds the sparse units ranked per layer (0: none);
    ``directions``: keep each layer's top right singular vectors of its mean gradient (for
    ``--init grad``); ``only``: just these linear layers, no norm layer (backward then stops
    at the lowest of them); ``forward(model, batch)``: the run's own forward when it has one
    (instruct: the output head at the answer tokens only; the same loss, far cheaper)."""
    if not batches:
        raise LeantuneError("the scoring set has no examples; give at least one batch")
    modules = scorable_modules(model, skip)
    if only is not None:
        modules = {n: m for n, m in modules.items() if n in set(only)}
    if not modules:
        raise LeantuneError("the model has no linear layers to score")
    start = time.perf_counter()
    norms = _norm_modules(model, skip) if only is None else {}
    weights = {n: _weight(m) for n, m in modules.items()}
    # Every tensor whose gradient is read: layer weights, their biases, norm scales and shifts.
    tracked: dict[str, nn.Parameter] = {f"{n}.weight": w for n, w in weights.items()}
    for n, m in [*modules.items(), *norms.items()]:
        for key, p in m.named_parameters(recurse=False):
            tracked[f"{n}.{key}"] = p
    grads = _gradients(model, batches, weights, tracked, max_entries, forward)
    nb = len(batches)
    with torch.no_grad():
        results = [
            _module_score(n, module, weights[n], grads, nb, max_rank, max_entries, directions)
            for n, module in modules.items()
        ]
        norm_scores = [_norm_score(n, module, grads.grad_sum, nb) for n, module in norms.items()]
    return Scores(results, grads.examples, time.perf_counter() - start, norm_scores)


def _norm_modules(model: nn.Module, skip: Sequence[str]) -> dict[str, nn.Module]:
    """Norm layers (LayerNorm, RMSNorm forms) outside ``skip``."""
    inside = tuple(s + "." for s in skip)
    return {
        n: m
        for n, m in model.named_modules()
        if n not in skip and not n.startswith(inside) and norm_form(m) is not None
    }


@dataclass
class _Gradients:
    """What one pass over the scoring batches gathers."""

    fisher: dict[str, float]  # per layer: Σ over batches of Σ g² of its weight
    entry_fisher: dict[str, torch.Tensor]  # per layer: Σ over batches of g², entry by entry
    grad_sum: dict[str, torch.Tensor]  # per tracked tensor: Σ over batches of g
    examples: int


def _gradients(
    model: nn.Module,
    batches: Sequence[Batch],
    weights: Mapping[str, nn.Parameter],
    tracked: Mapping[str, nn.Parameter],
    max_entries: int,
    forward: Callable[[nn.Module, Batch], Any] | None = None,
) -> _Gradients:
    """Backward over every batch with only ``tracked`` requiring gradients; the model's
    gradient flags and training mode are restored after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    device = next(model.parameters()).device
    fisher = {n: 0.0 for n in weights}
    entry_fisher = (
        {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
        if max_entries
        else {}
    )
    grad_sum = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in tracked.items()}
    examples = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in tracked.values():
            p.requires_grad_(True)
        model.eval()
        for batch in batches:
            for p in tracked.values():
                p.grad = None
            on = {k: v.to(device) for k, v in batch.items()}
            out = forward(model, on) if forward is not None else model(**on)
            out.loss.backward()
            examples += len(batch["labels"])
            for key, p in tracked.items():
                if p.grad is not None:
                    grad_sum[key] += p.grad.float()
            for n, w in weights.items():
                if w.grad is not None:
                    g2 = w.grad.float().pow(2)
                    fisher[n] += float(g2.sum())
                    if max_entries:
                        entry_fisher[n] += g2
    finally:
        for p in tracked.values():
            p.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return _Gradients(fisher, entry_fisher, grad_sum, examples)


def _module_score(
    n: str,
    module: nn.Module,
    weight: nn.Parameter,
    grads: _Gradients,
    nb: int,
    max_rank: int,
    max_entries: int,
    directions: int = 0,
) -> ModuleScore:
    """The scores of one linear layer from the gradients summed over ``nb`` batches."""
    mean = grads.grad_sum[f"{n}.weight"] / nb
    wf = weight.detach().float()
    as_linear = mean if isinstance(module, nn.Linear) else mean.t()
    vh = None
    if not mean.any():
        sv = torch.zeros(0)
    elif directions:
        _, sv, vh = torch.linalg.svd(as_linear.cpu(), full_matrices=False)
        sv, vh = sv[:max_rank], vh[:directions].clone()
    else:
        sv = torch.linalg.svdvals(as_linear.cpu())[:max_rank]
    out_f, in_f = as_linear.shape
    bias = grads.grad_sum.get(f"{n}.bias")
    m = ModuleScore(
        name=n,
        kind=_kind(n),
        layer=layer_index(n),
        shape=(out_f, in_f),
        fisher=grads.fisher[n] / nb,
        taylor=float((wf * mean).abs().sum()),
        grad_norm=float(mean.norm()),
        spectrum=[float(s) ** 2 for s in sv if s > 0],
        bias_size=0 if bias is None else bias.numel(),
        bias_gain=0.0 if bias is None else float((bias / nb).pow(2).sum()),
        directions=vh,
    )
    if max_entries and mean.any():
        ef = grads.entry_fisher[n]
        _rank_sparse_units(
            m, as_linear, ef if isinstance(module, nn.Linear) else ef.t(), max_entries
        )
    return m


def _rank_sparse_units(
    m: ModuleScore, as_linear: torch.Tensor, ef: torch.Tensor, max_entries: int
) -> None:
    """Set ``m``'s sparse units: chunks of the ``max_entries`` entries of highest Fisher."""
    k = min(max_entries, ef.numel())
    order = ef.flatten().topk(k).indices
    g2 = as_linear.flatten()[order].pow(2)
    # Chunks of the Fisher ranking, bought best gain (Σ ḡ²) first so the marginal
    # gains fall as the greedy allocation assumes; empty chunks are dropped.
    pieces = [
        (float(g.sum()), idx)
        for g, idx in zip(g2.split(SPARSE_CHUNK), order.split(SPARSE_CHUNK), strict=True)
    ]
    full = [p for p in pieces if p[0] > 0 and len(p[1]) == SPARSE_CHUNK]
    pieces = sorted(full, key=lambda p: -p[0])
    m.sparse_gains = [gain for gain, _ in pieces]
    m.sparse_order = torch.cat([idx for _, idx in pieces]).cpu() if pieces else None


def _norm_score(
    n: str, module: nn.Module, grad_sum: Mapping[str, torch.Tensor], nb: int
) -> NormScore:
    """The score of one norm layer: Σ ḡ² over its scale (and shift)."""
    grads = [grad_sum[f"{n}.{k}"] for k, _ in module.named_parameters(recurse=False)]
    return NormScore(
        name=n,
        kind=_kind(n),
        layer=layer_index(n),
        size=sum(g.numel() for g in grads),
        gain=sum(float((g / nb).pow(2).sum()) for g in grads),
    )


def _kind(name: str) -> str:
    """The name below the layer index (attention.self.query, intermediate.dense, output.dense):
    the same kind of module in every layer. Outside the layers, the last two name parts."""
    parts = name.split(".")
    idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    tail = parts[idx + 1 :] if idx is not None else parts[-2:]
    return ".".join(tail)
