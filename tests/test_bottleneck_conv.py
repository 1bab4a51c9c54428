"""Bottleneck adapters (contract rows on the tiny models, merge refused, LEANTUNE files) and LoRA
on convolutions (contract rows on a small conv net, and the real peft both ways)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

import leantune as lt
from helpers import build, inputs, logits
from leantune.adapters.inject import adapter_layers, module_copy_parameters
from leantune.adapters.methods.bottleneck import BottleneckConfig
from leantune.tune import run_tune
from test_contract import randomize, weights
from test_tune import cli, config

MODELS = ["bert", "llama", "gpt2", "mlp"]
VARIANTS = ["houlsby", "pfeiffer"]
CASES = [(m, v) for m in MODELS for v in VARIANTS]

# Where each variant puts its adapters (default targets; the MLP names its layers).
PLACES = {
    ("bert", "houlsby"): [
        f"bert.encoder.layer.{i}.{m}"
        for i in range(3)
        for m in ("attention.output.dense", "output.dense")
    ],
    ("bert", "pfeiffer"): [f"bert.encoder.layer.{i}.output.dense" for i in range(3)],
    ("llama", "houlsby"): [
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")
    ],
    ("llama", "pfeiffer"): [f"model.layers.{i}.mlp.down_proj" for i in range(2)],
    ("gpt2", "houlsby"): [
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_proj", "mlp.c_proj")
    ],
    ("gpt2", "pfeiffer"): [f"transformer.h.{i}.mlp.c_proj" for i in range(2)],
    ("mlp", "houlsby"): ["body.0", "body.2"],
    ("mlp", "pfeiffer"): ["body.0", "body.2"],
}
# Every adapted layer has 32 outputs; reduction_factor 4 gives width 8.
ADAPTER_KEYS = {
    "leantune_bottleneck.down.weight": [8, 32],
    "leantune_bottleneck.down.bias": [8],
    "leantune_bottleneck.up.weight": [32, 8],
    "leantune_bottleneck.up.bias": [32],
}
HEAD_KEYS = {
    "bert": {"classifier.weight": [3, 32], "classifier.bias": [3]},
    "mlp": {"head.weight": [5, 32], "head.bias": [5]},
}


def bottleneck(kind: str, variant: str) -> BottleneckConfig:
    if kind == "mlp":
        return BottleneckConfig(
            targets=["body.0", "body.2"],
            variant=variant,
            reduction_factor=4,
            modules_to_save=["head"],
        )
    return BottleneckConfig(variant=variant, reduction_factor=4)


def with_bottleneck(kind: str, variant: str) -> nn.Module:
    model = build(kind)
    lt.inject(model, bottleneck(kind, variant))
    return model


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_bottleneck_init_equals_base_and_places_its_adapters(kind: str, variant: str) -> None:
    model = with_bottleneck(kind, variant)
    x = inputs(kind)
    torch.testing.assert_close(logits(model, x), logits(build(kind), x), atol=0, rtol=0)
    assert [n for n, _ in adapter_layers(model)] == PLACES[kind, variant]


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_bottleneck_only_adapter_and_head_get_gradients(kind: str, variant: str) -> None:
    model = with_bottleneck(kind, variant).train()
    randomize(model)  # up starts at zero, so down would get no gradient at init
    logits(model, inputs(kind)).pow(2).mean().backward()
    expected = set(lt.adapter_parameters(model)) | set(module_copy_parameters(model))
    assert len(lt.adapter_parameters(model)) == 4 * len(PLACES[kind, variant])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == expected
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in got)  # type: ignore[union-attr]


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_bottleneck_save_load_reproduces_and_keys_are_pinned(
    kind: str, variant: str, tmp_path: Path
) -> None:
    model = with_bottleneck(kind, variant)
    randomize(model)
    with torch.no_grad():
        for p in module_copy_parameters(model).values():
            p.add_(0.5)
    x = inputs(kind)
    expected = logits(model, x)
    assert not torch.allclose(expected, logits(build(kind), x), atol=1e-4), "adapter has no effect"
    lt.save_adapter(model, tmp_path / "a")
    golden = {f"{m}.{k}": s for m in PLACES[kind, variant] for k, s in ADAPTER_KEYS.items()}
    golden |= HEAD_KEYS.get(kind, {})
    found = {
        k.removeprefix("base_model.model."): list(v.shape)
        for k, v in lt.adapter_state_dict(model).items()
    }
    assert found == golden
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LEANTUNE"
    entry = {
        "method": "bottleneck",
        "size": 2 * 32 * 8 + 8 + 32,
        "width": 8,
        "non_linearity": "relu",
    }
    assert config["modules"] == dict.fromkeys(PLACES[kind, variant], entry)
    fresh = build(kind)
    lt.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh, x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("kind", MODELS)
def test_bottleneck_merge_is_refused_and_unload_gives_the_base(kind: str) -> None:
    model = with_bottleneck(kind, "houlsby")
    randomize(model)
    x = inputs(kind)
    before, out = weights(model), logits(model, x)
    for merge in (lambda: lt.merge(model), lambda: lt.unload(model, merge_active=True)):
        with pytest.raises(lt.LeantuneError, match="bottleneck adapters cannot be merged") as e:
            merge()
        assert "\n" not in str(e.value) and "unmerged" in str(e.value)
    after = weights(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(logits(model, x), out, atol=0, rtol=0)
    lt.unload(model)
    torch.testing.assert_close(logits(model, x), logits(build(kind), x), atol=0, rtol=0)


@pytest.mark.parametrize("kind", MODELS)
def test_bottleneck_mixed_batch_rows_equal_each_adapter_alone(kind: str) -> None:
    model = build(kind)
    lt.inject(model, bottleneck(kind, "houlsby"), "a")
    lt.inject(model, bottleneck(kind, "pfeiffer"), "b")
    randomize(model)
    x = inputs(kind, batch=4)
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


def test_bottleneck_refuses_bad_options_and_penalties() -> None:
    with pytest.raises(lt.LeantuneError, match="variant"):
        BottleneckConfig(variant="parallel")
    with pytest.raises(lt.LeantuneError, match="non_linearity"):
        BottleneckConfig(non_linearity="tanh")
    with pytest.raises(lt.TargetError, match="no bottleneck"):
        lt.inject(build("bert"), BottleneckConfig(reduction_factor=64))
    assert BottleneckConfig.run_refusal({"l2": 0.1}) is not None
    assert BottleneckConfig.run_refusal({"l2": 0.0, "l1": None}) is None
    assert BottleneckConfig.from_options({"targets": "all-linear"}).targets == (
        BottleneckConfig().targets
    )


def test_tune_with_bottleneck_and_merge_refused_on_the_command_line(
    tmp_path: Path, bert_dir: Path, data_file: Path
) -> None:
    run_tune(config(tmp_path, bert_dir, data_file, method="bottleneck", epochs=1))
    run = tmp_path / "runs" / "t"
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert {e["method"] for e in saved["modules"].values()} == {"bottleneck"}
    assert len(saved["modules"]) == 6  # houlsby, --layers all: 2 per block of 3
    res = cli("merge", str(run), "--out", str(tmp_path / "merged"))
    assert res.returncode != 0
    assert res.stderr.count("\n") == 1 and "bottleneck adapters cannot be merged" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "merged").exists()


# ---------------------------------------------------------------------------- LoRA on convs

CONVS = ["conv1", "conv2", "conv3", "seq"]


class ConvNet(nn.Module):
    """Conv2d 3×3, a strided 3×3 and a 1×1, then torch's Conv1d over the flattened positions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.seq = nn.Conv1d(6, 8, 3, padding=1)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(pixels)))))
        h = torch.relu(self.seq(h.flatten(2)))  # (N, 8, 16)
        return self.head(torch.relu(self.proj(h.mean(2))))


def conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet().eval()


def pixels(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def conv_lora(**kw: object) -> lt.LoraConfig:
    return lt.LoraConfig(r=4, alpha=8, targets=CONVS, **kw)  # type: ignore[arg-type]


def with_conv_lora(**kw: object) -> nn.Module:
    model = conv_net()
    lt.inject(model, conv_lora(**kw))
    return model


def test_conv_lora_init_equals_base_and_all_linear_takes_no_conv() -> None:
    x = pixels()
    torch.testing.assert_close(with_conv_lora()(x), conv_net()(x), atol=0, rtol=0)
    model = conv_net()
    lt.inject(model, lt.LoraConfig(targets="all-linear"))
    assert [n for n, _ in adapter_layers(model)] == ["proj"]  # head excluded, convs not linear
    shapes = {k: list(v.shape) for k, v in lt.adapter_state_dict(with_conv_lora()).items()}
    assert shapes == {
        "base_model.model.conv1.lora_A.weight": [4, 3, 3, 3],
        "base_model.model.conv1.lora_B.weight": [8, 4, 1, 1],
        "base_model.model.conv2.lora_A.weight": [4, 8, 3, 3],
        "base_model.model.conv2.lora_B.weight": [8, 4, 1, 1],
        "base_model.model.conv3.lora_A.weight": [4, 8, 1, 1],
        "base_model.model.conv3.lora_B.weight": [6, 4, 1, 1],
        "base_model.model.seq.lora_A.weight": [4, 6, 3],
        "base_model.model.seq.lora_B.weight": [8, 4, 1],
    }


@pytest.mark.parametrize("extra", [{}, {"rslora": True}, {"init": "gaussian"}], ids=str)
def test_conv_lora_merged_equals_unmerged_and_unmerge_restores(extra: dict[str, object]) -> None:
    model = with_conv_lora(**extra)
    randomize(model)
    x = pixels()
    before, unmerged = weights(model), model(x)
    assert not torch.allclose(unmerged, conv_net()(x), atol=1e-4), "adapter has no effect"
    lt.merge(model)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    lt.merge(model)  # idempotent
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    lt.unmerge(model)
    after = weights(model)
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=1e-5, msg=key)
    lt.unload(model, merge_active=True)
    assert not list(adapter_layers(model))
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_conv_lora_gradients_save_load_and_refusals(tmp_path: Path) -> None:
    model = conv_net()
    lt.inject(model, lt.LoraConfig(r=4, targets=CONVS, modules_to_save=["head"]))
    model.train()
    randomize(model)
    model(pixels()).pow(2).mean().backward()
    expected = set(lt.adapter_parameters(model)) | {"head.weight", "head.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert {n for n, p in model.named_parameters() if p.grad is not None} == expected
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in expected)  # type: ignore[union-attr]
    model.eval()
    with torch.no_grad():
        model.head.weight.add_(0.5)
    x = pixels()
    lt.save_adapter(model, tmp_path / "a")
    fresh = conv_net()
    lt.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    for kw, bad in [({}, nn.Conv2d(3, 8, 3, groups=1, dilation=2)), ({"dora": True}, None)]:
        net = conv_net()
        if bad is not None:
            net.conv1 = bad
        with pytest.raises(lt.TargetError, match="LoRA cannot adapt conv1") as e:
            lt.inject(net, conv_lora(**kw))
        assert "\n" not in str(e.value)
        assert not list(adapter_layers(net))


def test_conv_lora_loads_in_peft(tmp_path: Path) -> None:
    model = with_conv_lora()
    randomize(model)
    x = pixels()
    lt.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(conv_net(), tmp_path).eval()
    torch.testing.assert_close(peft_model(x), model(x), atol=1e-5, rtol=1e-5)


def test_peft_conv_lora_loads_in_leantune(tmp_path: Path) -> None:
    peft_model = get_peft_model(conv_net(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=CONVS))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    x = pixels()
    expected = peft_model.eval()(x)
    peft_model.save_pretrained(tmp_path)
    model = conv_net()
    lt.load_adapter(model, tmp_path)
    assert [n for n, _ in adapter_layers(model)] == CONVS
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    lt.merge(model)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
