"""Which parameters matter for a task: importance scores from a few task batches.

For every linear layer (and the task head) of the model, on ``batches`` of task data:

- ``fisher``: the empirical Fisher diagonal summed over the layer, Σ mean_b(g_b²), with g_b the
  gradient of batch b's mean loss (per-batch, not per-example: one backward per batch);
- ``taylor``: first-order Taylor importance Σ |w · ḡ|, ḡ the gradient averaged over batches;
- ``grad_norm``: ‖ḡ‖;
- ``spectrum``: the squared singular values of ḡ (largest first). A rank-r update can capture
  Σ_{i≤r} σ_i² of the gradient's energy, so this prices LoRA rank directly: the first-order loss
  decrease of a rank-r step of fixed norm is ∝ ‖P_r(ḡ)‖. The Plan allocates ranks by it.

Scoring runs the model in eval mode (no dropout), so the same weights and batches give the same
scores. Parameters' ``requires_grad`` flags are restored afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from leantune.errors import LeantuneError
from leantune.inject import LINEAR_TYPES, layer_index

Batch = Mapping[str, torch.Tensor]


@dataclass
class ModuleScore:
    name: str
    kind: str
    """The module's last name part (query, value, dense, ...): its type across layers."""
    layer: int | None
    shape: tuple[int, int]
    """(out, in) of the weight as a linear map."""
    fisher: float = 0.0
    taylor: float = 0.0
    grad_norm: float = 0.0
    spectrum: list[float] = field(default_factory=list)

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def rank_cost(self) -> int:
        """Parameters one unit of LoRA rank costs here."""
        return self.shape[0] + self.shape[1]


@dataclass
class Scores:
    modules: list[ModuleScore]
    examples: int
    seconds: float

    def by_layer_and_kind(self, metric: str = "fisher") -> dict[tuple[int | None, str], float]:
        out: dict[tuple[int | None, str], float] = {}
        for m in self.modules:
            key = (m.layer, m.kind)
            out[key] = out.get(key, 0.0) + float(getattr(m, metric))
        return out


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
) -> Scores:
    """Importance of every linear layer of ``model`` for the loss on ``batches``."""
    if not batches:
        raise LeantuneError("the scoring set has no examples; give at least one batch")
    modules = scorable_modules(model, skip)
    if not modules:
        raise LeantuneError("the model has no linear layers to score")
    start = time.perf_counter()
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    device = next(model.parameters()).device
    weights = {n: _weight(m) for n, m in modules.items()}
    fisher = {n: 0.0 for n in modules}
    grad_sum = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    examples = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        model.eval()
        for batch in batches:
            for w in weights.values():
                w.grad = None
            out = model(**{k: v.to(device) for k, v in batch.items()})
            out.loss.backward()
            examples += len(batch["labels"])
            for n, w in weights.items():
                if w.grad is not None:
                    g = w.grad.float()
                    fisher[n] += float(g.pow(2).sum())
                    grad_sum[n] += g
    finally:
        for w in weights.values():
            w.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    results = []
    with torch.no_grad():
        for n, module in modules.items():
            mean = grad_sum[n] / len(batches)
            wf = weights[n].detach().float()
            as_linear = mean if isinstance(module, nn.Linear) else mean.t()
            sv = torch.linalg.svdvals(as_linear.cpu())[:max_rank] if mean.any() else torch.zeros(0)
            out_f, in_f = as_linear.shape
            results.append(
                ModuleScore(
                    name=n,
                    kind=_kind(n),
                    layer=layer_index(n),
                    shape=(out_f, in_f),
                    fisher=fisher[n] / len(batches),
                    taylor=float((wf * mean).abs().sum()),
                    grad_norm=float(mean.norm()),
                    spectrum=[float(s) ** 2 for s in sv if s > 0],
                )
            )
    return Scores(results, examples, time.perf_counter() - start)


def _kind(name: str) -> str:
    """The name below the layer index (attention.self.query, intermediate.dense, output.dense):
    the same kind of module in every layer. Outside the layers, the last two name parts."""
    parts = name.split(".")
    idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    tail = parts[idx + 1 :] if idx is not None else parts[-2:]
    return ".".join(tail)
