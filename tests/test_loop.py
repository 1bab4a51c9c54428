"""The training loop on a tiny BERT: it learns, schedules, stops early, keeps the best."""

from __future__ import annotations

import pytest
import torch

import leantune as lt
from conftest import build
from leantune.train.loop import TrainConfig, train, warmup_linear


def toy_batches(n: int = 48, batch: int = 8) -> list[dict[str, torch.Tensor]]:
    """Label = whether token 5 appears: learnable from the embeddings."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 64, (n, 10), generator=g)
    labels = torch.arange(n) % 2
    ids[labels == 1, 3] = 5
    return [
        {"input_ids": ids[i : i + batch], "labels": labels[i : i + batch]}
        for i in range(0, n, batch)
    ]


def accuracy(model: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    right = sum(
        (model(input_ids=b["input_ids"]).logits.argmax(-1) == b["labels"]).sum().item()
        for b in data
    )
    return {"accuracy": right / sum(len(b["labels"]) for b in data)}


def test_loop_learns_and_keeps_best() -> None:
    model = build("bert")  # the loop trains whatever requires grad: here, everything
    data = toy_batches()
    kept: list[float] = []
    result = train(
        model,
        lambda epoch: data,
        lambda m: accuracy(m, data),
        TrainConfig(epochs=8, lr=3e-3, seed=0),
        on_best=lambda m, row: kept.append(row["accuracy"]),
    )
    assert result.best is not None and result.best["accuracy"] >= 0.9
    assert kept == sorted(kept) and kept[-1] == result.best["accuracy"]
    assert result.steps == 8 * len(data) and len(result.history) == 8
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_early_stopping_after_patience() -> None:
    model = build("bert")
    lt.inject(model, lt.LoraConfig(r=2, targets=["query"]))
    scores = iter([0.5, 0.6, 0.55, 0.58, 0.9, 0.9])
    result = train(
        model,
        lambda e: toy_batches(16),
        lambda m: {"accuracy": next(scores)},
        TrainConfig(epochs=6, patience=2),
    )
    assert result.stopped_early and len(result.history) == 4
    assert result.best is not None and result.best["accuracy"] == 0.6


def test_same_seed_same_run_and_grad_accum() -> None:
    def run(accum: int) -> list[float]:
        model = build("bert")
        lt.inject(model, lt.LoraConfig(r=2, targets=["query"], dropout=0.1))
        data = toy_batches()
        res = train(
            model,
            lambda e: data,
            lambda m: {"accuracy": 0.0},
            TrainConfig(epochs=2, grad_accum=accum),
        )
        assert res.steps == 2 * -(-len(data) // accum)
        return [h["train_loss"] for h in res.history]

    assert run(1) == run(1)
    assert run(2) != run(1)


def test_schedule_and_bad_settings() -> None:
    f = warmup_linear(total=10, warmup=2)
    assert [round(f(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    with pytest.raises(lt.LeantuneError, match="learning rate"):
        TrainConfig(lr=0)
    with pytest.raises(lt.LeantuneError, match="no trainable parameters"):
        model = build("bert")
        for p in model.parameters():
            p.requires_grad_(False)
        train(model, lambda e: toy_batches(), lambda m: {"accuracy": 0.0}, TrainConfig())
