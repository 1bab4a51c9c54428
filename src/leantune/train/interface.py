"""What the one training loop (:func:`leantune.train.loop.train`) takes and gives: its options
(:class:`TrainConfig`), the hooks a caller plugs in (:class:`TrainHooks`), where training stands
(:class:`Progress`, saved in every checkpoint), the result, and the divergence error."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from leantune.core.errors import LeantuneError

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
    schedule: str = "linear"
    """linear, cosine, constant or slanted (see leantune.train.schedule)."""
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
    max_steps: int | None = None
    """Stop after this many optimizer steps (the schedule still spans all epochs)."""
    seed: int = 0
    precision: str = "fp32"
    """fp32, bf16 or fp16: the forward runs under autocast to it (fp16 with loss scaling);
    trainable weights and optimizer state stay fp32."""

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise LeantuneError(f"precision must be fp32, bf16 or fp16, not {self.precision!r}")
        if self.epochs <= 0 or self.grad_accum <= 0:
            raise LeantuneError("epochs and grad_accum must be positive")
        if not self.lr > 0:
            raise LeantuneError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise LeantuneError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("eval_every", "patience", "max_steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise LeantuneError(f"{name} must be positive, got {value}")


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a resumed run continues exactly."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    """Batches of ``epoch`` already consumed."""
    examples: int = 0
    seconds: float = 0.0
    loss_sum: float = 0.0
    """Sum of batch losses since the last evaluation (for the logged train_loss)."""
    loss_count: int = 0
    bad_evals: int = 0
    best: dict[str, float] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    curve: list[tuple[int, float]] = field(default_factory=list)
    """(optimizer step, mean loss of its batches) for every step."""
    penalties: dict[str, float] = field(default_factory=dict)
    """Sums of each regularization term since the last evaluation."""
    batches: int = 0
    """Training batches consumed in all (what a penalty that cycles through its own batches,
    the keep loss, is told, so a resumed run takes the same ones)."""


class Diverged(LeantuneError):
    """Training produced a non-finite loss; the message says at which step and what to try."""

    def __init__(self, step: int, what: str) -> None:
        self.step = step
        super().__init__(
            f"training diverged at step {step}: {what}. Try a lower --lr, keep --max-grad-norm "
            "on, or check the data"
        )


@dataclass
class TrainResult:
    best: dict[str, float] | None
    steps: int
    stopped_early: bool
    train_seconds: float
    examples: int
    history: list[dict[str, float]] = field(default_factory=list)
    curve: list[tuple[int, float]] = field(default_factory=list)
    interrupted: bool = False
    """Ctrl-C: a checkpoint was saved at the last finished step; resume to continue."""
    loss_scale: float | None = None
    """fp16: the loss scaler's scale at the end (None without fp16)."""
    skipped_steps: int = 0
    """fp16: optimizer steps the scaler skipped (overflowing gradients), since this start."""

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.train_seconds if self.train_seconds else 0.0


@dataclass
class TrainHooks:
    """What a caller may plug into :func:`train`; every hook is optional."""

    on_best: Callable[[nn.Module, dict[str, float]], None] | None = None
    """Runs on each new best validation row."""
    log: Callable[[dict[str, float], list[dict[str, float]]], None] | None = None
    """Sees each validation row and the history so far."""
    on_step: Callable[[Progress, int], None] | None = None
    """Runs after every optimizer step with the progress and the step limit."""
    forward: Callable[[nn.Module, Batch], Any] | None = None
    """Replaces ``model(**batch)`` (the frozen-prefix cache uses it)."""
    unfreeze: Callable[[int], Any] | None = None
    """Runs before each optimizer step's first batch (gradual unfreezing)."""
    penalty: Callable[[nn.Module, int], dict[str, torch.Tensor]] | None = None
    """Named regularization terms (already weighted) added to each batch's loss and logged
    apart from it."""
    on_grads: Callable[[int], None] | None = None
    """Sees the clipped gradients before each optimizer step (the adaptive budget's
    importance)."""
    after_step: Callable[[int], None] | None = None
    """Runs right after each optimizer step (the adaptive budget's masks)."""
    checkpoint_extra: Callable[[], Mapping[str, Mapping[str, torch.Tensor]]] | None = None
    """Files to store in the next checkpoint unit (the best weights)."""
