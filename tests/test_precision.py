"""Precision and memory on the contract models: autocast, a bf16 base under fp32 adapters,
activation checkpointing, an int8/nf4 base under LoRA, and the loop in bf16 and fp16.

Tolerances are shares of the largest fp32 output; largest error measured on these cases: bf16
autocast 0.012, bf16 base under autocast 0.019, fp16 autocast 0.0013, int8 base 0.005."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import leantune as lt
from helpers import TARGETS, build, inputs, logits
from leantune.adapters import accounting
from leantune.adapters.methods.bitfit import BitFitConfig
from leantune.adapters.methods.layernorm import LayerNormConfig
from leantune.adapters.methods.sparse import SparseConfig
from leantune.adapters.targets import match_targets
from leantune.core.errors import LeantuneError
from leantune.models import precision
from leantune.train.checkpoint import latest_checkpoint
from leantune.train.interface import Diverged, Progress, TrainConfig, TrainHooks
from leantune.train.loop import train
from test_loop import toy_batches as loop_toy_batches

METHODS = ["lora", "dora", "bitfit", "layernorm", "sparse"]
# BitFit needs biases: the tiny Llama has none.
CASES = [
    (m, k) for k in ("bert", "gpt2", "llama") for m in METHODS if (m, k) != ("bitfit", "llama")
]
BF16_TOL, FP16_TOL, INT8_TOL = 0.05, 0.01, 0.02


def method_config(method: str, kind: str, model: nn.Module) -> lt.AdapterConfig:
    with_embedding, linear = TARGETS[kind]
    if method in ("lora", "dora"):
        targets = linear if method == "dora" else with_embedding
        return lt.LoraConfig(r=4, alpha=8, targets=targets, dora=method == "dora")
    if method == "bitfit":
        return BitFitConfig()
    if method == "layernorm":
        return LayerNormConfig()
    g = torch.Generator().manual_seed(5)
    names = match_targets(model, SparseConfig(targets=linear), skip=["classifier"])
    masks = {
        n: torch.randperm(model.get_submodule(n).weight.numel(), generator=g)[:6] for n in names
    }
    return SparseConfig(targets=linear, masks=masks)


def adapted(method: str, kind: str) -> nn.Module:
    """The model with the method injected and its adapter moved away from init."""
    model = build(kind)
    lt.inject(model, method_config(method, kind, model))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in lt.adapter_parameters(model).items():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.add_(p * noise if name.endswith("magnitude") else noise)
    return model


def assert_close_to(got: torch.Tensor, want: torch.Tensor, share: float) -> None:
    scale = float(want.abs().max())
    torch.testing.assert_close(got.float(), want, atol=share * scale, rtol=0)


def assert_adapters_train_in_fp32(model: nn.Module, out: torch.Tensor, scale: float = 1) -> None:
    (out.float().pow(2).mean() * scale).backward()  # fp16 needs loss scaling: tiny grads underflow
    adapters = lt.adapter_parameters(model)
    for name, p in adapters.items():
        assert p.dtype == torch.float32, name
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert p.grad.isfinite().all() and p.grad.abs().sum() > 0, name
    kept = set(adapters) | {"classifier.weight", "classifier.bias"}
    stray = [n for n, p in model.named_parameters() if p.grad is not None and n not in kept]
    assert stray == []


@pytest.mark.parametrize(("mode", "tol"), [("bf16", BF16_TOL), ("fp16", FP16_TOL)])
@pytest.mark.parametrize(("method", "kind"), CASES)
def test_autocast_output_is_close_and_adapters_get_fp32_gradients(
    method: str, kind: str, mode: str, tol: float
) -> None:
    model = adapted(method, kind)
    x = inputs(kind)
    with torch.no_grad():
        want = logits(model, x)
        assert not torch.allclose(want, logits(build(kind), x), atol=1e-4), "no adapter effect"
        with precision.autocast(mode, "cpu"):
            got = logits(model, x)
    assert got.dtype == precision.dtype_of(mode)  # autocast did run
    assert_close_to(got, want, tol)
    model.train()
    with precision.autocast(mode, "cpu"):
        out = logits(model, x)
    assert_adapters_train_in_fp32(model, out, precision.LossScaler(mode, "cpu").scale)


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_bf16_base_with_fp32_adapters(method: str, kind: str) -> None:
    model = adapted(method, kind)
    x = inputs(kind)
    with torch.no_grad():
        want = logits(model, x)
    full = accounting.base_bytes(model)
    cast = accounting.cast_base(model, "bf16")
    assert cast > 0 and accounting.base_bytes(model) < 0.6 * full
    for name, p in model.named_parameters():
        is_base = not p.requires_grad
        assert p.dtype == (torch.bfloat16 if is_base else torch.float32), name
    with torch.no_grad(), precision.autocast("bf16", "cpu"):
        assert_close_to(logits(model, x), want, BF16_TOL)
    model.train()
    with precision.autocast("bf16", "cpu"):
        out = logits(model, x)
    assert_adapters_train_in_fp32(model, out)


def test_cast_base_keeps_frozen_adapters_and_heads_in_fp32() -> None:
    """Gradual unfreezing switches adapters on later: they must not be cast with the base."""
    model = adapted("lora", "bert")
    lt.inject(model, lt.LoraConfig(r=2, targets=["key"], modules_to_save=["classifier"]), "b")
    for p in lt.adapter_parameters(model).values():
        p.requires_grad_(False)
    accounting.cast_base(model, torch.float16)
    assert all(p.dtype == torch.float32 for p in lt.adapter_parameters(model).values())
    assert model.get_parameter("classifier.weight").dtype == torch.float32
    assert model.get_parameter("bert.encoder.layer.0.attention.self.query.weight").dtype == (
        torch.float16
    )


def test_checkpointing_gives_the_same_gradients_and_saves_activations() -> None:
    def grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        model = build("llama")
        # Adapters on the upper layer only: gradients must still reach them.
        lt.inject(model, lt.LoraConfig(r=4, alpha=8, targets=["q_proj", "down_proj"], layers=[1]))
        if checkpointing:
            precision.enable_checkpointing(model)
        model.train()
        with torch.no_grad():
            for p in lt.adapter_parameters(model).values():
                p.add_(0.1)
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += t.numel()
            return t

        ids = inputs("llama")["input_ids"]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return {n: p.grad for n, p in lt.adapter_parameters(model).items()}, saved

    plain, plain_saved = grads(False)
    checked, checked_saved = grads(True)
    assert plain.keys() == checked.keys() and len(plain) == 4
    for name, g in plain.items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(checked[name], g, atol=1e-6, rtol=1e-5, msg=name)
    assert checked_saved < 0.8 * plain_saved  # activations of the checkpointed layers recomputed


def test_checkpointing_keeps_embeddings_out_of_backward_and_refuses_other_models() -> None:
    model = build("llama")
    lt.inject(model, lt.LoraConfig(r=4, targets=["q_proj"]))
    precision.enable_checkpointing(model)
    ids = inputs("llama")["input_ids"]
    assert not model.get_input_embeddings()(ids).requires_grad
    with pytest.raises(LeantuneError, match="does not support gradient checkpointing"):
        precision.enable_checkpointing(build("mlp"))


def linear_bytes(model: nn.Module, names: list[str]) -> int:
    return sum(precision.tensor_bytes(model.get_submodule(n).weight) for n in names)


def lora_trains(model: nn.Module, ids: torch.Tensor, steps: int = 6) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(lt.adapter_parameters(model).values(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_int8_base_under_lora_is_close_trains_and_is_smaller() -> None:
    model = build("llama")
    x = inputs("llama")
    with torch.no_grad():
        want = logits(model, x)
    for p in model.parameters():  # as inject leaves it
        p.requires_grad_(False)
    full = accounting.base_bytes(model)
    linear = {n: m.weight.numel() * 4 for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = precision.quantize_base(model, "int8")
    assert sorted(names) == sorted(set(linear) - {"lm_head"})  # 7 in each of 2 layers
    assert len(names) == 14
    assert precision.is_quantized(model) and precision.quantized_kind(model) == "int8"
    assert linear_bytes(model, names) < 0.3 * sum(linear[n] for n in names)
    assert accounting.base_bytes(model) < 0.6 * full
    with torch.no_grad():
        assert_close_to(logits(model, x), want, INT8_TOL)
        with precision.autocast("bf16", "cpu"):  # and under autocast
            assert_close_to(logits(model, x), want, BF16_TOL)
    lt.inject(model, lt.LoraConfig(r=4, alpha=8, targets=TARGETS["llama"][1]))
    assert all(p.dtype == torch.float32 for p in lt.adapter_parameters(model).values())
    # Backward keeps the packed weights, not dequantized float copies of them.
    shapes = {tuple(model.get_submodule(n).weight.shape) for n in names}
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        model.train()(input_ids=x["input_ids"], labels=x["input_ids"]).loss.backward()
    assert saved and not [s for s in saved if tuple(s) in shapes or tuple(s)[::-1] in shapes]
    losses = lora_trains(model, x["input_ids"])
    assert losses[-1] < losses[0] - 0.05


def test_quantized_base_refusals_and_the_way_out() -> None:
    model = build("llama")
    lt.inject(model, lt.LoraConfig(r=2, targets=["q_proj"]))
    with pytest.raises(LeantuneError, match="before injecting"):
        precision.quantize_base(model, "int8")
    with pytest.raises(LeantuneError, match="int8, nf4"):
        precision.quantize_base(build("llama"), "int3")
    model = build("llama")
    assert not precision.is_quantized(model)
    precision.quantize_base(model, "int8")
    message = precision.MERGE_REFUSAL.format(kind=precision.quantized_kind(model))
    assert "quantized (int8)" in message and "without --quantize" in message
    x = inputs("llama")
    with torch.no_grad():
        quantized = logits(model, x)
    assert precision.dequantize_base(model) == 14 and not precision.is_quantized(model)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, x), quantized, atol=1e-5, rtol=1e-5)


class Wide(nn.Module):
    """Layers of 128 x 128: nf4 quantizes in blocks of 64 scaled in groups of 256."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 128)
        self.body = nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 128))
        self.lm_head = nn.Linear(128, 64)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Any:
        out = self.lm_head(self.body(self.embed(input_ids)))
        loss = nn.functional.cross_entropy(out.flatten(0, 1), labels.flatten())
        return type("Out", (), {"loss": loss, "logits": out})()


def test_nf4_base_under_lora_trains_and_is_smaller() -> None:
    torch.manual_seed(0)
    model = Wide()
    for p in model.parameters():
        p.requires_grad_(False)
    ids = inputs("llama")["input_ids"]
    with torch.no_grad():
        want = model(ids, ids).logits
    assert precision.quantize_base(model, "nf4") == ["body.0", "body.2"]
    assert precision.quantized_kind(model) == "nf4"
    assert linear_bytes(model, ["body.0", "body.2"]) < 0.2 * 2 * 128 * 128 * 4
    with torch.no_grad():
        assert_close_to(model(ids, ids).logits, want, 0.1)
    lt.inject(model, lt.LoraConfig(r=4, alpha=8, targets=["body.0", "body.2"]))
    losses = lora_trains(model, ids)
    assert losses[-1] < losses[0] - 0.05


# ---------------------------------------------------------------------------- the loop


def toy_batches(n: int = 32, batch: int = 4) -> list[dict[str, torch.Tensor]]:
    return loop_toy_batches(n, batch)


def lora_bert() -> nn.Module:
    model = build("bert")
    lt.inject(model, lt.LoraConfig(r=2, targets=["query", "value"]))
    return model


def val_loss(model: nn.Module) -> dict[str, float]:
    return {"loss": sum(model(**b).loss.item() for b in toy_batches())}


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_loop_trains_under_autocast_with_fp32_adapters(mode: str) -> None:
    model = lora_bert()
    before = {n: p.detach().clone() for n, p in lt.adapter_parameters(model).items()}
    config = TrainConfig(epochs=3, lr=5e-3, precision=mode, metric="loss", higher_is_better=False)
    seen: set[tuple[str, torch.dtype | None]] = set()

    def autocast_now() -> torch.dtype | None:
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None

    def forward(m: nn.Module, batch: Any) -> Any:
        seen.add(("train", autocast_now()))
        return m(**batch)

    def evaluate(m: nn.Module) -> dict[str, float]:
        seen.add(("eval", autocast_now()))
        return val_loss(m)

    result = train(model, lambda e: toy_batches(), evaluate, config, TrainHooks(forward=forward))
    dtype = precision.dtype_of(mode)
    assert seen == {("train", dtype), ("eval", dtype)}
    losses = [loss for _, loss in result.curve]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    for name, p in lt.adapter_parameters(model).items():
        assert p.dtype == torch.float32, name
        assert not torch.equal(p, before[name]), name


def test_bad_precision_and_a_device_that_cannot_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LeantuneError, match="fp32, bf16 or fp16"):
        TrainConfig(precision="fp8")

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("autocast to Half is not supported here")

    precision.check_base_dtype(torch.bfloat16, "cpu")
    precision.check_base_dtype(torch.float16, "cpu")
    monkeypatch.setattr(torch, "autocast", refuse)
    with pytest.raises(LeantuneError, match="use --precision bf16"):
        train(lora_bert(), lambda e: toy_batches(), val_loss, TrainConfig(precision="fp16"))
    monkeypatch.setattr(torch.nn.functional, "linear", refuse)
    with pytest.raises(LeantuneError, match="use --base-dtype bf16 or fp32"):
        precision.check_base_dtype(torch.float16, "cpu")


def overflow_at(steps: set[int], state: dict[str, int]) -> TrainHooks:
    """A penalty of value 0 whose gradient is not finite (√ at 0), during the given steps
    (1-based): what an fp16 loss-scale overflow looks like to the loop."""

    def penalty(model: nn.Module, batch: int) -> dict[str, torch.Tensor]:
        if state["done"] + 1 not in steps:
            return {}
        a = next(p for n, p in lt.adapter_parameters(model).items() if n.endswith(".A"))
        return {"nan_grad": (a.flatten()[0] * 0).sqrt()}

    def on_step(progress: Progress, total: int) -> None:
        state["done"] = progress.step

    return TrainHooks(penalty=penalty, on_step=on_step)


def test_a_scaler_skip_is_not_divergence_but_the_same_overflow_in_fp32_is() -> None:
    config = TrainConfig(epochs=1, precision="fp16", metric="loss", higher_is_better=False)
    result = train(
        lora_bert(), lambda e: toy_batches(), val_loss, config, overflow_at({2}, {"done": 0})
    )
    assert result.steps == len(toy_batches())
    # The skipped step halved the scale once (summary.json's fp16_loss_scale / _skipped_steps).
    assert (result.skipped_steps, result.loss_scale) == (1, 2.0**15)
    fp32 = TrainConfig(epochs=1, metric="loss", higher_is_better=False)
    with pytest.raises(Diverged, match="gradient norm is"):
        train(lora_bert(), lambda e: toy_batches(), val_loss, fp32, overflow_at({2}, {"done": 0}))
    every = set(range(1, 100))
    config = TrainConfig(epochs=3, precision="fp16", metric="loss", higher_is_better=False)
    with pytest.raises(Diverged, match=f"overflowed {precision.MAX_SKIPS} steps in a row"):
        train(
            lora_bert(), lambda e: toy_batches(), val_loss, config, overflow_at(every, {"done": 0})
        )


def scaler_state(folder: Path) -> dict[str, Any]:
    unit = latest_checkpoint(folder)
    assert unit is not None
    return dict(json.loads((unit / "state.json").read_text())["scaler"])


def test_resumed_fp16_run_restores_the_loss_scale(tmp_path: Path) -> None:
    """An overflow at step 2 halves the scale; a run cut at step 4 and resumed ends with the
    scale, growth count and weights of the run that was not cut."""
    config = TrainConfig(
        epochs=2, lr=3e-3, precision="fp16", metric="loss", higher_is_better=False, seed=1
    )
    straight = lora_bert()
    expected = train(
        straight,
        lambda e: toy_batches(),
        val_loss,
        config,
        overflow_at({2}, {"done": 0}),
        checkpoint=tmp_path / "straight",
    )
    want = scaler_state(tmp_path / "straight")
    assert want["scale"] == 32768.0 and want["_growth_tracker"] == expected.steps - 2

    hooks = overflow_at({2}, {"done": 0})
    count = hooks.on_step

    def stop(progress: Progress, total: int) -> None:
        assert count is not None
        count(progress, total)
        if progress.step == 4:
            signal.raise_signal(signal.SIGINT)  # the loop saves a checkpoint and returns

    first = TrainHooks(penalty=hooks.penalty, on_step=stop)
    cut = train(
        lora_bert(), lambda e: toy_batches(), val_loss, config, first, checkpoint=tmp_path / "cut"
    )
    assert cut.interrupted and cut.steps == 4
    assert scaler_state(tmp_path / "cut") == {"scale": 32768.0, "_growth_tracker": 2} | {
        k: want[k] for k in ("growth_factor", "backoff_factor", "growth_interval", "skips")
    }
    resumed = lora_bert()
    result = train(
        resumed,
        lambda e: toy_batches(),
        val_loss,
        config,
        overflow_at({2}, {"done": 4}),
        checkpoint=tmp_path / "cut",
        resume=True,
    )
    assert result.curve == expected.curve
    assert scaler_state(tmp_path / "cut") == want
    reference = dict(straight.named_parameters())
    for name, p in resumed.named_parameters():
        assert torch.equal(p, reference[name]), name


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "full"}, "--method full trains every parameter of the model"),
        ({"dora": True}, "DoRA and PiSSA change the base"),
        ({"init": "pissa"}, "DoRA and PiSSA change the base"),
    ],
)
def test_a_quantized_base_refuses_what_changes_it(options: dict[str, object], message: str) -> None:
    """Each rule sits with what it is about: full tuning in the own-parameter strategies,
    DoRA and PiSSA in LoRA's run_refusal; plain LoRA and head tuning pass."""
    from leantune.tune import make_config

    with pytest.raises(LeantuneError, match=message):
        make_config({"quantize": "int8"} | options)
    make_config({"quantize": "int8"})
    make_config({"quantize": "int8", "method": "head"})
