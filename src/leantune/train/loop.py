"""The one training loop. The method is whatever the model holds: the loop trains the parameters
that require grad, nothing else, so LoRA, full fine-tuning and head-only share every line.

AdamW over trainable parameters only, warmup then linear decay, gradient accumulation and
clipping, evaluation every epoch (and every N optimizer steps if asked), early stopping on a
chosen metric, a callback on each new best, checkpoints that resume to the same result, and
Ctrl-C that finishes the current optimizer step, saves a checkpoint and returns.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from leantune.errors import LeantuneError

Batch = Mapping[str, torch.Tensor]
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
LATEST = "latest.json"


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

    def __post_init__(self) -> None:
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

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.train_seconds if self.train_seconds else 0.0


# ---------------------------------------------------------------------------- checkpoints


def param_groups(
    params: Mapping[str, nn.Parameter] | list[nn.Parameter],
    lr: float,
    scales: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer groups by rate multiplier: ``scales[name]``, else the parameter's ``lr_scale``
    attribute (a method sets it, e.g. sparse entries), else 1."""
    named = params if isinstance(params, Mapping) else {str(i): p for i, p in enumerate(params)}
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in named.items():
        scale = (scales or {}).get(name, float(getattr(p, "lr_scale", 1.0)))
        groups.setdefault(scale, []).append(p)
    return [{"params": ps, "lr": lr * s, "lr_scale": s} for s, ps in groups.items()]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def latest_checkpoint(directory: Path) -> Path | None:
    """The folder of the newest complete checkpoint in ``directory``, or None.

    A checkpoint is one unit: ``step-NNNNNNN/`` holds the tensors, the progress and any extra
    files (the best weights), and ``latest.json`` names it. The pointer is replaced by one
    rename after the unit is whole, so a kill at any moment leaves the previous unit in force.
    """
    pointer = Path(directory) / LATEST
    try:
        name = json.loads(pointer.read_text())["folder"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LeantuneError(f"checkpoint pointer {pointer} is unreadable ({e})") from None
    folder = Path(directory) / str(name)
    if Path(name).name != name or not (folder / STATE_JSON).is_file():
        raise LeantuneError(f"checkpoint pointer {pointer} names {name!r}, which is incomplete")
    return folder


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    progress: Progress,
    params: Mapping[str, nn.Parameter] | None = None,
    extra: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Trainable weights, optimizer moments and RNG state in safetensors; the rest in JSON.

    ``extra`` adds safetensors files to the unit (name → tensors); extra files of the previous
    unit that are not given again are carried over (hard-linked). ``meta`` is stored beside
    the progress and read back by :func:`checkpoint_meta`. Returns the unit's folder.
    """
    params = trainable_parameters(model) if params is None else params
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    opt_state = opt.state_dict()
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"opt.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    info = {
        "progress": asdict(progress),
        "param_groups": opt_state["param_groups"],
        "scheduler": {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"},
        "meta": dict(meta or {}),
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    previous = latest_checkpoint(directory)
    unit = directory / f"step-{progress.step:07d}"
    n = 0
    while unit.exists():  # the same step again (Ctrl-C after an evaluation), or a torn unit
        n += 1
        unit = directory / f"step-{progress.step:07d}.{n}"
    unit.mkdir()
    save_file(tensors, str(unit / STATE_TENSORS), metadata={"format": "pt"})
    for name, file_tensors in (extra or {}).items():
        save_file(dict(file_tensors), str(unit / name), metadata={"format": "pt"})
    if previous is not None:
        for old in previous.iterdir():
            if old.name not in (STATE_TENSORS, STATE_JSON) and not (unit / old.name).exists():
                try:
                    os.link(old, unit / old.name)
                except OSError:
                    shutil.copy2(old, unit / old.name)
    (unit / STATE_JSON).write_text(json.dumps(info))  # last: a unit with it is whole
    tmp = directory / f".{LATEST}.tmp"
    tmp.write_text(json.dumps({"folder": unit.name, "step": progress.step}))
    os.replace(tmp, directory / LATEST)  # the one switch
    for stale in directory.iterdir():  # older units and units a kill left half-written
        if stale.is_dir() and stale != unit and re.fullmatch(r"step-\d{7}(\.\d+)?", stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    return unit


def checkpoint_meta(directory: Path) -> dict[str, Any]:
    """The ``meta`` stored with the newest checkpoint ({} when there is none)."""
    unit = latest_checkpoint(directory)
    if unit is None:
        return {}
    return dict(json.loads((unit / STATE_JSON).read_text()).get("meta") or {})


def load_checkpoint(
    directory: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    params: Mapping[str, nn.Parameter] | None = None,
) -> Progress:
    unit = latest_checkpoint(directory)
    if unit is None:
        raise LeantuneError(f"no checkpoint in {directory}; start the run without --resume")
    try:
        meta = json.loads((unit / STATE_JSON).read_text())
        tensors = load_file(str(unit / STATE_TENSORS))
    except (OSError, ValueError) as e:
        raise LeantuneError(f"no usable checkpoint in {unit}: {e}") from None
    params = trainable_parameters(model) if params is None else params
    saved = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    if set(saved) != set(params):
        raise LeantuneError(
            f"checkpoint in {directory} holds {len(saved)} trainable tensors, the model has "
            f"{len(params)}; resume with the run's own config"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"] | {"lr_lambdas": [None] * len(opt.param_groups)})
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    progress = Progress(**meta["progress"])
    progress.curve = [(int(s), float(v)) for s, v in progress.curve]
    return progress


@contextmanager
def _stop_on_sigint() -> Iterator[Callable[[], bool]]:
    """First Ctrl-C asks the loop to stop after the current step; a second one interrupts."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def handler(signum: int, frame: Any) -> None:
        requested.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------- the loop


def train(
    model: nn.Module,
    batches: Callable[[int], Sequence[Batch]],
    evaluate: Callable[[nn.Module], dict[str, float]],
    config: TrainConfig,
    on_best: Callable[[nn.Module, dict[str, float]], None] | None = None,
    log: Callable[[dict[str, float], list[dict[str, float]]], None] | None = None,
    on_step: Callable[[Progress, int], None] | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    forward: Callable[[nn.Module, Batch], Any] | None = None,
    lr_scales: Mapping[str, float] | None = None,
    unfreeze: Callable[[int], Any] | None = None,
    penalty: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None,
    on_grads: Callable[[int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
    checkpoint_extra: Callable[[], Mapping[str, Mapping[str, torch.Tensor]]] | None = None,
    checkpoint_meta: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters.

    ``batches(epoch)`` gives that epoch's batches (the same list each time it is asked for the
    same epoch), each holding the model's inputs and ``labels``. ``evaluate`` returns validation
    metrics; ``log`` sees each evaluation row and the history so far; ``on_step(progress, total_steps)`` runs after
    every optimizer step. With ``checkpoint`` a folder, a checkpoint is written after every
    evaluation and on Ctrl-C; ``resume=True`` continues from it. ``forward(model, batch)``
    replaces ``model(**batch)`` (the frozen-prefix cache uses it). ``lr_scales`` multiplies the
    rate per parameter name; ``unfreeze(step)`` runs before each optimizer step (gradual
    unfreezing); ``penalty(model)`` returns named regularization terms (already weighted) added
    to each batch's loss and logged apart from it. ``on_grads(step)`` sees the clipped gradients
    before each optimizer step and ``after_step(step)`` runs right after it (the adaptive
    budget's importance and masks). ``checkpoint_extra()`` gives files to store in the next
    checkpoint unit (the best weights) and ``checkpoint_meta`` what to store beside its progress.

    A non-finite training loss, penalty or validation loss stops training with
    :class:`Diverged`; the last checkpoint (before the divergence) stays as it was.
    """
    from leantune.train.schedule import lr_lambda

    torch.manual_seed(config.seed)
    named = trainable_parameters(model)  # gradual unfreezing may switch some off below
    params = list(named.values())
    if not params:
        raise LeantuneError("the model has no trainable parameters; inject an adapter first")
    opt = torch.optim.AdamW(
        param_groups(named, config.lr, lr_scales), lr=config.lr, weight_decay=config.weight_decay
    )
    per_epoch = math.ceil(len(batches(0)) / config.grad_accum)
    total = per_epoch * config.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(config.schedule, total, round(total * config.warmup_ratio))
    )
    if resume:
        if checkpoint is None:
            raise LeantuneError("resume needs a checkpoint folder")
        progress = load_checkpoint(checkpoint, model, opt, sched, named)
    else:
        progress = Progress()
    p = progress
    sign = 1.0 if config.higher_is_better else -1.0
    limit = min(total, config.max_steps or total)
    device = params[0].device

    def result(stopped_early: bool, interrupted: bool = False) -> TrainResult:
        return TrainResult(
            p.best, p.step, stopped_early, p.seconds, p.examples, p.history, p.curve, interrupted
        )

    def save(directory: Path) -> None:
        extra = checkpoint_extra() if checkpoint_extra is not None else None
        save_checkpoint(directory, model, opt, sched, p, named, extra, checkpoint_meta)

    def run_eval() -> bool:
        """Evaluate, keep the best, checkpoint, and say whether to stop."""
        model.eval()
        with torch.no_grad():
            metrics = dict(evaluate(model))
        model.train()
        if config.metric not in metrics:
            raise LeantuneError(f"metric {config.metric!r} not among {sorted(metrics)}")
        if not all(math.isfinite(v) for v in metrics.values()):
            raise Diverged(p.step, f"validation gives {metrics}")
        row = {
            "step": float(p.step),
            "epoch": round(p.epoch + (p.batch / len(batches(p.epoch)) if p.batch else 0), 4),
            "train_loss": p.loss_sum / max(1, p.loss_count),
            "train_seconds": p.seconds,
        } | {f"val_{k}": v for k, v in metrics.items()}
        # Regularization terms, logged apart from the task loss (mean per batch).
        row |= {f"train_{k}": v / max(1, p.loss_count) for k, v in p.penalties.items()}
        p.history.append(row)
        p.loss_sum, p.loss_count, p.penalties = 0.0, 0, {}
        key = f"val_{config.metric}"
        if p.best is None or sign * row[key] > sign * p.best[key]:
            p.best, p.bad_evals = row, 0
            if on_best:
                on_best(model, row)
        else:
            p.bad_evals += 1
        if log:
            log(row, p.history)
        if checkpoint is not None:
            save(checkpoint)
        return config.patience is not None and p.bad_evals >= config.patience

    model.train()
    with _stop_on_sigint() as stop_requested:
        while p.epoch < config.epochs and p.step < limit:
            epoch_batches = batches(p.epoch)
            start = time.perf_counter()
            step_loss, step_batches = 0.0, 0
            while p.batch < len(epoch_batches):
                if unfreeze is not None and step_batches == 0:
                    unfreeze(p.step)
                batch = {k: v.to(device) for k, v in epoch_batches[p.batch].items()}
                loss = (forward(model, batch) if forward else model(**batch)).loss
                total_loss = loss
                if penalty is not None:
                    terms = penalty(model)
                    for key, term in terms.items():
                        total_loss = total_loss + term
                        p.penalties[key] = p.penalties.get(key, 0.0) + float(term.detach())
                value = float(total_loss.detach())
                if not math.isfinite(value):
                    # Stop before the update: the weights are those of the last good step.
                    raise Diverged(p.step + 1, f"the training loss is {value}")
                (total_loss / config.grad_accum).backward()
                step_loss, step_batches = step_loss + loss.item(), step_batches + 1
                p.batch += 1
                p.examples += len(batch["labels"])
                if step_batches < config.grad_accum and p.batch != len(epoch_batches):
                    continue
                if config.max_grad_norm:
                    norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    if not math.isfinite(float(norm)):
                        raise Diverged(p.step + 1, f"the gradient norm is {float(norm)}")
                if on_grads is not None:
                    on_grads(p.step + 1)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                p.step += 1
                if after_step is not None:
                    after_step(p.step)
                p.loss_sum += step_loss
                p.loss_count += step_batches
                p.curve.append((p.step, step_loss / step_batches))
                step_loss, step_batches = 0.0, 0
                now = time.perf_counter()
                p.seconds += now - start
                start = now
                if on_step:
                    on_step(p, limit)
                if p.batch == len(epoch_batches):
                    break  # the end-of-epoch evaluation below covers this step
                if config.eval_every and p.step % config.eval_every == 0 and run_eval():
                    return result(True)
                if p.step >= limit:
                    return result(run_eval())
                if stop_requested():
                    if checkpoint is not None:
                        save(checkpoint)
                    return result(False, interrupted=True)
                start = time.perf_counter()
            p.epoch, p.batch = p.epoch + 1, 0
            if run_eval():
                return result(True)
            if stop_requested():
                return result(False, interrupted=True)
    return result(False)
