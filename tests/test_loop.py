"""The training loop on a tiny BERT: it learns, schedules, stops early, keeps the best."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

import leantune as lt
from helpers import build
from leantune.train.checkpoint import latest_checkpoint
from leantune.train.interface import Progress, TrainConfig, TrainHooks
from leantune.train.loop import train
from leantune.train.schedule import lr_lambda


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
        TrainHooks(on_best=lambda m, row: kept.append(row["val_accuracy"])),
    )
    assert result.best is not None and result.best["val_accuracy"] >= 0.9
    assert kept == sorted(kept) and kept[-1] == result.best["val_accuracy"]
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
    assert result.best is not None and result.best["val_accuracy"] == 0.6


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
    f = lr_lambda("linear", total=10, warmup=2)
    assert [round(f(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    with pytest.raises(lt.LeantuneError, match="learning rate"):
        TrainConfig(lr=0)
    with pytest.raises(lt.LeantuneError, match="no trainable parameters"):
        model = build("bert")
        for p in model.parameters():
            p.requires_grad_(False)
        train(model, lambda e: toy_batches(), lambda m: {"accuracy": 0.0}, TrainConfig())


def lora_bert() -> torch.nn.Module:
    model = build("bert")
    lt.inject(model, lt.LoraConfig(r=2, targets=["query", "value"], dropout=0.1))
    return model


def shuffled(epoch: int) -> list[dict[str, torch.Tensor]]:
    data = toy_batches(40, 4)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch))
    return [data[i] for i in order]


@pytest.mark.parametrize("stop_at", [3, 10, 13])  # mid-epoch, epoch boundary, after an eval
def test_ctrl_c_then_resume_matches_an_uninterrupted_run(tmp_path: Path, stop_at: int) -> None:
    """SIGINT stops after the current step with a checkpoint; resuming ends where an
    uninterrupted run with the same seed ends: same metrics, same weights."""
    config = TrainConfig(epochs=3, lr=3e-3, grad_accum=2, eval_every=4, seed=1)
    data = toy_batches()
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when started in the background (nohup, &)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        loss = sum(m(**b).loss.item() for b in data)
        return accuracy(m, data) | {"loss": loss}

    straight = lora_bert()
    expected = train(straight, shuffled, evaluate, config)

    def interrupt(progress: Progress, total: int) -> None:
        if progress.step == stop_at:
            signal.raise_signal(signal.SIGINT)

    first = lora_bert()
    cut = train(
        first, shuffled, evaluate, config, TrainHooks(on_step=interrupt), checkpoint=tmp_path
    )
    assert cut.interrupted and cut.steps == stop_at
    assert latest_checkpoint(tmp_path) is not None
    resumed_model = lora_bert()  # a fresh process would rebuild the model the same way
    resumed = train(resumed_model, shuffled, evaluate, config, checkpoint=tmp_path, resume=True)
    assert not resumed.interrupted and resumed.steps == expected.steps
    timeless = [{k: v for k, v in row.items() if k != "train_seconds"} for row in expected.history]
    assert [
        {k: v for k, v in r.items() if k != "train_seconds"} for r in resumed.history
    ] == timeless
    assert resumed.curve == expected.curve
    want = dict(straight.named_parameters())
    for name, p in resumed_model.named_parameters():
        assert torch.equal(p, want[name]), name
    # The handler is removed afterwards: Ctrl-C behaves as it did before the run.
    assert signal.getsignal(signal.SIGINT) is before


def test_max_steps_stops_and_evaluates() -> None:
    res = train(
        lora_bert(),
        lambda e: toy_batches(),
        lambda m: {"accuracy": 0.5},
        TrainConfig(epochs=5, max_steps=4),
    )
    assert res.steps == 4 and len(res.history) == 1 and res.history[0]["step"] == 4
    assert [s for s, _ in res.curve] == [1, 2, 3, 4]


def test_parameters_with_an_lr_scale_get_their_own_rate() -> None:
    from leantune.train.loop import param_groups

    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    groups = param_groups({"a": a, "b": b, "c": c}, 2e-3, {"b": 0.05})
    assert [len(g["params"]) for g in groups] == [2, 1]
    assert groups[0]["lr"] == 2e-3 and groups[1]["lr"] == pytest.approx(1e-4)
    assert groups[1]["params"][0] is b
