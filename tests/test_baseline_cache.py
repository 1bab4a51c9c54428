"""The original model's answers kept between causal runs (tune/baseline_cache.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from helpers import chat_model_folder, tiny_model_folder
from leantune.models.loading import load_model
from leantune.tune import TuneConfig, run_tune
from leantune.tune.baseline_cache import baseline_key, weights_digest


def _chat_data(path: Path) -> Path:
    pairs = [("goal", "sport"), ("chip", "tech"), ("bank", "business")] * 10
    rows = [{"prompt": f"{w} {w} news. Which topic?", "response": t} for w, t in pairs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _instruct(tmp_path: Path) -> dict[str, Any]:
    return {
        "task": "instruct",
        "model": str(chat_model_folder(tmp_path / "chat")),
        "data": str(_chat_data(tmp_path / "chat.jsonl")),
        "runs_dir": str(tmp_path / "runs"),
        "epochs": 1,
        "reference_examples": 0,
        "gen_examples": 3,
        "max_new_tokens": 4,
        "general_examples": 6,
    }


def _before(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k.endswith("_before")}


def test_a_second_run_from_the_same_start_reads_the_answers_back(tmp_path: Path) -> None:
    values = _instruct(tmp_path)
    said: list[str] = []
    first = run_tune(TuneConfig(**values, name="a"), log=said.append)
    assert not any("answers read from" in s for s in said)
    assert len(list((tmp_path / "leantune-cache" / "baseline").glob("*.json"))) == 1
    said.clear()  # options that act only in training (lr, epochs) keep the start the same
    second = run_tune(TuneConfig(**(values | {"epochs": 2}), name="b", lr=1e-2), log=said.append)
    assert any("answers read from" in s for s in said)
    assert _before(second) == _before(first) and "general_before" in _before(first)
    history = [json.loads((Path(s["run"]) / "history.json").read_text()) for s in (first, second)]
    base = [[r["base_answer"] for r in h["general"]] for h in history]
    assert base[0] == base[1]


def test_the_key_follows_the_weights_and_the_test_split(tmp_path: Path) -> None:
    model = load_model(tiny_model_folder(tmp_path / "llama", "llama"), "causal-lm")
    config = TuneConfig(task="causal-lm", model="m", data="d")
    key = baseline_key(config, model, [[1, 2, 3]])
    assert key == baseline_key(config, model, [[1, 2, 3]])
    assert key != baseline_key(config, model, [[1, 2, 4]])
    assert key == baseline_key(
        TuneConfig(task="causal-lm", model="m", data="d", lr=1.0), model, [[1, 2, 3]]
    )
    for other in ({"seed": 1}, {"max_new_tokens": 5}, {"general_examples": 3}):
        changed = TuneConfig(task="causal-lm", model="m", data="d", **other)  # type: ignore[arg-type]
        assert baseline_key(changed, model, [[1, 2, 3]]) != key
    digest = weights_digest(model)
    with torch.no_grad():
        p = next(model.parameters())
        p.view(-1)[0] += 1e-6  # one element of one tensor
    assert weights_digest(model) != digest
    assert baseline_key(config, model, [[1, 2, 3]]) != key
