"""The one training loop (issue 3 groundwork). The method is whatever the model holds: the loop
trains the parameters that require grad, nothing else.

AdamW over trainable parameters only, warmup then linear decay, gradient accumulation and
clipping, evaluation every epoch (or every N optimizer steps), early stopping on a chosen metric,
a callback when a new best is reached. Not yet here: resume from a checkpoint, Ctrl-C handling,
progress bars (see issue 3).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from leantune.errors import LeantuneError

Batch = Mapping[str, torch.Tensor]


@dataclass
class TrainConfig:
    epochs: int = 3
    """Passes over the training data."""
    lr: float = 5e-4
    """Peak learning rate, reached after warmup."""
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    """Fraction of optimizer steps spent warming up linearly from 0."""
    grad_accum: int = 1
    """Batches whose gradients are summed before each optimizer step."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this; None turns clipping off."""
    eval_every: int | None = None
    """Evaluate every N optimizer steps as well as at the end of each epoch."""
    patience: int | None = None
    """Stop after this many evaluations without improvement; None never stops early."""
    metric: str = "accuracy"
    """Validation metric that picks the best checkpoint and drives early stopping."""
    higher_is_better: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.grad_accum <= 0:
            raise LeantuneError("epochs and grad_accum must be positive")
        if not self.lr > 0:
            raise LeantuneError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise LeantuneError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class TrainResult:
    best: dict[str, float] | None
    steps: int
    stopped_early: bool
    train_seconds: float
    examples: int
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.train_seconds if self.train_seconds else 0.0


def warmup_linear(total: int, warmup: int) -> Callable[[int], float]:
    """Learning-rate factor: 0 → 1 over ``warmup`` steps, then 1 → 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def train(
    model: nn.Module,
    batches: Callable[[int], Sequence[Batch]],
    evaluate: Callable[[nn.Module], dict[str, float]],
    config: TrainConfig,
    on_best: Callable[[nn.Module, dict[str, float]], None] | None = None,
    log: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters; ``batches(epoch)`` gives that epoch's batches,
    each holding the model's inputs and ``labels``."""
    torch.manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LeantuneError("the model has no trainable parameters; inject an adapter first")
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = math.ceil(len(batches(0)) / config.grad_accum)
    total = per_epoch * config.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_linear(total, round(total * config.warmup_ratio))
    )
    sign = 1.0 if config.higher_is_better else -1.0
    best: dict[str, float] | None = None
    history: list[dict[str, float]] = []
    bad_evals = step = examples = 0
    seconds = 0.0

    def run_eval(epoch: int, train_loss: float) -> bool:
        """Evaluate, keep the best, and say whether to stop."""
        nonlocal best, bad_evals
        model.eval()
        with torch.no_grad():
            metrics = dict(evaluate(model))
        model.train()
        if config.metric not in metrics:
            raise LeantuneError(f"metric {config.metric!r} not among {sorted(metrics)}")
        row = {"step": float(step), "epoch": float(epoch), "train_loss": train_loss} | metrics
        history.append(row)
        if log:
            log(row)
        if best is None or sign * metrics[config.metric] > sign * best[config.metric]:
            best, bad_evals = row, 0
            if on_best:
                on_best(model, row)
            return False
        bad_evals += 1
        return config.patience is not None and bad_evals >= config.patience

    model.train()
    for epoch in range(config.epochs):
        epoch_batches = batches(epoch)
        running, count = 0.0, 0
        start = time.perf_counter()
        for i, batch in enumerate(epoch_batches):
            loss = model(**batch).loss
            (loss / config.grad_accum).backward()
            running, count = running + loss.item(), count + 1
            examples += len(batch["labels"])
            if (i + 1) % config.grad_accum and i + 1 != len(epoch_batches):
                continue
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if config.eval_every and step % config.eval_every == 0:
                seconds += time.perf_counter() - start
                stop = run_eval(epoch, running / count)
                start = time.perf_counter()
                if stop:
                    return TrainResult(best, step, True, seconds, examples, history)
        seconds += time.perf_counter() - start
        if run_eval(epoch + 1, running / max(count, 1)):
            return TrainResult(best, step, True, seconds, examples, history)
    return TrainResult(best, step, False, seconds, examples, history)
