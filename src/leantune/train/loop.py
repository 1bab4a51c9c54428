"""The one training loop. The method is whatever the model holds: the loop trains the parameters
that require grad, nothing else, so LoRA, full fine-tuning and head-only share every line.

AdamW over trainable parameters only, warmup then linear decay, gradient accumulation and
clipping, evaluation every epoch (and every N optimizer steps if asked), early stopping on a
chosen metric, a callback on each new best, checkpoints that resume to the same result, and
Ctrl-C that finishes the current optimizer step, saves a checkpoint and returns.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leantune.core.distributed import Parallel, clip_gradients, current, is_dtensor, settle
from leantune.core.errors import LeantuneError
from leantune.models.precision import MAX_SKIPS, LossScaler, autocast, check_precision
from leantune.train.checkpoint import (
    load_checkpoint,
    save_checkpoint,
    trainable_parameters,
)
from leantune.train.interface import (
    Batch,
    Diverged,
    Progress,
    TrainConfig,
    TrainHooks,
    TrainResult,
)
from leantune.train.schedule import adapter_lr_scales, lr_lambda

# ---------------------------------------------------------------------------- the optimizer


def param_groups(
    params: Mapping[str, nn.Parameter] | list[nn.Parameter],
    lr: float,
    scales: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer groups by rate multiplier: ``scales[name]``, else 1."""
    named = params if isinstance(params, Mapping) else {str(i): p for i, p in enumerate(params)}
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in named.items():
        scale = (scales or {}).get(name, 1.0)
        groups.setdefault(scale, []).append(p)
    return [{"params": ps, "lr": lr * s, "lr_scale": s} for s, ps in groups.items()]


@contextmanager
def _stop_on_sigint(also_sigterm: bool = False) -> Iterator[Callable[[], bool]]:
    """First Ctrl-C asks the loop to stop after the current step; a second one interrupts.
    ``also_sigterm``: SIGTERM too (torchrun passes the launcher's Ctrl-C on as SIGTERM)."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return
    signals = (signal.SIGINT, signal.SIGTERM) if also_sigterm else (signal.SIGINT,)
    previous: dict[int, Any] = {s: signal.getsignal(s) for s in signals}

    def handler(signum: int, frame: Any) -> None:
        requested.set()
        signal.signal(signum, previous[signum])

    for s in signals:
        signal.signal(s, handler)
    try:
        yield requested.is_set
    finally:
        for s in signals:
            signal.signal(s, previous[s])


# ---------------------------------------------------------------------------- the loop


def train(
    model: nn.Module,
    batches: Callable[[int], Sequence[Batch]],
    evaluate: Callable[[nn.Module], dict[str, float]],
    config: TrainConfig,
    hooks: TrainHooks | None = None,
    *,
    checkpoint: Path | None = None,
    resume: bool = False,
    lr_scales: Mapping[str, float] | None = None,
    checkpoint_meta: Mapping[str, Any] | None = None,
    parallel: Parallel | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters.

    ``batches(epoch)`` gives that epoch's batches (the same list each time it is asked for the
    same epoch), each holding the model's inputs and ``labels``. ``evaluate`` returns validation
    metrics; ``hooks`` (:class:`TrainHooks`) plug in logging, the best weights, the
    regularizers and the schedules. With ``checkpoint`` a folder, a checkpoint is written after
    every evaluation and on Ctrl-C; ``resume=True`` continues from it. ``lr_scales`` multiplies
    the rate per parameter name (default: what the adapter layers ask for, ``lr_multipliers``);
    ``checkpoint_meta`` is stored beside each checkpoint's progress. With ``parallel`` (several
    processes, :mod:`leantune.core.distributed`) each batch is a global batch this rank computes its
    slice of, and the gradients are averaged over the ranks before each step.

    A non-finite training loss, penalty or validation loss stops training with
    :class:`Diverged`; the last checkpoint (before the divergence) stays as it was.
    """
    loop = _Loop(model, batches, evaluate, config, hooks or TrainHooks(), checkpoint, parallel)
    scales = adapter_lr_scales(model) if lr_scales is None else lr_scales
    loop.start(resume, scales, checkpoint_meta)
    return loop.run()


class _Loop:
    """One call of :func:`train`: the optimizer, the schedule, the progress and the steps."""

    def __init__(
        self,
        model: nn.Module,
        batches: Callable[[int], Sequence[Batch]],
        evaluate: Callable[[nn.Module], dict[str, float]],
        config: TrainConfig,
        hooks: TrainHooks,
        checkpoint: Path | None,
        parallel: Parallel | None = None,
    ) -> None:
        self.model, self.batches, self.evaluate = model, batches, evaluate
        self.config, self.hooks, self.checkpoint = config, hooks, checkpoint
        self.parallel = parallel
        self.stop_everywhere = False  # parallel: a stop asked for on any rank, agreed each step
        self.local_stop: Callable[[], bool] = lambda: False
        self.bad_loss = 0.0
        self.step_terms: dict[str, float] = {}  # penalty terms of this step's batches

    def start(
        self, resume: bool, lr_scales: Mapping[str, float] | None, meta: Mapping[str, Any] | None
    ) -> None:
        """The optimizer and schedule, fresh or as the checkpoint left them."""
        config, model = self.config, self.model
        torch.manual_seed(config.seed + current().rank)  # dropout differs between ranks
        self.meta = meta
        self.named = trainable_parameters(model)  # gradual unfreezing may switch some off below
        self.params = list(self.named.values())
        if not self.params:
            raise LeantuneError("the model has no trainable parameters; inject an adapter first")
        self.device = self.params[0].device
        check_precision(config.precision, self.device)
        self.scaler = LossScaler(config.precision, self.device)
        self.opt = torch.optim.AdamW(
            param_groups(self.named, config.lr, lr_scales),
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
        per_epoch = math.ceil(len(self.batches(0)) / config.grad_accum)
        total = per_epoch * config.epochs
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(config.schedule, total, round(total * config.warmup_ratio))
        )
        if resume:
            if self.checkpoint is None:
                raise LeantuneError("resume needs a checkpoint folder")
            self.p = load_checkpoint(
                self.checkpoint, model, self.opt, self.sched, self.named, self.scaler
            )
        else:
            self.p = Progress()
        self.sign = 1.0 if config.higher_is_better else -1.0
        self.limit = min(total, config.max_steps or total)

    def result(self, stopped_early: bool, interrupted: bool = False) -> TrainResult:
        p, scaler = self.p, self.scaler
        return TrainResult(
            p.best,
            p.step,
            stopped_early,
            p.seconds,
            p.examples,
            p.history,
            p.curve,
            interrupted,
            loss_scale=scaler.scale if scaler.enabled else None,
            skipped_steps=scaler.skipped,
        )

    def save(self) -> None:
        if self.checkpoint is None:
            return
        extra = self.hooks.checkpoint_extra() if self.hooks.checkpoint_extra else None
        state = (self.model, self.opt, self.sched, self.p, self.named, extra, self.meta)
        save_checkpoint(self.checkpoint, *state, scaler=self.scaler.state_dict())

    def validate(self) -> bool:
        """Evaluate, keep the best, checkpoint, and say whether to stop."""
        config, p, model = self.config, self.p, self.model
        model.eval()
        with torch.no_grad(), autocast(config.precision, self.device):
            metrics = dict(self.evaluate(model))
        settle(model)
        model.train()
        if config.metric not in metrics:
            raise LeantuneError(f"metric {config.metric!r} not among {sorted(metrics)}")
        if not all(math.isfinite(v) for v in metrics.values()):
            raise Diverged(p.step, f"validation gives {metrics}")
        done = p.batch / len(self.batches(p.epoch)) if p.batch else 0
        row = {
            "step": float(p.step),
            "epoch": round(p.epoch + done, 4),
            "train_loss": p.loss_sum / max(1, p.loss_count),
            "train_seconds": p.seconds,
        } | {f"val_{k}": v for k, v in metrics.items()}
        # Regularization terms, logged apart from the task loss (mean per batch).
        row |= {f"train_{k}": v / max(1, p.loss_count) for k, v in p.penalties.items()}
        p.history.append(row)
        p.loss_sum, p.loss_count, p.penalties = 0.0, 0, {}
        key = f"val_{config.metric}"
        if p.best is None or self.sign * row[key] > self.sign * p.best[key]:
            p.best, p.bad_evals = row, 0
            if self.hooks.on_best:
                self.hooks.on_best(model, row)
        else:
            p.bad_evals += 1
        if self.hooks.log:
            self.hooks.log(row, p.history)
        self.save()
        return config.patience is not None and p.bad_evals >= config.patience

    def run(self) -> TrainResult:
        p, config = self.p, self.config
        self.model.train()
        with _stop_on_sigint(also_sigterm=self.parallel is not None) as local_stop:
            self.local_stop = local_stop
            stop_requested = local_stop if self.parallel is None else lambda: self.stop_everywhere
            while p.epoch < config.epochs and p.step < self.limit:
                ended = self.run_epoch(stop_requested)
                if ended is not None:
                    return ended
                p.epoch, p.batch = p.epoch + 1, 0
                if self.validate():
                    return self.result(True)
                if stop_requested():
                    return self.result(False, interrupted=True)
        return self.result(False)

    def run_epoch(self, stop_requested: Callable[[], bool]) -> TrainResult | None:
        """The epoch's remaining batches; a result when training ends inside the epoch."""
        p, config, hooks = self.p, self.config, self.hooks
        epoch_batches = self.batches(p.epoch)
        start = time.perf_counter()
        step_loss, step_batches = 0.0, 0
        while p.batch < len(epoch_batches):
            if hooks.unfreeze is not None and step_batches == 0:
                hooks.unfreeze(p.step)
            step_loss += self.backward(epoch_batches[p.batch])
            step_batches += 1
            if step_batches < config.grad_accum and p.batch != len(epoch_batches):
                continue
            self.optimizer_step(step_loss, step_batches)
            step_loss, step_batches = 0.0, 0
            now = time.perf_counter()
            p.seconds += now - start
            start = now
            if hooks.on_step:
                hooks.on_step(p, self.limit)
            if p.batch == len(epoch_batches):
                break  # the end-of-epoch evaluation covers this step
            if config.eval_every and p.step % config.eval_every == 0 and self.validate():
                return self.result(True)
            if p.step >= self.limit:
                return self.result(self.validate())
            if stop_requested():
                self.save()
                return self.result(False, interrupted=True)
            start = time.perf_counter()
        return None

    def backward(self, cpu_batch: Batch) -> float:
        """One batch forward and backward (gradients accumulate); returns its task loss.

        The task loss goes backward before the penalties are computed: a penalty that runs
        the model again (the keep loss) then has its own forward and backward, which FSDP
        needs (a sharded block may not be used by two forwards before one backward) and which
        frees the task's activations first."""
        p, hooks, model = self.p, self.hooks, self.model
        rows, weight, share = len(cpu_batch["labels"]), 1.0, 1.0
        if self.parallel is not None:  # this rank's slice; its share of the global mean loss
            cpu_batch, weight = self.parallel.split(cpu_batch)
            share = weight / self.parallel.world.size
        batch = {k: v.to(self.device) for k, v in cpu_batch.items()}
        with autocast(self.config.precision, self.device):
            loss = (hooks.forward(model, batch) if hooks.forward else model(**batch)).loss
        loss = loss.float()  # penalties (fp32 adapters) outside autocast
        task_loss = loss * weight if weight != 1.0 else loss
        value = float(task_loss.detach())
        self.check_finite(value)
        self.scaler.backward(task_loss / self.config.grad_accum)
        if hooks.penalty is not None:
            terms = hooks.penalty(model, p.batches)
            total: torch.Tensor | None = None
            for key, term in terms.items():
                if is_dtensor(term):  # FSDP: a sum over shards, completed over the ranks
                    term = term.full_tensor()  # type: ignore[attr-defined]
                total = term if total is None else total + term
                # Each rank's part of the term's mean over the ranks (summed at the step).
                self.step_terms[key] = self.step_terms.get(key, 0.0) + float(term.detach()) / (
                    self.parallel.world.size if self.parallel is not None else 1
                )
            if total is not None:
                value += float(total.detach())
                self.check_finite(value)
                if total.requires_grad:
                    self.scaler.backward(total / self.config.grad_accum)
        p.batch += 1
        p.batches += 1
        p.examples += rows
        return float(loss.item()) * share

    def check_finite(self, value: float) -> None:
        """A non-finite loss: one process stops before the update (the last good step's
        weights stay); under several, every rank still runs its backward (FSDP's collectives
        wait for it) and all say it after the gradient average."""
        if not math.isfinite(value):
            if self.parallel is None:
                raise Diverged(self.p.step + 1, f"the training loss is {value}")
            self.bad_loss = 1.0

    def optimizer_step(self, step_loss: float, step_batches: int) -> None:
        """Clip, step, and record the step's mean loss. Under fp16 an overflowing gradient
        skips the step (the scaler lowers its scale); only MAX_SKIPS in a row diverge."""
        p, config, hooks, scaler = self.p, self.config, self.hooks, self.scaler
        keys = sorted(self.step_terms)
        terms = [self.step_terms[k] for k in keys]
        if self.parallel is not None:
            flags = [step_loss, self.bad_loss, float(self.local_stop()), *terms]
            step_loss, bad, stop, *terms = self.parallel.reduce(self.params, flags)
            self.stop_everywhere, self.bad_loss = stop > 0, 0.0
            if bad > 0:
                raise Diverged(p.step + 1, f"the training loss is {step_loss}")
        for key, value in zip(keys, terms, strict=True):
            p.penalties[key] = p.penalties.get(key, 0.0) + value
        self.step_terms = {}
        scaler.unscale(self.opt)
        finite = True
        if config.max_grad_norm or scaler.enabled:
            clip = config.max_grad_norm or math.inf  # fp16 only needs to see the norm
            norm = clip_gradients(self.params, clip)
            finite = math.isfinite(norm)
            if not finite and not scaler.enabled:
                raise Diverged(p.step + 1, f"the gradient norm is {norm}")
        if hooks.on_grads is not None and finite:
            hooks.on_grads(p.step + 1)
        if scaler.step(self.opt):
            self.sched.step()  # a step fp16's scaler skipped does not advance the schedule
        elif scaler.skips >= MAX_SKIPS:
            raise Diverged(p.step + 1, scaler.overflow())
        self.opt.zero_grad(set_to_none=True)
        p.step += 1
        if hooks.after_step is not None:
            hooks.after_step(p.step)
        p.loss_sum += step_loss
        p.loss_count += step_batches
        p.curve.append((p.step, step_loss / step_batches))
