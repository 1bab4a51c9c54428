"""Prompt tuning and prefix tuning: the contract on the tiny models, and peft both ways.

peft 0.21.2's own ``generate()`` for prompt learning does not work with transformers 5 (it
looks for ``past_key_values`` where generate now passes ``cache``, and prepends the prompt
again at every step), so generated tokens are compared with greedy decoding through peft's
forward without a cache: what its math gives.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from torch import nn

import leantune as lt
from helpers import build, inputs, logits, tiny_model_folder
from leantune.adapters.inject import adapter_layers, module_copy_parameters
from leantune.adapters.methods.prefix_tuning import PrefixConfig
from leantune.adapters.methods.prompt import PromptConfig
from leantune.core.errors import LeantuneError, TargetError
from leantune.tune import default_lr

N = 4
CONFIGS = {
    "prompt": lambda: PromptConfig(num_virtual_tokens=N),
    "prefix": lambda: PrefixConfig(num_virtual_tokens=N),
    "prefix-mlp": lambda: PrefixConfig(num_virtual_tokens=N, prefix_projection=True),
}
CASES = [
    ("bert", "prompt"),
    ("llama", "prompt"),
    ("gpt2", "prompt"),
    ("llama", "prefix"),
    ("gpt2", "prefix"),
    ("llama", "prefix-mlp"),
    ("gpt2", "prefix-mlp"),
]
TOL = {"atol": 1e-5, "rtol": 1e-5}  # measured: 0.0 on every case (the same operations)


def batch(kind: str) -> dict[str, torch.Tensor]:
    """Inputs with an attention mask holding padding, which the virtual tokens extend."""
    x = inputs(kind)
    mask = torch.ones_like(x["input_ids"])
    mask[0, :2] = 0  # left padding on the first row
    return {**x, "attention_mask": mask}


def adapted(kind: str, variant: str, name: str = "default") -> nn.Module:
    model = build(kind)
    lt.inject(model, CONFIGS[variant](), name)
    randomize(model, name)
    return model


def randomize(model: nn.Module, name: str | None = None, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lt.adapter_parameters(model, name).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def greedy(model: nn.Module, ids: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Greedy decoding without a cache (every step recomputes the whole sequence); a row that
    emits EOS is padded with it, as generate() does."""
    eos = model.config.eos_token_id
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        nxt = out[:, -1].argmax(-1).masked_fill(done, eos)
        done |= nxt == eos
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids


def generated(model: nn.Module, ids: torch.Tensor, steps: int = 5) -> torch.Tensor:
    return model.generate(  # type: ignore[operator]
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False
    )


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_only_the_virtual_tokens_and_the_head_get_gradients(kind: str, variant: str) -> None:
    model = adapted(kind, variant).train()
    logits(model, batch(kind)).pow(2).mean().backward()
    expected = set(lt.adapter_parameters(model))
    if kind == "bert":
        expected |= {"classifier.weight", "classifier.bias"}
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert got == expected
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in got)  # type: ignore[union-attr]


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_outputs_follow_the_virtual_tokens(kind: str, variant: str) -> None:
    model, x = adapted(kind, variant), batch(kind)
    before = logits(model, x)
    base = logits(build(kind), x)
    # A causal LM's prompt-tuned logits cover the virtual positions too (as peft's).
    extra = N if variant == "prompt" and kind != "bert" else 0
    assert before.shape[1:] == (base.shape[1] + extra, *base.shape[2:])
    assert not torch.allclose(before[:, extra:], base, atol=1e-4)
    randomize(model, seed=4)
    assert not torch.allclose(logits(model, x), before, atol=1e-4)
    # A positional call is rewritten the same way.
    torch.testing.assert_close(
        logits(model, {"input_ids": x["input_ids"]}), model(x["input_ids"]).logits, atol=0, rtol=0
    )


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_save_load_in_fresh_model_reproduces_outputs(
    kind: str, variant: str, tmp_path: Path
) -> None:
    model, x = adapted(kind, variant), batch(kind)
    if kind == "bert":  # a trained head travels with the adapter
        with torch.no_grad():
            module_copy_parameters(model)["classifier.weight"].add_(0.5)
    expected = logits(model, x)
    lt.save_adapter(model, tmp_path)
    fresh = build(kind)
    lt.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, x), expected, **TOL)


KEYS = {
    ("bert", "prompt"): {
        "prompt_embeddings": [N, 32],
        "base_model.classifier.weight": [3, 32],
        "base_model.classifier.bias": [3],
    },
    ("llama", "prompt"): {"prompt_embeddings": [N, 32]},
    ("gpt2", "prompt"): {"prompt_embeddings": [N, 32]},
    # layers · (key + value) · key/value heads · head size: Llama 2·2·2·8, GPT-2 2·2·2·16.
    ("llama", "prefix"): {"prompt_embeddings": [N, 64]},
    ("gpt2", "prefix"): {"prompt_embeddings": [N, 128]},
    ("llama", "prefix-mlp"): {"prompt_embeddings": [N, 64]},
    ("gpt2", "prefix-mlp"): {"prompt_embeddings": [N, 128]},
}


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_saved_key_set_is_pinned(kind: str, variant: str) -> None:
    found = {k: list(v.shape) for k, v in lt.adapter_state_dict(adapted(kind, variant)).items()}
    assert found == KEYS[kind, variant]


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_disable_and_unload_give_back_the_base_model(kind: str, variant: str) -> None:
    model, x = adapted(kind, variant), batch(kind)
    base = logits(build(kind), x)
    with lt.disable(model):
        torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)
    lt.unload(model)
    assert not list(adapter_layers(model))
    assert not model._forward_pre_hooks  # the model's hook went with the layer
    assert {type(m) for m in model.modules()} == {type(m) for m in build(kind).modules()}
    torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)


@pytest.mark.parametrize(("kind", "variant"), [("bert", "prompt"), ("llama", "prefix")])
def test_merge_is_refused_with_one_line(kind: str, variant: str) -> None:
    model, x = adapted(kind, variant), batch(kind)
    expected = logits(model, x)
    for attempt in (lambda: lt.merge(model), lambda: lt.unload(model, merge_active=True)):
        with pytest.raises(LeantuneError, match="not mergeable") as err:
            attempt()
        assert "\n" not in str(err.value)
    torch.testing.assert_close(logits(model, x), expected, atol=0, rtol=0)


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_leantune_adapter_loads_in_peft(kind: str, variant: str, tmp_path: Path) -> None:
    model, x = adapted(kind, variant), batch(kind)
    if kind == "bert":
        with torch.no_grad():
            module_copy_parameters(model)["classifier.weight"].add_(0.5)
    expected = logits(model, x)
    lt.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(build(kind), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, x), expected, **TOL)
    if kind != "bert":  # leantune's generate (with the cache) = greedy on peft's math
        ids = x["input_ids"]
        assert torch.equal(generated(model, ids), greedy(peft_model, ids))


PEFT = {
    "prompt": lambda task: PromptTuningConfig(task_type=task, num_virtual_tokens=N),
    "prefix": lambda task: PrefixTuningConfig(task_type=task, num_virtual_tokens=N),
    "prefix-mlp": lambda task: PrefixTuningConfig(
        task_type=task, num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=8
    ),
}


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_peft_adapter_loads_in_leantune(kind: str, variant: str, tmp_path: Path) -> None:
    torch.manual_seed(5)
    task = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    peft_model = get_peft_model(build(kind), PEFT[variant](task)).eval()
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.mul_(0.5)
        if kind == "bert":
            peft_model.base_model.classifier.modules_to_save["default"].weight.add_(1.0)
    x = batch(kind)
    expected = logits(peft_model, x)
    peft_model.save_pretrained(tmp_path)
    model = build(kind)
    lt.load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model, x), expected, **TOL)
    if kind == "bert":  # the head came from the file
        assert not torch.equal(model.classifier.weight, build(kind).classifier.weight)
    else:
        ids = x["input_ids"]
        assert torch.equal(generated(model, ids), greedy(peft_model, ids))


def test_causal_lm_loss_ignores_the_virtual_positions_as_peft_does(tmp_path: Path) -> None:
    model, x = adapted("llama", "prompt"), batch("llama")
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    lt.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(build("llama"), tmp_path).eval()
    ours = model(**x, labels=labels).loss
    torch.testing.assert_close(ours, peft_model(**x, labels=labels).loss, **TOL)


def test_text_init_takes_the_embedding_rows_of_the_texts_tokens(tmp_path: Path) -> None:
    folder = tiny_model_folder(tmp_path / "model", "llama")
    text = "goal match team"  # 3 tokens, repeated and cut to 7
    model = build("llama")
    lt.inject(
        model,
        PromptConfig(num_virtual_tokens=7, init="TEXT", init_text=text, tokenizer=str(folder)),
    )
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
    assert len(ids) == 3
    rows = model.model.embed_tokens.weight[(ids * 3)[:7]]
    (prompt,) = lt.adapter_parameters(model).values()
    assert torch.equal(prompt, rows)
    peft_init = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=7,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(folder),
    )
    peft_model = get_peft_model(build("llama"), peft_init)
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight, prompt)


def test_prefix_tuning_on_bert_is_refused_and_leaves_the_model_as_it_was() -> None:
    model, x = build("bert"), batch("bert")
    base = logits(model, x)
    with pytest.raises(TargetError, match="takes none") as err:
        lt.inject(model, PrefixConfig(num_virtual_tokens=N))
    assert "\n" not in str(err.value)
    assert not list(adapter_layers(model)) and not model._forward_pre_hooks
    torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)


def test_a_mixed_batch_takes_adapters_of_one_length_and_refuses_base_rows() -> None:
    model, x = build("gpt2"), batch("gpt2")
    for name, seed in (("a", 3), ("b", 4)):
        lt.inject(model, PrefixConfig(num_virtual_tokens=N), name)
        randomize(model, name, seed)
    alone = {}
    for name in ("a", "b"):
        lt.set_active(model, name)
        alone[name] = logits(model, x)
    with lt.mixed_batch(model, ["a", "b", "a"]):
        mixed = logits(model, x)
    for i, name in enumerate(["a", "b", "a"]):
        torch.testing.assert_close(mixed[i], alone[name][i], **TOL)
    with lt.mixed_batch(model, ["a", "__base__", "a"]), pytest.raises(LeantuneError) as err:
        logits(model, x)
    assert "one length or none" in str(err.value) and "\n" not in str(err.value)
    # The model's hook stays while an adapter is left, and goes with the last one.
    lt.remove_adapter(model, "a")
    torch.testing.assert_close(logits(model, x), alone["b"], atol=0, rtol=0)
    lt.remove_adapter(model, "b")
    assert not model._forward_pre_hooks and not list(adapter_layers(model))
    torch.testing.assert_close(logits(model, x), logits(build("gpt2"), x), atol=0, rtol=0)


def test_run_hooks() -> None:
    assert default_lr("prompt") == 3e-2 and default_lr("prefix") == 1e-2
    assert PromptConfig.from_options({"num_virtual_tokens": 8}).num_virtual_tokens == 8
    assert PrefixConfig.from_options({}).num_virtual_tokens == 20
    for config in (PromptConfig(), PrefixConfig()):
        assert "not a change of the model's weights" in (config.penalty_refusal() or "")
    with pytest.raises(LeantuneError, match="positive integer"):
        PromptConfig(num_virtual_tokens=0)
    with pytest.raises(LeantuneError, match="needs init_text"):
        PromptConfig(init="TEXT")


def test_inputs_that_leave_no_room_for_the_virtual_tokens_are_refused() -> None:
    model = build("bert")  # 32 positions
    lt.inject(model, PromptConfig(num_virtual_tokens=30))
    with pytest.raises(LeantuneError, match="truncate inputs to 2 tokens") as err:
        logits(model, batch("bert"))  # 7 tokens
    assert "\n" not in str(err.value)
