"""Adaptive budget (AdaLoRA-style rank pruning on LoRA factors): growing keeps the function, the
budget follows its cubic schedule, the lowest-importance components go, masked components stay
zero under Adam, the final adapter is at the target size and loads in peft, bad input."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import leantune as lt
from helpers import build, inputs, logits, tiny_model_folder, topic_rows, write_rows
from leantune.adapters.inject import adapter_layers
from leantune.core.errors import LeantuneError
from leantune.train.adapt import RankPruner
from leantune.tune import TuneConfig, run_tune
from test_contract import randomize


def lora_bert(r: int = 2) -> torch.nn.Module:
    model = build("bert")
    lt.inject(model, lt.LoraConfig(r=r, alpha=2 * r, targets=["query", "value"]))
    randomize(model)
    return model


def units_count(model: torch.nn.Module) -> int:
    return sum(
        layer.adapter("default").A.numel() + layer.adapter("default").B.numel()
        for _, layer in adapter_layers(model)
    )


def test_growing_keeps_the_function_and_counts() -> None:
    model = lora_bert(r=2)
    x = inputs("bert")
    before = logits(model, x)
    target = units_count(model)
    pruner = RankPruner(model, 2.0, 100, start=10, end=70)
    torch.testing.assert_close(logits(model, x), before, atol=1e-6, rtol=1e-6)
    assert pruner.target == target
    assert pruner.initial == units_count(model) == 2 * target
    ranks = {layer.adapter("default").r for _, layer in adapter_layers(model)}
    assert ranks == {4}


def test_budget_is_cubic_between_start_and_end() -> None:
    pruner = RankPruner(lora_bert(), 2.0, 100, start=10, end=70)
    assert pruner.budget(0) == pruner.budget(10) == pruner.initial
    assert pruner.budget(70) == pruner.budget(100) == pruner.target
    gap = pruner.initial - pruner.target
    assert pruner.budget(40) == round(pruner.target + gap * 0.5**3)
    steps = [pruner.budget(s) for s in range(0, 101)]
    assert all(a >= b for a, b in itertools.pairwise(steps))


def test_lowest_importance_components_are_pruned_and_stay_zero() -> None:
    model = lora_bert(r=2)
    pruner = RankPruner(model, 2.0, 100, start=0, end=1)
    # Importance by hand: component j of unit i scores i * 10 + j, so unit 0's are the lowest.
    for i, u in enumerate(pruner.units):
        A, B = u.factors()
        width = A.shape[1] + B.shape[0]
        u.ipt = (i * 10 + torch.arange(u.rank, dtype=torch.float))[:, None].expand(-1, width)
        u.unc = torch.ones_like(u.ipt)
    cost = pruner.units[0].cost
    pruner.prune_to(pruner.initial - 3 * cost)
    assert pruner.units[0].mask.tolist() == [False, False, False, True]  # one component kept
    assert all(bool(u.mask.all()) for u in pruner.units[1:])
    # Adam's moments would move masked entries again; after_step puts them back to zero.
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.1)
    for step in range(1, 4):
        logits(model, inputs("bert")).sum().backward()
        opt.step()
        opt.zero_grad()
        pruner.after_step(step)  # beyond end: prunes to the target
        A, B = pruner.units[0].factors()
        assert A[:3].abs().sum() == 0 and B[:, :3].abs().sum() == 0
    assert pruner.done


def test_finalize_slices_to_the_target_and_keeps_the_function(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = lora_bert(r=2)
    pruner = RankPruner(model, 2.0, 100, start=0, end=1)
    for u in pruner.units:
        u.ipt = torch.rand(u.rank, u.cost)
        u.unc = torch.rand(u.rank, u.cost)
        with torch.no_grad():
            u.factors()[1].normal_()
    pruner.after_step(1)  # at the target: masked components zeroed
    x = inputs("bert")
    before = logits(model, x)
    ranks = pruner.finalize()
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=1e-5)
    assert units_count(model) <= pruner.target
    assert units_count(model) > pruner.target - max(u.cost for u in pruner.units)
    assert sorted(ranks.values()) != [2] * len(ranks)  # uneven
    lt.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(build("bert"), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, x), before, atol=1e-5, rtol=1e-5)


def test_tune_with_adapt_saves_the_target_size(tmp_path: Path) -> None:
    base = {
        "model": str(tiny_model_folder(tmp_path / "bert")),
        "data": str(write_rows(tmp_path / "t.jsonl", topic_rows(60))),
        "runs_dir": str(tmp_path / "runs"),
        "batch_size": 8,
        "epochs": 3,
        "lr": 5e-3,
        "layers": "all",
        "reference_examples": 0,
        "r": 4,
    }
    fixed = run_tune(TuneConfig(name="fixed", **base))  # type: ignore[arg-type]
    adapt = run_tune(TuneConfig(name="adapt", adapt=2.0, **base))  # type: ignore[arg-type]
    assert adapt["adapt_start_params"] > fixed["trainable_params"] >= adapt["trainable_params"]
    assert adapt["best_step"] >= round(0.7 * adapt["steps"])  # a checkpoint at the target size
    saved = json.loads((tmp_path / "runs/adapt/adapter/adapter_config.json").read_text())
    ranks = adapt["adapt_ranks"]
    assert {m: r for m, r in ranks.items() if r != saved["r"]} == saved["rank_pattern"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"adapt": 0.5}, "--adapt must be 1"),
        ({"adapt": 2.0, "dora": True}, "plain LoRA"),
        ({"adapt": 2.0, "method": "bitfit"}, "plain LoRA"),
    ],
)
def test_bad_adapt_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(LeantuneError, match=message):
        TuneConfig(**options)  # type: ignore[arg-type]
