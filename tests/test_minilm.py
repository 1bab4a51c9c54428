"""The embedded MiniLM (slower: loads a 90 MB model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import leantune as lt
from leantune.core.defaults import bbc_news, minilm_dir

pytestmark = pytest.mark.slow


def minilm() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=5).eval()


def test_lora_query_value_trainable_count_matches_peft() -> None:
    model = lt.inject(minilm(), lt.LoraConfig(r=8, targets=["query", "value"]))
    peft_model = get_peft_model(
        minilm(), PeftLoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    report = lt.parameter_report(model)
    assert report.trainable == peft_trainable == 75_653


def test_bbc_news_is_read_from_the_package() -> None:
    data = bbc_news()
    assert len(data.texts) == len(data.labels) == 2225
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert sorted(set(data.labels)) == [0, 1, 2, 3, 4]


def test_tune_on_the_real_defaults_end_to_end(tmp_path: Path) -> None:
    """`leantune tune` with no data or model options: MiniLM + BBC News, a few steps only.
    The run's adapter loads in peft on a fresh MiniLM and gives the run's test accuracy."""
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "leantune.cli",
            "tune",
            "--max-steps",
            "2",
            "--runs-dir",
            str(tmp_path),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    run = tmp_path / "minilm-bbc-lora"
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["train_examples"], summary["val_examples"], summary["test_examples"]) == (
        1558,
        223,
        444,
    )
    assert summary["steps"] == 2 and summary["method"] == "lora"
    assert summary["trainable_params"] == 167_813  # all-linear r=8 on layers 3-5, plus the head
    assert json.loads((run / "labels.json").read_text()) == bbc_news().label_names
    assert f"test accuracy     {summary['test_accuracy']:.4f}" in res.stdout
    # peft reads the adapter folder and reproduces the run's predictions on a few test texts.
    from peft import PeftModel

    from leantune.models.pooling import use_pooling

    base = minilm()  # the run's head sits on MiniLM's own mean pooling (--pooling auto)
    use_pooling(base, minilm_dir(), "auto")
    peft_model = PeftModel.from_pretrained(base, run / "adapter").eval()
    texts = ["Shares in the bank rose after profits beat forecasts.", "The striker scored twice."]
    from leantune.tune import predict_run

    ours = predict_run(run, texts)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    with torch.no_grad():
        probs = peft_model(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    assert probs.max(-1).values.tolist() == pytest.approx([r["score"] for r in ours], abs=1e-5)
