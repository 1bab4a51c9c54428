"""`tune --task preference` end to end on a tiny chat Llama built here, one run per objective:
the reward accuracy on the training pairs rises, and the saved adapter loads in peft and gives
the same log-probs; bad preference data is refused with one line, exit 2, nothing written."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import leantune as lt
from helpers import chat_model_folder, snapshot
from leantune.cli import app
from leantune.models.preference import encode_preferences, load_preferences, preference_batch
from leantune.train.preference import Objective, preference_metrics
from leantune.tune import TuneConfig, evaluate_run, run_tune
from leantune.tune.options import OBJECTIVES

TOPICS = ["sport", "tech", "business"]
WORDS = {
    "sport": "match goal team win cup",
    "tech": "phone chip software web data",
    "business": "shares profit bank market sales",
}


def pairs(n: int) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        topic = TOPICS[i % 3]
        words = WORDS[topic].split()
        text = " ".join(words[(i + j) % 5] for j in range(6))
        out.append({"prompt": f"{text}. Which topic?", "chosen": topic, "rejected": "no idea"})
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pref")
    corpus = [f"{r['prompt']} {r['chosen']}" for r in pairs(30)]
    model = chat_model_folder(root / "chat", extra=corpus)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs(40)))
    return model, data


def config(model: Path, data: Path, runs: Path, objective: str, **extra: Any) -> TuneConfig:
    values: dict[str, Any] = {
        "task": "preference",
        "objective": objective,
        "model": str(model),
        "data": str(data),
        "runs_dir": str(runs),
        "name": objective,
        "epochs": 3,
        "batch_size": 8,
        "lr": 2e-2,
        "beta": 0.5,
        "layers": "all",
        "reference_examples": 0,
        "general_examples": 0,
        "split": "0.8,0.1,0.1",
    }
    return TuneConfig(**(values | extra))


def training_accuracy(model: Any, tok: Any, data: Path, objective: str) -> float:
    examples = load_preferences(data)
    if objective == "kto":
        from leantune.models.preference import unpaired

        examples = unpaired(examples)
    tokens = encode_preferences(tok, examples, 128)
    rows = list(range(len(tokens)))
    batches = [
        preference_batch(tokens, rows[k : k + 16], tok.pad_token_id)
        for k in range(0, len(rows), 16)
    ]
    obj = Objective(objective, beta=0.5)
    return preference_metrics(obj, model, batches, torch.device("cpu"))["reward_accuracy"]


def logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sequence log-probs of the labelled tokens from the model's full logits."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logp = out.logits[:, :-1].float().log_softmax(-1)
    target = batch["labels"][:, 1:]
    keep = target != -100
    token = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    return (token * keep).sum(-1)


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_trains_and_its_adapter_loads_in_peft(
    world: tuple[Path, Path], tmp_path: Path, objective: str
) -> None:
    model_dir, data = world
    summary = run_tune(config(model_dir, data, tmp_path / "runs", objective))
    run = tmp_path / "runs" / objective
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tuned = lt.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), run / "adapter")
    tuned.eval()
    if objective in ("dpo", "ipo", "kto"):  # rewards against the reference: 0 at the start
        before = 0.0
    else:
        before = training_accuracy(base, tok, data, objective)
    after = training_accuracy(tuned, tok, data, objective)
    assert after > before and after >= 0.6, (before, after)
    saved = json.loads((run / "summary.json").read_text())
    assert saved["test_reward_accuracy"] == summary["test_reward_accuracy"]
    assert saved["test_reward_accuracy"] > saved["test_reward_accuracy_before"]
    if objective == "dpo":  # the policy starts as the reference: every pair's loss is log 2
        assert saved["test_loss_before"] == pytest.approx(math.log(2), rel=1e-5)
        again = evaluate_run(run)  # leantune eval: the reference live, not precomputed
        assert again["reward_accuracy"] == saved["test_reward_accuracy"]
        assert again["loss"] == pytest.approx(saved["test_loss"], rel=1e-4)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), run / "adapter"
    )
    tokens = encode_preferences(tok, load_preferences(data)[:6], 128)
    batch = preference_batch(tokens, list(range(6)), tok.pad_token_id)
    ours, theirs = logps(tuned, batch), logps(peft_model.eval(), batch)
    assert not torch.allclose(ours, logps(base, batch), atol=1e-3)  # the adapter changed them
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)


def invoke(*args: str) -> subprocess.CompletedProcess[str]:
    res = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(list(args), res.exit_code, res.stdout, res.stderr)


BAD = {
    "empty completion": (
        {"prompt": "Which topic?", "chosen": "sport", "rejected": "  "},
        "line 3: column 'rejected' is empty",
    ),
    "chosen equals rejected": (
        {"prompt": "Which topic?", "chosen": "sport", "rejected": "sport"},
        "line 3: chosen and rejected are the same answer",
    ),
    "missing column": (None, "has no column 'rejected'"),
    "empty kto completion": (
        {"prompt": "Which topic?", "completion": "", "label": True},
        "line 3: column 'completion' is empty",
    ),
    "kto label": (
        {"prompt": "Which topic?", "completion": "sport", "label": "maybe"},
        "line 3: column 'label' holds 'maybe'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_preference_data(world: tuple[Path, Path], tmp_path: Path, case: str) -> None:
    model_dir, _ = world
    row, expected = BAD[case]
    good: list[dict[str, Any]] = pairs(4)
    if row is not None and "completion" in row:
        good = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in good]
    if row is None:  # no rejected column anywhere
        good = [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in good]
        rows = good
    else:
        rows = [*good[:2], row, *good[2:]]
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = snapshot(tmp_path)
    res = invoke(
        "tune", "--task", "preference", "--model", str(model_dir), "--data", str(data),
        "--runs-dir", str(tmp_path / "runs"), "--objective", "kto" if "kto" in case else "dpo",
    )  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith("leantune: ") and res.stderr.count("\n") == 1, res.stderr
    assert str(data) in res.stderr and expected in res.stderr, res.stderr
    assert snapshot(tmp_path) == before  # nothing written


def test_several_processes_are_refused_before_anything_is_written(
    world: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several processes split a batch's rows (chosen rows first, then the rejected), which
    would pair a chosen answer with another chosen one: refused in one line."""
    model_dir, _ = world
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs(4)))
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it (no RANK: no process group)
    before = snapshot(tmp_path)
    res = invoke(
        "tune", "--task", "preference", "--model", str(model_dir), "--data", str(data),
        "--runs-dir", str(tmp_path / "runs"),
    )  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith("leantune: ") and res.stderr.count("\n") == 1, res.stderr
    assert "runs in one process" in res.stderr
    assert snapshot(tmp_path) == before
