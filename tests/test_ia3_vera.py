"""IA3 and VeRA: the contract rows on every tiny model, the real peft both ways, a refusal, the
planner's IA3 units and ``tune --method ia3`` end to end."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import IA3Config as PeftIA3Config
from peft import PeftModel, get_peft_model
from torch import nn

import leantune as lt
from helpers import build, inputs, logits, tiny_model_folder, topic_rows, write_rows
from leantune.adapters.config import AdapterConfig
from leantune.adapters.inject import adapter_layers, module_copy_parameters
from leantune.adapters.methods.ia3 import IA3Config
from leantune.adapters.methods.vera import VeraConfig
from leantune.core.errors import TargetError

MODELS = ["bert", "llama", "gpt2", "mlp"]
GOLDEN = Path(__file__).parent / "golden" / "ia3_vera_keys.json"

# IA3 per model: peft's defaults (bert, llama, gpt2); the MLP names its own.
IA3_MLP = {"targets": ["body.0", "body.2"], "feedforward": ["body.2"], "modules_to_save": ["head"]}


def ia3(kind: str) -> AdapterConfig:
    return IA3Config(**IA3_MLP) if kind == "mlp" else IA3Config()  # type: ignore[arg-type]


VERA_TARGETS = {
    "bert": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "mlp": ["body.0", "body.2"],
}


def vera(kind: str) -> AdapterConfig:
    to_save = ["head"] if kind == "mlp" else None
    return VeraConfig(r=4, targets=VERA_TARGETS[kind], modules_to_save=to_save)


CONFIGS: dict[str, Callable[[str], AdapterConfig]] = {"ia3": ia3, "vera": vera}
CASES = [(k, m) for m in CONFIGS for k in MODELS]


def adapted(kind: str, method: str) -> nn.Module:
    model = build(kind)
    lt.inject(model, CONFIGS[method](kind))
    return model


def randomize(model: nn.Module, seed: int = 3) -> None:
    """Move the trained vectors away from their init (IA3: around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lt.adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_init_output_equals_base_exactly(kind: str, method: str) -> None:
    x = inputs(kind)
    base = logits(build(kind), x)
    torch.testing.assert_close(logits(adapted(kind, method), x), base, atol=0, rtol=0)


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_merged_equals_unmerged_and_unmerge_restores(kind: str, method: str) -> None:
    model = adapted(kind, method)
    randomize(model)
    x = inputs(kind)
    before = weights(model)
    unmerged = logits(model, x)
    assert not torch.allclose(unmerged, logits(build(kind), x), atol=1e-4), "adapter has no effect"
    lt.merge(model)
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=1e-5)
    lt.merge(model)  # idempotent
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=1e-5)
    lt.unmerge(model)
    after = weights(model)
    assert after.keys() == before.keys()
    for key in before:  # multiplied then divided: fp32 rounding only
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=1e-5, msg=key)
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_only_method_parameters_and_head_get_gradients(kind: str, method: str) -> None:
    model = adapted(kind, method).train()
    randomize(model)
    logits(model, inputs(kind)).pow(2).mean().backward()
    expected = set(lt.adapter_parameters(model))
    if kind == "bert":
        expected |= {"classifier.weight", "classifier.bias"}
    if kind == "mlp":
        expected |= {"head.weight", "head.bias"}
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert got == expected
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in got)  # type: ignore[union-attr]


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_save_load_in_fresh_model_reproduces_outputs(
    kind: str, method: str, tmp_path: Path
) -> None:
    model = adapted(kind, method)
    randomize(model)
    with torch.no_grad():  # a trained head must travel with the adapter
        for p in module_copy_parameters(model).values():
            p.add_(0.5)
    x = inputs(kind)
    expected = logits(model, x)
    lt.save_adapter(model, tmp_path / "adapter")
    fresh = build(kind)
    lt.load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh, x), expected, atol=0, rtol=0)


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_saved_key_set_is_pinned(kind: str, method: str) -> None:
    """Keys and shapes match tests/golden/ia3_vera_keys.json (LEANTUNE_UPDATE_GOLDEN=1 rewrites
    it)."""
    found = {
        k: list(v.shape) for k, v in sorted(lt.adapter_state_dict(adapted(kind, method)).items())
    }
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    case = f"{kind}/{method}"
    if os.environ.get("LEANTUNE_UPDATE_GOLDEN"):
        golden[case] = found
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    assert found == golden[case]


@pytest.mark.parametrize("kind", MODELS)
def test_ia3_mixed_batch_rows_equal_their_own_adapter(kind: str) -> None:
    model = build(kind)
    lt.inject(model, ia3(kind), "a")
    lt.inject(model, ia3(kind), "b")
    randomize(model)
    x = inputs(kind, batch=3)
    want = []
    for name in ("a", "b"):
        lt.set_active(model, name)
        want.append(logits(model, x))
    with lt.disable(model):
        base = logits(model, x)
    names = ["a", lt.BASE, "b"]
    with lt.mixed_batch(model, names):
        got = logits(model, x)
    expected = torch.stack([want[0][0], base[1], want[1][2]])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- peft both ways


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_leantune_adapter_loads_in_peft(kind: str, method: str, tmp_path: Path) -> None:
    model = adapted(kind, method)
    randomize(model)
    x = inputs(kind)
    expected = logits(model, x)
    lt.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(build(kind), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, x), expected, atol=1e-5, rtol=1e-5)


PEFT_IA3 = {
    "bert": {"task_type": "SEQ_CLS"},  # peft's defaults; the classifier travels along
    "llama": {},
    "gpt2": {},
    "mlp": {"target_modules": ["body.0", "body.2"], "feedforward_modules": ["body.2"]},
}


@pytest.mark.parametrize("kind", MODELS)
def test_peft_ia3_adapter_loads_in_leantune(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(5)
    cfg = PeftIA3Config(init_ia3_weights=False, **PEFT_IA3[kind])  # type: ignore[arg-type]
    peft_model = get_peft_model(build(kind), cfg).eval()
    if kind == "bert":
        with torch.no_grad():
            peft_model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    x = inputs(kind)
    expected = logits(peft_model, x)
    peft_model.save_pretrained(tmp_path)
    model = build(kind)
    lt.load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- refusals, plans


def test_ia3_on_an_embedding_is_refused_in_one_line() -> None:
    with pytest.raises(TargetError) as e:
        lt.inject(build("bert"), IA3Config(targets=["word_embeddings"]))
    assert "\n" not in str(e.value)
    assert "word_embeddings (Embedding)" in str(e.value) and "ia3 cannot adapt" in str(e.value)


def test_ia3_zero_entry_refuses_to_merge() -> None:
    model = adapted("mlp", "ia3")
    with torch.no_grad():
        next(iter(lt.adapter_parameters(model).values()))[0] = 0.0
    with pytest.raises(lt.LeantuneError, match="could not be undone"):
        lt.merge(model)


def test_ia3_l2_change_equals_the_dense_change() -> None:
    model = adapted("gpt2", "ia3")  # Conv1D: the change is oriented like the stored weight
    randomize(model)
    for name, layer in adapter_layers(model):
        dense = sum(float(c.values.detach().pow(2).sum()) for c in layer.change_entries("default"))
        shapes = {c.base: c.values.shape for c in layer.change_entries("default")}
        assert shapes["weight"] == model.get_submodule(name).weight.shape
        assert float(layer.l2_change("default").detach()) == pytest.approx(dense, rel=1e-5)


def test_planner_buys_ia3_vectors_and_its_gain_estimate_bounds_the_exact_one() -> None:
    """One unit = one module's output vector; the plan's adapter injects and loads in peft's
    format. The estimate taylor²/out is an upper bound of the exact ‖∂L/∂l‖² at l = 1."""
    from leantune.analysis.plan import allocate
    from leantune.analysis.select import score

    model = build("bert")
    x = inputs("bert", batch=4) | {"labels": torch.tensor([0, 1, 2, 1])}
    scores = score(model, [x], skip=["classifier"])
    plan = allocate(scores, 200, 10**6, methods=["ia3"])
    entries = plan.of("ia3")
    assert entries and all(e.size == e.params == 32 for e in entries)  # out of a 32-wide layer
    config = plan.adapter_config()
    assert isinstance(config, IA3Config)
    lt.inject(model, config)
    model.zero_grad()
    model(**x).loss.backward()
    for e in entries:  # exact gain: the vector's own gradient at init
        layer = model.get_submodule(e.module)
        exact = float(layer.ia3["default"].scale.grad.pow(2).sum())  # type: ignore[union-attr]
        assert 0 < exact <= e.gain * (1 + 1e-4)


def test_tune_method_ia3_end_to_end_saves_an_adapter_peft_loads(tmp_path: Path) -> None:
    from leantune.tune import TuneConfig, run_tune

    folder = tiny_model_folder(tmp_path / "tiny-bert")
    data = write_rows(tmp_path / "topics.jsonl", topic_rows(60))
    config = TuneConfig(
        model=str(folder),
        data=str(data),
        runs_dir=str(tmp_path / "runs"),
        name="t",
        method="ia3",
        batch_size=8,
        epochs=1,
        layers="all",
    )
    assert config.resolved().lr == IA3Config.default_lr
    summary = run_tune(config)
    adapter = tmp_path / "runs" / "t" / "adapter"
    raw = json.loads((adapter / "adapter_config.json").read_text())
    assert raw["peft_type"] == "IA3" and len(raw["target_modules"]) == 12
    assert 0 < summary["trainable_params"] < summary["total_params"]
    from transformers import AutoModelForSequenceClassification

    ids = {"input_ids": torch.tensor([[2, 5, 9, 3]])}
    ours = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    lt.load_adapter(ours, adapter)
    theirs = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(folder), adapter
    ).eval()
    assert not torch.equal(
        ours.bert.encoder.layer[0].attention.self.key.ia3["default"].scale, torch.ones(32, 1)
    )
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("kind", MODELS)
def test_peft_vera_adapter_loads_in_leantune(
    kind: str, save_projection: bool, tmp_path: Path
) -> None:
    """With the projections in the file, and without: then redrawn from projection_prng_key."""
    from peft import VeraConfig as PeftVeraConfig

    cfg = PeftVeraConfig(
        r=4,
        target_modules=VERA_TARGETS[kind],
        projection_prng_key=7,
        save_projection=save_projection,
    )
    peft_model = get_peft_model(build(kind), cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # λ_b and λ_d away from their init
        for n, p in peft_model.named_parameters():
            if "vera_lambda" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    x = inputs(kind)
    expected = logits(peft_model, x)
    peft_model.save_pretrained(tmp_path)
    model = build(kind)
    lt.load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=1e-5)
