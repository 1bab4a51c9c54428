"""The reference recipe for the time-to-accuracy benchmark: plain transformers + peft LoRA.

A fair, typical user recipe: every text tokenized once up front and padded to max_length,
batch 16 in a shuffled order each epoch, AdamW on the trainable parameters, linear schedule with
6% warmup, gradient clipping at 1.0. Validation accuracy is measured every ``eval_every``
optimizer steps and at the end of each epoch; the training clock pauses while evaluating.

Smoke test: python benchmarks/peft_recipe.py --limit 48 --eval-every 2
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    get_linear_schedule_with_warmup,
)
from transformers.utils import logging as hf_logging

Split = tuple[list[str], list[int]]

EVAL_BATCH = 64
WARMUP_RATIO = 0.06
MAX_GRAD_NORM = 1.0


@dataclass
class RecipeResult:
    curve: list[
        dict[str, float]
    ]  # per evaluation: step, epoch, train_seconds, val_accuracy, train_loss
    seconds_to_target: float | None  # train_seconds at the first eval with val_accuracy >= target
    test_accuracy_final: float
    test_accuracy_best: float
    train_seconds: float
    steps: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _encode(
    tokenizer, split: Split, max_length: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    texts, labels = split
    enc = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return dict(enc), torch.tensor(labels, dtype=torch.long)


@torch.no_grad()
def _accuracy(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    device: torch.device,
) -> float:
    if len(labels) == 0:
        return float("nan")
    model.eval()
    correct = 0
    for start in range(0, len(labels), EVAL_BATCH):
        batch = {k: v[start : start + EVAL_BATCH].to(device) for k, v in inputs.items()}
        logits = model(**batch).logits
        preds = logits.argmax(dim=-1).cpu()
        correct += int((preds == labels[start : start + EVAL_BATCH]).sum())
    model.train()
    return correct / len(labels)


def run_peft_recipe(
    model_dir: Path,
    train: Split,
    val: Split,
    test: Split,
    num_labels: int,
    *,
    epochs: int = 3,
    eval_every: int = 10,
    target: float = 0.95,
    stop_at: float | None = None,
    seed: int = 0,
    max_length: int = 128,
    batch_size: int = 16,
    lr: float = 5e-4,
    log: Callable[[str], None] | None = print,
    device: str | torch.device = "cpu",
) -> RecipeResult:
    """Train LoRA (r=8, alpha=16, dropout 0.1, query+value) with peft and record the curve."""
    dev = torch.device(device)
    say = log if log is not None else (lambda _msg: None)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_x, train_y = _encode(tokenizer, train, max_length)
    val_x, val_y = _encode(tokenizer, val, max_length)
    test_x, test_y = _encode(tokenizer, test, max_length)

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=8,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=["query", "value"],
    )
    model = get_peft_model(model, config)
    model.to(dev)
    model.train()

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    n_train = len(train_y)
    steps_per_epoch = math.ceil(n_train / batch_size)
    total_steps = max(1, epochs * steps_per_epoch)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, math.ceil(WARMUP_RATIO * total_steps), total_steps
    )

    curve: list[dict[str, float]] = []
    seconds_to_target: float | None = None
    best_acc = -1.0
    best_state: dict[str, torch.Tensor] | None = None
    train_seconds = 0.0
    step = 0
    losses: list[float] = []
    last_eval_step = -1
    stop = False

    def evaluate(epoch: float) -> bool:
        """Record one point of the curve; True when training should stop."""
        nonlocal seconds_to_target, best_acc, best_state, last_eval_step
        acc = _accuracy(model, val_x, val_y, dev)
        loss = sum(losses) / len(losses) if losses else float("nan")
        losses.clear()
        last_eval_step = step
        curve.append(
            {
                "step": float(step),
                "epoch": epoch,
                "train_seconds": train_seconds,
                "val_accuracy": acc,
                "train_loss": loss,
            }
        )
        say(
            f"step {step:5d}  epoch {epoch:5.2f}  train {train_seconds:8.2f}s  "
            f"loss {loss:.4f}  val acc {acc:.4f}"
        )
        if acc > best_acc:
            best_acc = acc
            best_state = {
                name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
            }
        if seconds_to_target is None and acc >= target:
            seconds_to_target = train_seconds
        return stop_at is not None and acc >= stop_at

    for epoch in range(epochs):
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, n_train, batch_size):
            _sync(dev)
            t0 = time.perf_counter()
            idx = order[start : start + batch_size]
            batch = {k: v[idx].to(dev) for k, v in train_x.items()}
            out = model(**batch, labels=train_y[idx].to(dev))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = out.loss.item()
            _sync(dev)
            train_seconds += time.perf_counter() - t0
            losses.append(loss_value)
            step += 1
            if eval_every > 0 and step % eval_every == 0:
                stop = evaluate(step / steps_per_epoch)
                if stop:
                    break
        if stop:
            break
        if last_eval_step != step:
            stop = evaluate(float(epoch + 1))
            if stop:
                break

    if not curve:  # no training step at all: still report one point
        stop = evaluate(0.0)

    test_final = _accuracy(model, test_x, test_y, dev)
    test_best = test_final
    if best_state is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in best_state:
                    p.copy_(best_state[name])
        test_best = _accuracy(model, test_x, test_y, dev)
    say(
        f"done: {step} steps, {train_seconds:.2f}s training, best val {best_acc:.4f}, "
        f"test final {test_final:.4f}, test best-on-val {test_best:.4f}"
    )
    return RecipeResult(
        curve=curve,
        seconds_to_target=seconds_to_target,
        test_accuracy_final=test_final,
        test_accuracy_best=test_best,
        train_seconds=train_seconds,
        steps=step,
    )


def main() -> None:
    from leantune.core.defaults import bbc_news, minilm_dir
    from leantune.models.data import stratified_split

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N examples of each split")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    data = bbc_news()
    splits: list[Split] = []
    for indices in stratified_split(data.labels, (0.7, 0.1, 0.2), seed=0):
        if args.limit is not None:
            indices = indices[: args.limit]
        splits.append(([data.texts[i] for i in indices], [data.labels[i] for i in indices]))
    train, val, test = splits
    result = run_peft_recipe(
        minilm_dir(),
        train,
        val,
        test,
        len(data.label_names),
        epochs=args.epochs,
        eval_every=args.eval_every,
        seed=args.seed,
        device=args.device,
    )
    print(result)


if __name__ == "__main__":
    main()
