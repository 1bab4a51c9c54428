"""Task metrics: accuracy, macro-F1 and the confusion matrix for classification; perplexity for
language modelling. Evaluation runs over length-sorted batches with dynamic padding."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from leantune.core.distributed import collective_device, current
from leantune.models.chat import instruct_batch
from leantune.models.data import length_buckets, pad_batch


@dataclass
class Encoded:
    """Token ids of one split, with class indices (classification), per-token labels
    (``targets``, instruct: -100 off the assistant's tokens) or none (causal LM)."""

    ids: list[list[int]]
    labels: list[int] = field(default_factory=list)
    targets: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def make_batch(
    enc: Encoded, rows: Sequence[int], pad_id: int, causal: bool, with_rows: bool = False
) -> dict[str, torch.Tensor]:
    """Padded inputs and labels; ``with_rows`` adds the example indices as ``rows``."""
    ids = [enc.ids[i] for i in rows]
    if enc.targets:  # per-token labels (instruct)
        batch = instruct_batch(ids, [enc.targets[i] for i in rows], pad_id)
    else:
        batch = pad_batch(ids, pad_id)
        if causal:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        elif enc.labels:
            batch["labels"] = torch.tensor([enc.labels[i] for i in rows], dtype=torch.long)
    if with_rows:
        batch["rows"] = torch.tensor(list(rows), dtype=torch.long)
    return batch


def confusion_matrix(truth: Sequence[int], pred: Sequence[int], n: int) -> list[list[int]]:
    """Rows are true classes, columns predicted classes."""
    matrix = [[0] * n for _ in range(n)]
    for t, p in zip(truth, pred, strict=True):
        matrix[t][p] += 1
    return matrix


def macro_f1(matrix: Sequence[Sequence[int]]) -> float:
    """Mean F1 over the classes that occur in the truth or the predictions."""
    scores = []
    for c in range(len(matrix)):
        tp = matrix[c][c]
        fn = sum(matrix[c]) - tp
        fp = sum(row[c] for row in matrix) - tp
        if tp + fn + fp:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


@dataclass
class Evaluation:
    metrics: dict[str, float]
    predictions: list[int] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    confusion: list[list[int]] | None = None
    samples: list[dict[str, str]] = field(default_factory=list)
    """instruct: generated answers (prompt, reference, answer) behind the generation metrics."""


@torch.no_grad()
def evaluate(
    model: nn.Module,
    enc: Encoded,
    *,
    causal: bool,
    num_labels: int = 0,
    pad_id: int = 0,
    batch_size: int = 64,
    forward: Callable[[nn.Module, dict[str, torch.Tensor]], Any] | None = None,
) -> Evaluation:
    """Loss and task metrics of ``model`` on ``enc`` (mean over examples, or tokens for LMs);
    ``forward`` replaces ``model(**batch)`` (a causal LM's loss on its labelled tokens only)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, weight = 0.0, 0
    order: list[int] = []
    preds: list[int] = []
    probs: list[float] = []
    for rows, counted in _my_buckets([len(x) for x in enc.ids], batch_size):
        batch = {k: v.to(device) for k, v in make_batch(enc, rows, pad_id, causal).items()}
        out = forward(model, batch) if forward is not None else model(**batch)
        if not counted:  # a rank with no bucket left keeps step with the others (FSDP)
            continue
        if causal:
            # transformers averages over predicted tokens: every real token after the first.
            n = int((batch["labels"][:, 1:] != -100).sum())
        else:
            n = len(rows)
            p = out.logits.float().softmax(-1).max(-1)
            preds += p.indices.tolist()
            probs += p.values.tolist()
            order += rows
        if out.loss is not None:
            total_loss += out.loss.item() * n
            weight += n
    model.train(was_training)
    if current().parallel:
        return _reduced(enc, order, preds, total_loss, weight, causal, num_labels)
    loss = total_loss / max(weight, 1)
    if causal:
        return Evaluation({"loss": loss, "perplexity": math.exp(min(loss, 50.0))})
    # Back to the caller's row order.
    by_row = sorted(range(len(order)), key=lambda i: order[i])
    preds = [preds[i] for i in by_row]
    probs = [probs[i] for i in by_row]
    if not enc.labels:
        return Evaluation({}, preds, probs)
    matrix = confusion_matrix(enc.labels, preds, num_labels)
    return _metrics(loss, matrix, len(enc), preds, probs)


def _metrics(
    loss: float, matrix: list[list[int]], count: int, preds: list[int], probs: list[float]
) -> Evaluation:
    right = sum(matrix[c][c] for c in range(len(matrix)))
    metrics = {"loss": loss, "accuracy": right / max(count, 1), "macro_f1": macro_f1(matrix)}
    return Evaluation(metrics, preds, probs, matrix)


def _my_buckets(lengths: list[int], batch_size: int) -> list[tuple[list[int], bool]]:
    """This rank's evaluation batches (every ``size``-th bucket), padded with uncounted
    repeats so that every rank runs as many forwards as the busiest one."""
    buckets = length_buckets(lengths, batch_size, seed=None)
    world = current()
    if not world.parallel:
        return [(rows, True) for rows in buckets]
    mine = buckets[world.rank :: world.size]
    rounds = -(-len(buckets) // world.size)
    return [(rows, True) for rows in mine] + [(buckets[0], False)] * (rounds - len(mine))


def _reduced(
    enc: Encoded,
    order: list[int],
    preds: list[int],
    total_loss: float,
    weight: int,
    causal: bool,
    num_labels: int,
) -> Evaluation:
    """The metrics of every rank's share, summed exactly (correct counts, not rank means).
    Predictions stay with the rank that made them."""
    import torch.distributed as dist

    matrix = (
        confusion_matrix([enc.labels[i] for i in order], preds, num_labels)
        if enc.labels and not causal
        else []
    )
    flat = torch.tensor(
        [total_loss, float(weight), *(x for r in matrix for x in r)], dtype=torch.float64
    )
    flat = flat.to(collective_device())
    dist.all_reduce(flat)
    values = flat.cpu().tolist()
    loss = values[0] / max(values[1], 1)
    if causal:
        return Evaluation({"loss": loss, "perplexity": math.exp(min(loss, 50.0))})
    if not matrix:
        return Evaluation({})
    summed = [
        [round(x) for x in values[2 + r * num_labels : 2 + (r + 1) * num_labels]]
        for r in range(num_labels)
    ]
    return _metrics(loss, summed, len(enc), [], [])
