"""Schedules, per-parameter rates, gradual unfreezing and penalties on the change."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import leantune as lt
from helpers import build, tiny_model_folder, topic_rows, write_rows
from leantune.adapters.methods.bitfit import BitFitConfig
from leantune.adapters.methods.lora.config import LoraConfig
from leantune.adapters.methods.lora.math import lora_l2
from leantune.adapters.methods.sparse import SparseConfig
from leantune.train.checkpoint import trainable_parameters
from leantune.train.interface import TrainConfig, TrainHooks
from leantune.train.loop import param_groups, train
from leantune.train.regularize import Penalty, fisher_diagonal
from leantune.train.schedule import (
    SLANTED_RATIO,
    Unfreezer,
    adapter_lr_scales,
    lr_lambda,
    lr_scales,
)
from leantune.tune import TuneConfig, run_tune
from test_loop import accuracy, toy_batches


@pytest.mark.parametrize("step", [0, 1, 3, 4, 10, 19, 20])
def test_each_schedule_matches_its_formula(step: int) -> None:
    total, warmup = 20, 4
    rise = (step + 1) / warmup
    done = (step - warmup) / (total - warmup)
    want = {
        "linear": rise if step < warmup else max(0.0, 1 - done),
        "cosine": rise if step < warmup else 0.5 * (1 + math.cos(math.pi * min(1.0, done))),
        "constant": rise if step < warmup else 1.0,
    }
    for kind, value in want.items():
        assert lr_lambda(kind, total, warmup)(step) == pytest.approx(value), kind
    p = step / warmup if step < warmup else max(0.0, 1 - (step - warmup) / (total - warmup))
    slanted = (1 + p * (SLANTED_RATIO - 1)) / SLANTED_RATIO
    assert lr_lambda("slanted", total, warmup)(step) == pytest.approx(slanted)


def test_layer_decay_and_loraplus_scale_the_right_parameters() -> None:
    model = build("bert")
    lt.inject(model, lt.LoraConfig(r=2, targets=["query", "value"]))
    named = trainable_parameters(model)
    plus = adapter_lr_scales(model, loraplus_ratio=16)
    scales = lr_scales(named, n_layers=3, layer_decay=0.5, adapters=plus)
    q0 = "bert.encoder.layer.0.attention.self.query.lora.default"
    q2 = "bert.encoder.layer.2.attention.self.query.lora.default"
    assert scales[f"{q2}.A"] == 1.0 and scales[f"{q2}.B"] == 16.0
    assert scales[f"{q0}.A"] == 0.25 and scales[f"{q0}.B"] == 4.0
    assert scales["classifier.weight"] == 1.0
    groups = param_groups(named, 1e-3, scales)
    by_id = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert by_id[id(named[f"{q0}.B"])] == pytest.approx(4e-3)


def test_gradual_unfreezing_flips_flags_on_schedule_and_updates_late_groups() -> None:
    model = build("bert")
    lt.inject(model, lt.LoraConfig(r=2, targets="all-linear"))
    named = trainable_parameters(model)
    batches = toy_batches(n=48, batch=8)  # 6 steps an epoch, 2 epochs
    unfreezer = Unfreezer(named, n_layers=3, every=4, total=12)
    assert len(unfreezer.groups) == 3
    seen: list[tuple[int, bool, bool, bool]] = []
    layer = "bert.encoder.layer.{}.attention.self.query.lora.default.B"

    def record(step: int) -> None:
        unfreezer.apply(step)
        seen.append((step, *(named[layer.format(i)].requires_grad for i in (2, 1, 0))))

    b0 = {i: named[layer.format(i)].detach().clone() for i in range(3)}
    train(
        model,
        lambda e: batches,
        lambda m: accuracy(m, batches),
        TrainConfig(epochs=2, lr=1e-2),
        TrainHooks(unfreeze=record),
    )
    flags = {step: f for step, *f in seen}
    assert flags[0] == [True, False, False] and flags[3] == [True, False, False]
    assert flags[4] == [True, True, False] and flags[8] == [True, True, True]
    # Layer 0 joined at step 8 and was updated in the four steps after it.
    for i in range(3):
        assert not torch.equal(named[layer.format(i)].detach(), b0[i]), i


def test_a_schedule_that_never_unfreezes_is_refused() -> None:
    model = build("bert")
    lt.inject(model, lt.LoraConfig(r=2, targets="all-linear"))
    named = trainable_parameters(model)
    with pytest.raises(lt.LeantuneError, match="only 2 of 3 layer groups"):
        Unfreezer(named, n_layers=3, every=10, total=12)
    one = build("bert")
    lt.inject(one, lt.LoraConfig(r=2, targets="all-linear", layers=[2]))
    with pytest.raises(lt.LeantuneError, match="nothing to unfreeze"):
        Unfreezer(trainable_parameters(one), n_layers=3, every=2, total=12)
    for bad in ({"l2": -1.0}, {"ewc": -0.1}, {"layer_decay": 0.0}, {"layer_decay": 1.5}):
        with pytest.raises(lt.LeantuneError):
            TuneConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(lt.LeantuneError, match="schedule"):
        TuneConfig(schedule="wavy")


def _lora_model() -> torch.nn.Module:
    model = build("bert")
    lt.inject(model, lt.LoraConfig(r=3, alpha=6, targets=["query"], layers=[1]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lt.adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_lora_penalties_have_the_gradient_of_their_closed_form() -> None:
    model = _lora_model()
    layer = model.bert.encoder.layer[1].attention.self.query
    a = layer.adapter("default")
    fisher = {"bert.encoder.layer.1.attention.self.query.weight": torch.rand(32, 32)}
    for key, weight in (("l2", 0.3), ("l1", 0.2), ("ewc", 0.5)):
        penalty = Penalty(model, **{key: weight}, fisher=fisher, skip=["classifier"])
        got = torch.autograd.grad(penalty(model)[key], [a.A, a.B])
        delta = a.scaling * a.B @ a.A  # the closed form, built in full
        closed = {
            "l2": delta.pow(2).sum(),
            "l1": delta.abs().sum(),
            "ewc": (
                fisher["bert.encoder.layer.1.attention.self.query.weight"] * delta.pow(2)
            ).sum(),
        }[key]
        want = torch.autograd.grad(weight * closed, [a.A, a.B])
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        full = (a.scaling * a.B @ a.A).pow(2).sum()
        assert float(lora_l2(a.A, a.B, a.scaling)) == pytest.approx(float(full), rel=1e-5)


def test_delta_and_in_place_penalties_match_their_closed_form() -> None:
    model = build("bert")
    q = "bert.encoder.layer.1.attention.self.query"
    lt.inject(model, BitFitConfig(targets=[q]))
    bias = model.get_submodule(q).delta["default"].bias
    with torch.no_grad():
        bias.copy_(torch.randn(32))
    f = torch.rand(32)
    penalty = Penalty(model, l2=2.0, l1=1.0, ewc=3.0, fisher={f"{q}.bias": f}, skip=["classifier"])
    terms = penalty(model)
    assert float(terms["l2"]) == pytest.approx(2.0 * float(bias.detach().pow(2).sum()), rel=1e-5)
    assert float(terms["l1"]) == pytest.approx(float(bias.detach().abs().sum()), rel=1e-5)
    assert float(terms["ewc"]) == pytest.approx(
        3.0 * float((f * bias.detach().pow(2)).sum()), rel=1e-5
    )
    # In-place (full) tuning: L2-SP against a copy of the starting values.
    full = build("bert")
    p = full.bert.encoder.layer[0].output.dense.weight
    sp = Penalty(full, l2=1.0, skip=["classifier"])
    assert float(sp(full)["l2"]) == 0.0
    with torch.no_grad():
        p.add_(0.1)
    assert float(sp(full)["l2"]) == pytest.approx(0.01 * p.numel(), rel=1e-4)


def test_l2_sp_with_a_huge_weight_keeps_the_pretrained_weights() -> None:
    batches = toy_batches()

    def drift(l2: float) -> float:
        model = build("bert")
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        penalty = Penalty(model, l2=l2, skip=["classifier"]) if l2 else None
        train(
            model,
            lambda e: batches,
            lambda m: accuracy(m, batches),
            TrainConfig(epochs=2, lr=1e-3),
            TrainHooks(penalty=penalty),
        )
        return max(
            float((p - start[n]).abs().max())
            for n, p in model.named_parameters()
            if not n.startswith("classifier")
        )

    free, held = drift(0.0), drift(1e6)
    assert held < 0.1 * free


def test_sparse_ewc_uses_the_fisher_of_the_masked_entries() -> None:
    model = build("bert")
    q = "bert.encoder.layer.1.attention.self.query"
    mask = torch.tensor([0, 5, 40])
    lt.inject(model, SparseConfig(targets=[q], masks={q: mask}))
    values = model.get_submodule(q).delta["default"].values
    with torch.no_grad():
        values.copy_(torch.tensor([1.0, 2.0, 3.0]))
    f = torch.rand(32, 32)
    terms = Penalty(model, ewc=1.0, fisher={f"{q}.weight": f}, skip=["classifier"])(model)
    want = (f.flatten()[mask] * values.detach().pow(2)).sum()
    assert float(terms["ewc"]) == pytest.approx(float(want), rel=1e-5)


def test_fisher_diagonal_is_the_mean_squared_gradient() -> None:
    model = build("bert")
    batches = toy_batches(n=16, batch=8)
    name = "bert.encoder.layer.0.output.dense.weight"
    got = fisher_diagonal(model, batches, [name])[name]
    want = torch.zeros_like(got)
    for b in batches:
        model.zero_grad()
        model.eval()
        model(**b).loss.backward()
        want += model.get_parameter(name).grad.pow(2) / 2  # type: ignore[union-attr]
    torch.testing.assert_close(got, want)


def test_tune_runs_with_every_gradual_option_and_logs_penalties_apart(tmp_path: Path) -> None:
    model = tiny_model_folder(tmp_path / "tiny-bert")
    data = write_rows(tmp_path / "topics.jsonl", topic_rows(60))
    summary = run_tune(
        TuneConfig(
            model=str(model),
            data=str(data),
            runs_dir=str(tmp_path / "runs"),
            name="g",
            epochs=2,
            batch_size=8,
            layers="all",
            schedule="cosine",
            layer_decay=0.8,
            loraplus_ratio=4,
            unfreeze_every=2,
            l2=0.01,
            ewc=0.1,
            reference_examples=0,
        )
    )
    lines = (tmp_path / "runs" / "g" / "metrics.jsonl").read_text().splitlines()
    assert all('"train_l2"' in line and '"train_ewc"' in line for line in lines)
    assert summary["trainable_params"] > 0 and 0 <= summary["test_accuracy"] <= 1


def test_embeddings_are_found_by_position_not_name() -> None:
    model = build("gpt2")  # wte / wpe: no "embed" in their names
    named = dict(model.named_parameters())
    scales = lr_scales(named, n_layers=2, layer_decay=0.5)
    assert scales["transformer.wte.weight"] == 0.25 and scales["transformer.wpe.weight"] == 0.25
    assert scales["transformer.h.0.attn.c_attn.weight"] == 0.5
    assert scales["transformer.ln_f.weight"] == 1.0 and scales["lm_head.weight"] == 1.0
    with pytest.raises(lt.LeantuneError, match="layer stack"):
        lr_scales(named, n_layers=None, layer_decay=0.5)


def test_penalties_are_refused_where_the_lora_update_is_not_the_change() -> None:
    for bad in ({"init": "pissa"}, {"dora": True}):
        with pytest.raises(lt.LeantuneError, match="PiSSA or DoRA"):
            TuneConfig(l2=0.1, **bad)  # type: ignore[arg-type]
    TuneConfig(method="sparse", plan="plan.json")  # a resumed sparse run reads its plan


def test_l2_defaults_to_the_measured_weight_for_plain_lora_only() -> None:
    assert TuneConfig().resolved().l2 == LoraConfig().default_l2() > 0
    assert TuneConfig(l2=0.0).resolved().l2 == 0.0  # switched off on request
    for other in ({"dora": True}, {"init": "pissa"}, {"method": "full"}, {"method": "bitfit"}):
        assert TuneConfig(**other).resolved().l2 == 0.0  # type: ignore[arg-type]
