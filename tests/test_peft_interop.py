"""Adapters cross between leantune and the real peft package in both directions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import leantune as lt
from helpers import TARGETS, build, inputs, logits
from test_contract import config, randomize

TO_PEFT = [
    ("bert", "lora"),
    ("bert", "rslora"),
    ("bert", "dora"),
    ("bert", "pissa"),
    ("bert", "gaussian"),
    ("llama", "lora"),
    ("llama", "dora"),
    ("gpt2", "lora"),
    ("gpt2", "dora"),
    ("mlp", "lora"),
]


@pytest.mark.parametrize(("kind", "variant"), TO_PEFT)
def test_leantune_adapter_loads_in_peft(kind: str, variant: str, tmp_path: Path) -> None:
    model = build(kind)
    lt.inject(model, config(kind, variant))
    randomize(model)
    x = inputs(kind)
    expected = logits(model, x)
    lt.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(build(kind), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, x), expected, atol=1e-5, rtol=1e-5)


def test_per_module_ranks_and_head_load_in_peft(tmp_path: Path) -> None:
    model = build("bert")
    cfg = lt.LoraConfig(
        r=4,
        alpha=8,
        targets=["query", "value"],
        rank_pattern={"layer.1.attention.self.query": 2, "value": 6},
        alpha_pattern={"layer.2.attention.self.value": 3},
    )
    lt.inject(model, cfg)
    randomize(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    x = inputs("bert")
    expected = logits(model, x)
    lt.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(build("bert"), tmp_path).eval()
    assert peft_model.base_model.model.bert.encoder.layer[1].attention.self.query.r["default"] == 2
    assert peft_model.base_model.model.bert.encoder.layer[0].attention.self.value.r["default"] == 6
    torch.testing.assert_close(logits(peft_model, x), expected, atol=1e-5, rtol=1e-5)


PEFT_CASES = {
    "lora": ("bert", {}),
    "rslora": ("bert", {"use_rslora": True}),
    "dora": ("bert", {"use_dora": True}),
    "rank_pattern": (
        "bert",
        {"rank_pattern": {"layer.0.attention.self.query": 2}, "alpha_pattern": {"value": 5}},
    ),
    "gpt2-conv1d": ("gpt2", {}),
    "llama-embedding": ("llama", {}),
    "regex-targets": ("llama", {"target_modules": r".*\.layers\.1\.self_attn\.(q|k)_proj"}),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_adapter_loads_in_leantune(case: str, tmp_path: Path) -> None:
    kind, extra = PEFT_CASES[case]
    torch.manual_seed(5)
    targets = TARGETS[kind][1] if "use_dora" in extra else TARGETS[kind][0]
    kwargs = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": targets,
        "init_lora_weights": False,
    } | extra
    if kind == "bert":
        kwargs["task_type"] = "SEQ_CLS"  # modules_to_save: the classifier travels along
    peft_model = get_peft_model(build(kind), PeftLoraConfig(**kwargs)).eval()
    if kind == "bert":
        with torch.no_grad():
            peft_model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    x = inputs(kind)
    expected = logits(peft_model, x)
    peft_model.save_pretrained(tmp_path)
    model = build(kind)
    lt.load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=1e-5)
    # The head came from the file, not from the fresh model.
    if kind == "bert":
        assert not torch.equal(model.classifier.weight, build(kind).classifier.weight)
