"""Target matching, named adapters, switching, disabling and mixed batches."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leantune as lt
from helpers import build, inputs, logits
from leantune.adapters.inject import adapter_layers
from leantune.adapters.methods.lora.layers import LoraAdapter
from leantune.adapters.targets import layer_index
from test_contract import randomize


def adapted_names(model: nn.Module) -> set[str]:
    return {n for n, _ in adapter_layers(model)}


def test_targets_by_suffix_exact_name_and_regex() -> None:
    model = build("llama")
    lt.inject(model, lt.LoraConfig(targets=["q_proj", "model.layers.1.mlp.down_proj"]))
    assert adapted_names(model) == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    }
    model = build("llama")
    lt.inject(model, lt.LoraConfig(targets=r"model\.layers\.0\.self_attn\.[kv]_proj"))
    assert adapted_names(model) == {
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
    }


def test_all_linear_skips_output_head_and_saved_modules() -> None:
    model = build("llama")
    lt.inject(model, lt.LoraConfig(targets="all-linear"))
    names = adapted_names(model)
    assert "lm_head" not in names
    assert len(names) == 2 * 7  # q k v o gate up down in two layers
    bert = build("bert")
    lt.inject(bert, lt.LoraConfig(targets="all-linear"))
    assert "classifier" not in adapted_names(bert)
    assert "bert.pooler.dense" in adapted_names(bert)
    gpt2 = build("gpt2")
    lt.inject(gpt2, lt.LoraConfig(targets="all-linear"))
    assert len(adapted_names(gpt2)) == 2 * 4 and "lm_head" not in adapted_names(gpt2)
    mlp = build("mlp")  # no get_output_embeddings: the last linear layer is the head
    lt.inject(mlp, lt.LoraConfig(targets="all-linear"))
    assert adapted_names(mlp) == {"body.0", "body.2"}


def test_layer_indices_and_exclude() -> None:
    model = build("bert")
    cfg = lt.LoraConfig(targets=["query", "value", "key"], layers=[0, 2], exclude=["key"])
    lt.inject(model, cfg)
    names = adapted_names(model)
    assert {layer_index(n) for n in names} == {0, 2}
    assert all(not n.endswith("key") for n in names) and len(names) == 4
    assert layer_index("transformer.h.11.attn.c_attn") == 11
    assert layer_index("blocks.3.ff", "blocks") == 3 and layer_index("embed") is None


def test_user_config_is_not_modified() -> None:
    cfg = lt.LoraConfig(targets=["query"], modules_to_save=None)
    before = copy.deepcopy(cfg)
    lt.inject(build("bert"), cfg)
    assert cfg == before


def test_named_adapters_switch_and_disable() -> None:
    model = build("bert")
    x = inputs("bert")
    base = logits(model, x)
    lt.inject(model, lt.LoraConfig(targets=["query"]), "a")
    lt.inject(model, lt.LoraConfig(targets=["value"], r=2), "b")
    randomize(model)
    assert lt.active_adapter(model) == "b"
    out_b = logits(model, x)
    lt.set_active(model, "a")
    out_a = logits(model, x)
    assert not torch.allclose(out_a, out_b)
    with lt.disable(model):
        torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)
    torch.testing.assert_close(logits(model, x), out_a, atol=0, rtol=0)
    # Training one adapter leaves the other frozen.
    trainable = lt.mark_trainable(model, "a")
    assert trainable and all(".lora.a." in k or k.startswith("classifier") for k in trainable)
    lt.remove_adapter(model, "a")
    assert lt.active_adapter(model) == "b"
    torch.testing.assert_close(logits(model, x), out_b, atol=0, rtol=0)


def test_mixed_batch_matches_each_adapter_alone() -> None:
    model = build("llama")
    lt.inject(model, lt.LoraConfig(targets=["q_proj", "v_proj"]), "a")
    lt.inject(model, lt.LoraConfig(targets=["v_proj", "up_proj"], dora=True), "b")
    randomize(model)
    x = inputs("llama", batch=4)
    want = {}
    for name in ("a", "b"):
        lt.set_active(model, name)
        want[name] = logits(model, x)
    with lt.disable(model):
        want[lt.BASE] = logits(model, x)
    names = ["b", lt.BASE, "a", "b"]
    with lt.mixed_batch(model, names):
        got = logits(model, x)
    for i, name in enumerate(names):
        torch.testing.assert_close(got[i], want[name][i], atol=1e-6, rtol=1e-6)
    with (
        pytest.raises(lt.LeantuneError, match="unknown adapters"),
        lt.mixed_batch(model, ["a", "x"]),
    ):
        pass


def test_merged_adapter_cannot_be_disabled_or_mixed() -> None:
    model = build("bert")
    lt.inject(model, lt.LoraConfig(targets=["query"]))
    lt.merge(model)
    with pytest.raises(lt.LeantuneError, match="unmerge"), lt.disable(model):
        pass


def test_extra_trainable_modules() -> None:
    model = build("llama")
    lt.inject(model, lt.LoraConfig(targets=["q_proj"]))
    trainable = lt.mark_trainable(model, modules=["lm_head"])
    assert "lm_head.weight" in trainable
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable)


def test_parameter_report_counts_and_file_size(tmp_path) -> None:
    model = build("bert")
    lt.inject(model, lt.LoraConfig(r=4, targets=["query", "value"]))
    report = lt.parameter_report(model)
    lora = 3 * 2 * (4 * 32 + 32 * 4)
    head = 32 * 3 + 3
    assert report.trainable == lora + head
    assert report.total == sum(p.numel() for p in build("bert").parameters()) + lora
    lt.save_adapter(model, tmp_path / "a")
    assert report.adapter_bytes == (tmp_path / "a" / "adapter_model.safetensors").stat().st_size
    assert f"{report.trainable:,}" in str(report)


def test_tied_embedding_refuses_pissa_and_merge() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=16)
    )
    with pytest.raises(lt.TargetError, match="shares its weight"):
        lt.inject(model, lt.LoraConfig(targets=["wte"], init="pissa"))
    assert not list(adapter_layers(model))
    lt.inject(model, lt.LoraConfig(targets=["wte"]))
    with pytest.raises(lt.LeantuneError, match="merging would change both"):
        lt.merge(model)


def test_registry_refuses_duplicates() -> None:
    assert lt.METHODS["lora"] is lt.LoraConfig
    with pytest.raises(lt.LeantuneError, match="already registered"):
        lt.register("lora", lt.LoraConfig)


def test_unmerged_forward_never_builds_delta_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("bert")
    lt.inject(model, lt.LoraConfig(targets=["query", "value"], dora=True))
    calls: list[int] = []
    monkeypatch.setattr(LoraAdapter, "delta_weight", lambda self: calls.append(1))
    logits(model.train(), inputs("bert")).sum().backward()
    assert calls == []


def test_dropout_path_matches_autograd_reference() -> None:
    """The memory-saving dropout path gives the same output and gradients as plain autograd."""
    from leantune.adapters.methods.lora.math import DropoutDown

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    A = torch.randn(4, 8, generator=g, requires_grad=True)
    B = torch.randn(6, 4, generator=g, requires_grad=True)
    torch.manual_seed(7)
    out = F.linear(DropoutDown.apply(x, A, 0.3), B)
    out.pow(2).sum().backward()
    got = (out.detach(), x.grad, A.grad, B.grad)
    x.grad = A.grad = B.grad = None
    torch.manual_seed(7)  # draw the same mask
    _, keep = torch.native_dropout(x.detach(), 0.3, True)
    ref = ((x * keep / 0.7) @ A.T) @ B.T
    ref.pow(2).sum().backward()
    for a, b in zip(got, (ref.detach(), x.grad, A.grad, B.grad), strict=True):
        torch.testing.assert_close(a, b)


def test_dropout_is_active_in_training_only_and_skips_embeddings() -> None:
    model = build("bert")
    lt.inject(model, lt.LoraConfig(targets=["query", "word_embeddings"], dropout=0.5))
    randomize(model)
    x = inputs("bert")
    model.train()
    torch.manual_seed(0)
    a = logits(model, x)
    torch.manual_seed(1)
    b = logits(model, x)
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(logits(model, x), logits(model, x), atol=0, rtol=0)
