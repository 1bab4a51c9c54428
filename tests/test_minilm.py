"""The embedded MiniLM (slower: loads a 90 MB model)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification

import leantune as lt
from leantune.defaults import bbc_news, minilm_dir

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
