"""The keep loss (``--keep W``): while the task trains, pull the model's behaviour on general
reference text back toward the original model's.

The original's side is computed once, before the first step, from the same model (adapters at
their identity start, so it *is* the original; no second copy is held): for an encoder the
mean-pooled last hidden state of each reference text, for a causal LM the top-``k``
next-token probabilities at every position. Each training batch then adds, for the next
``batch_size`` reference texts in turn,

- encoder: ``W · mean(1 − cos(e, e₀))``, the distance the "knowledge kept" cosine measures;
- causal LM: ``W · mean KL(p₀ᵏ ‖ p)`` over positions, p₀ᵏ the original's top-k probabilities
  renormalised, p the model's probabilities at those tokens.

The texts are reference texts *not* among those that measure knowledge kept (the two sets are
disjoint), never the task's data. An instruct run distils on general conversations instead
(:mod:`leantune.train.keep_chat`): each row comes with a mask of the tokens that count (the
assistant's), and the KL is taken only at the positions that predict them. Cost: one forward and backward of ``batch_size`` short texts
per training batch (``--keep-every k``: every k-th batch at k times the weight);
``train_keep`` is logged like the other terms.

Under several processes the keep batch is split like the task's batch (:mod:`leantune.
distributed`): each rank computes its rows' mean, weighted by its share of the batch's rows
(tokens, for a causal LM) × processes, so the averaged gradient is the one-process gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leantune.analysis.knowledge import mean_pool
from leantune.core.distributed import current, rank_slice, settle
from leantune.core.errors import LeantuneError
from leantune.models.data import pad_batch

TOP_K = 16
KEEP_BATCH = 8
"""Reference texts in each keep batch."""


def pooled(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the body's last hidden states under the attention mask (float32)."""
    body: Any = getattr(model, "base_model", model)
    return mean_pool(body(**batch), batch["attention_mask"])


def cosine_keep(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """mean(1 − cos(now, before)) over rows."""
    return (1 - F.cosine_similarity(now, before, dim=-1)).mean()


def topk_keep(logits: torch.Tensor, top: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """mean over the rows of KL(p₀ ‖ p) on the original's top-k tokens: p₀ (``probs``, summing to 1
    over ``top``) against the model's probabilities at ``top`` renormalised over them."""
    logp = logits.float().log_softmax(-1).gather(-1, top)
    logq = logp - logp.logsumexp(-1, keepdim=True)
    return (probs * (probs.clamp_min(1e-12).log() - logq)).sum(-1).mean()


class KeepLoss:
    """The ``keep`` penalty term; call it with the model for this batch's term."""

    def __init__(
        self,
        model: nn.Module,
        ids: list[list[int]],
        pad_id: int,
        weight: float,
        causal: bool,
        batch_size: int = KEEP_BATCH,
        every: int = 1,
        masks: list[list[bool]] | None = None,
    ) -> None:
        """``masks`` (causal LMs): per row, which tokens count (True: the KL is taken at the
        position that predicts that token); None: every token after the first."""
        if not weight > 0:
            raise LeantuneError(f"--keep must be a positive weight, got {weight}")
        if masks is not None:  # a row with nothing to count would add 0/0
            rows = [(x, m) for x, m in zip(ids, masks, strict=True) if any(m[1 : len(x)])]
            ids, masks = [x for x, _ in rows], [m for _, m in rows]
        if not ids:
            raise LeantuneError(
                "--keep needs reference text: install fortunes-min or give --reference-text"
            )
        self.weight, self.causal, self.pad_id = weight, causal, pad_id
        self.every, self.calls = every, 0
        starts = range(0, len(ids), batch_size)
        self.batches = [pad_batch(ids[i : i + batch_size], pad_id) for i in starts]
        # Per batch, the positions whose next-token prediction counts (rows × (length - 1)).
        self.counted = [b["attention_mask"][:, 1:].bool() for b in self.batches]
        if masks is not None:
            for n, i in enumerate(starts):
                self.counted[n] &= counted_rows(masks[i : i + batch_size], self.batches[n])
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        self.targets: list[tuple[torch.Tensor, ...]] = []
        with torch.no_grad():
            for batch, counted in zip(self.batches, self.counted, strict=True):
                on = {k: v.to(device) for k, v in batch.items()}
                if causal:
                    logits = model(**on).logits[:, :-1].float()
                    p = logits.softmax(-1).topk(min(TOP_K, logits.shape[-1]), dim=-1)
                    keep = counted.to(device)
                    ends = torch.cat([keep.new_zeros(1, dtype=torch.long), keep.sum(1).cumsum(0)])
                    self.targets.append(
                        (p.indices[keep], p.values[keep] / p.values[keep].sum(-1, True), ends)
                    )
                else:
                    self.targets.append((pooled(model, on),))
        settle(model)  # FSDP: the blocks back in their sharded state
        model.train(was_training)

    def __call__(self, model: nn.Module, batch: int | None = None) -> dict[str, torch.Tensor]:
        """The term for training batch ``batch`` (its index from 0; default: the calls so far):
        every ``every``-th batch, at ``every`` times the weight (the same pull on average, a
        ``every``-th of the cost); {} in between. The reference batch follows from the index,
        so a resumed run takes the same ones. Under several processes, this rank's part."""
        index = self.calls if batch is None else batch
        self.calls = index + 1
        if index % self.every:
            return {}
        i = (index // self.every) % len(self.batches)
        world = current()
        rows = len(self.batches[i]["input_ids"])
        start, end = rank_slice(rows, world)
        empty = start == end  # a rank left without rows computes row 0 at weight 0
        start, end = (0, 1) if empty else (start, end)
        device = next(model.parameters()).device
        on = {k: v[start:end].to(device) for k, v in self.batches[i].items()}
        if self.causal:
            top, probs, ends = self.targets[i]
            lo, hi = int(ends[start]), int(ends[end])
            logits = model(**on).logits[:, :-1]
            keep = self.counted[i][start:end].to(device)
            term = topk_keep(logits[keep], top[lo:hi], probs[lo:hi])
            mine, total = hi - lo, int(ends[-1])
        else:
            term = cosine_keep(pooled(model, on), self.targets[i][0][start:end])
            mine, total = end - start, rows
        share = 0.0 if empty else mine * world.size / total
        return {"keep": self.weight * self.every * share * term}


def counted_rows(masks: list[list[bool]], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The padded (rows × (length - 1)) mask of the positions that predict a counted token."""
    out = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for row, mask in enumerate(masks):
        out[row, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    return out[:, 1:]
