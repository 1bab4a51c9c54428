"""Tokenizers that return more than the model takes (issue 25): a BERT-style tokenizer gives
``token_type_ids`` beside a causal LM (Falcon's does this), or beside an encoder whose forward
has no such input (DistilBERT). Every path gives the model only what its forward names."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification
from typer.testing import CliRunner

from helpers import chat_model_folder, tiny_model_folder, topic_rows, write_rows
from leantune.cli import app
from leantune.models.loading import model_inputs
from leantune.tune import make_config, run_tune
from test_instruct_tune import rows
from test_keep import reference_file

WITH_TYPES = ["input_ids", "token_type_ids", "attention_mask"]


def returns_token_types(folder: Path) -> Path:
    """Make the saved tokenizer of ``folder`` return token_type_ids."""
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["model_input_names"] = WITH_TYPES
    config_file.write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(folder)
    assert "token_type_ids" in tok(["a b"], return_tensors="pt")
    return folder


@pytest.fixture
def chat(tmp_path: Path) -> tuple[Path, Path]:
    corpus = [f"{r['prompt']} {r['response']}" for r in rows(30)]
    model = returns_token_types(chat_model_folder(tmp_path / "chat", extra=corpus))
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(60)))
    return model, data


def test_model_inputs_keeps_what_the_forward_names() -> None:
    from helpers import build

    batch = {"input_ids": 1, "token_type_ids": 2, "attention_mask": 3}
    assert set(model_inputs(build("llama"), batch)) == {"input_ids", "attention_mask"}
    assert set(model_inputs(build("bert"), batch)) == set(batch)


def keep_logged(run: Path) -> bool:
    """Whether the keep loss ran: logged at the last evaluation, finite. (The chat keep loss
    is a KL toward the model's own answers: near 0 on a tiny model, rounding may make it
    -1e-8, so its sign says nothing.)"""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    value = json.loads(lines[-1]).get("train_keep")
    return value is not None and math.isfinite(float(value))


def generate_cli(run: Path, tmp_path: Path) -> None:
    cli = CliRunner()
    one = cli.invoke(app, ["generate", str(run), "--prompt", "match goal. Which topic?"])
    assert one.exit_code == 0, one.output
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "phone chip. Which topic?"}) + "\n")
    many = cli.invoke(app, ["generate", str(run), "--input", str(prompts), "--max-new-tokens", "3"])
    assert many.exit_code == 0, many.output
    assert isinstance(json.loads(many.stdout.strip().splitlines()[-1])["answer"], str)


def test_an_instruct_run_trains_generates_and_answers(
    chat: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = chat
    options = {
        "task": "instruct",
        "model": str(model),
        "data": str(data),
        "runs_dir": str(tmp_path / "runs"),
        "name": "chat",
        "epochs": 1,
        "batch_size": 8,
        "lr": 1e-2,
        "gen_examples": 3,
        "max_new_tokens": 4,
        "reference_text": str(reference_file(tmp_path / "ref.txt")),
        "reference_examples": 8,
        "keep": 1.0,  # the keep loss's forward too (off by default for causal LMs)
        "keep_examples": 8,
    }
    summary = run_tune(make_config(options))
    run = tmp_path / "runs" / "chat"
    assert "test_exact_match" in summary and keep_logged(run)
    history = json.loads((run / "history.json").read_text())
    assert history["general"]  # the general prompts were answered before and after
    generate_cli(run, tmp_path)


def test_a_causal_lm_run_trains_and_its_run_generates(
    chat: tuple[Path, Path], tmp_path: Path
) -> None:
    model, _ = chat
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": r["prompt"] + " " + r["response"]}) + "\n"
                            for r in rows(60)))  # fmt: skip
    options = {
        "task": "causal-lm",
        "model": str(model),
        "data": str(data),
        "runs_dir": str(tmp_path / "runs"),
        "name": "text",
        "epochs": 1,
        "batch_size": 8,
        "reference_text": str(reference_file(tmp_path / "ref.txt")),
        "reference_examples": 8,
        "keep": 1.0,
        "keep_examples": 8,
    }
    summary = run_tune(make_config(options))
    assert keep_logged(tmp_path / "runs" / "text") and summary["test_perplexity"] > 0
    generate_cli(tmp_path / "runs" / "text", tmp_path)


def test_a_classify_run_on_a_model_without_token_types(tmp_path: Path) -> None:
    """DistilBERT's forward takes no token_type_ids; the BERT-style tokenizer returns them.
    The defaults: keep loss and knowledge kept; the warm head is off with a note (the head
    sits on a pre-classifier layer, not on a pooled output), where it used to stop the run."""
    folder = tiny_model_folder(tmp_path / "bert")  # the tokenizer, saved beside the model
    config = DistilBertConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64,
        num_labels=3, pad_token_id=0,
    )  # fmt: skip
    DistilBertForSequenceClassification(config).save_pretrained(folder)
    returns_token_types(folder)
    data = write_rows(tmp_path / "data.csv", topic_rows(60))
    options = {
        "model": str(folder),
        "data": str(data),
        "runs_dir": str(tmp_path / "runs"),
        "name": "distil",
        "epochs": 2,
        "batch_size": 8,
        "lr": 1e-2,
        "reference_text": str(reference_file(tmp_path / "ref.txt")),
        "reference_examples": 8,
        "keep_examples": 16,
    }
    summary = run_tune(make_config(options))
    assert keep_logged(tmp_path / "runs" / "distil") > 0 and "probe_test_accuracy" not in summary
    assert 0 < summary["knowledge_cosine"] <= 1
    predicted = CliRunner().invoke(
        app, ["predict", str(tmp_path / "runs" / "distil"), "--text", "goal"]
    )
    assert predicted.exit_code == 0, predicted.output
