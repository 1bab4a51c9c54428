"""Issue 13, adapter library: nothing lost, nothing silently wrong.

Heads saved with an adapter belong to that adapter (item 17); unload and disable give the base
model back exactly (item 18); every method runs under autocast (item 19); NaN/inf adapters are
refused on load, merge and save (item 6); and a fuzzed adapter folder either loads or is refused
with a LeantuneError, leaving the model as it was.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import leantune as lt
from helpers import build, inputs, logits
from leantune.adapters.base import records
from leantune.adapters.config import MixedConfig
from leantune.adapters.formats import CONFIG_NAME, WEIGHTS_NAME, read_adapter_files
from leantune.adapters.inject import adapter_layers, module_copy_parameters
from leantune.adapters.methods.bitfit import BitFitConfig
from leantune.adapters.methods.layernorm import LayerNormConfig
from leantune.adapters.methods.sparse import SparseConfig
from test_contract import randomize


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, equal_nan=True, msg=key)


def head_shift(model: nn.Module, name: str, amount: float) -> None:
    """Train adapter ``name``'s saved head: move it by ``amount``."""
    with torch.no_grad():
        for p in module_copy_parameters(model, name).values():
            p.add_(amount)


def trained(kind: str, name: str, seed: int, shift: float, **cfg: Any) -> nn.Module:
    """A base model with adapter ``name``: LoRA moved off its init and a trained head."""
    model = build(kind)
    to_save = ["head"] if kind == "mlp" else None
    targets = ["body.0"] if kind == "mlp" else ["query"]
    lt.inject(model, lt.LoraConfig(r=4, targets=targets, modules_to_save=to_save, **cfg), name)
    randomize(model, seed)
    head_shift(model, name, shift)
    return model


# ---------------------------------------------------------------------------- item 17


@pytest.fixture
def two_heads(tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Adapters "a" and "b" saved from two BERTs, each with its own trained head."""
    x = inputs("bert")
    want, dirs = {}, {}
    for name, seed, shift in (("a", 3, 0.45), ("b", 4, -0.3)):
        model = trained("bert", name, seed, shift)
        want[name] = logits(model, x)
        dirs[name] = lt.save_adapter(model, tmp_path / name)
    return want, dirs


def test_item17_each_loaded_adapter_keeps_its_own_head(two_heads: Any) -> None:
    want, dirs = two_heads
    model = build("bert")
    lt.load_adapter(model, dirs["a"], "a")
    lt.load_adapter(model, dirs["b"], "b")
    x = inputs("bert")
    torch.testing.assert_close(logits(model, x), want["b"], atol=1e-6, rtol=1e-6)
    lt.set_active(model, "a")
    torch.testing.assert_close(logits(model, x), want["a"], atol=1e-6, rtol=1e-6)
    lt.set_active(model, "b")
    torch.testing.assert_close(logits(model, x), want["b"], atol=1e-6, rtol=1e-6)


def test_item17_mixed_batch_runs_each_row_through_its_own_head(two_heads: Any) -> None:
    want, dirs = two_heads
    model = build("bert")
    x = inputs("bert", batch=4)
    with torch.no_grad():
        base = logits(model, x)
    lt.load_adapter(model, dirs["a"], "a")
    lt.load_adapter(model, dirs["b"], "b")
    per = {lt.BASE: base}
    for name in ("a", "b"):
        lt.set_active(model, name)
        per[name] = logits(model, x)
        torch.testing.assert_close(per[name][:3], want[name], atol=1e-6, rtol=1e-6)
    names = ["b", lt.BASE, "a", "b"]
    with lt.mixed_batch(model, names):
        got = logits(model, x)
    for i, name in enumerate(names):
        torch.testing.assert_close(got[i], per[name][i], atol=1e-6, rtol=1e-6)
    # After the block the active adapter and its head are back.
    torch.testing.assert_close(logits(model, x), per["b"], atol=0, rtol=0)


def test_item17_save_adapter_writes_the_named_adapters_head(two_heads: Any, tmp_path: Path) -> None:
    want, dirs = two_heads
    model = build("bert")
    lt.load_adapter(model, dirs["a"], "a")
    lt.load_adapter(model, dirs["b"], "b")
    assert lt.active_adapter(model) == "b"
    lt.save_adapter(model, tmp_path / "again", name="a")
    fresh = build("bert")
    lt.load_adapter(fresh, tmp_path / "again")
    torch.testing.assert_close(logits(fresh, inputs("bert")), want["a"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["bert", "mlp"])
def test_item17_injected_adapters_train_separate_heads(kind: str) -> None:
    model = build(kind)
    x = inputs(kind)
    base = logits(model, x)
    to_save = ["head"] if kind == "mlp" else None
    targets = ["body.0"] if kind == "mlp" else ["query"]
    lt.inject(model, lt.LoraConfig(r=4, targets=targets, modules_to_save=to_save), "a")
    lt.inject(model, lt.LoraConfig(r=4, targets=targets, modules_to_save=to_save), "b")
    heads_a, heads_b = module_copy_parameters(model, "a"), module_copy_parameters(model, "b")
    assert heads_a.keys() == heads_b.keys() and heads_a
    assert all(heads_a[k] is not heads_b[k] for k in heads_a)
    head_shift(model, "b", 0.45)  # train b's head only
    lt.set_active(model, "a")  # a's LoRA is still at its init and its head untouched
    torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)
    # The second adapter's head is not matched as a LoRA target of a third.
    lt.inject(model, lt.LoraConfig(r=2, targets="all-linear"), "c")
    assert not any(
        n.startswith(to_save[0] if to_save else "classifier") for n, _ in adapter_layers(model)
    )


# ---------------------------------------------------------------------------- item 18


@pytest.mark.parametrize("kind", ["bert", "mlp"])
def test_item18_unload_and_disable_give_the_base_model_bit_exact(kind: str) -> None:
    model = build(kind)
    x = inputs(kind)
    base, before = logits(model, x), state(model)
    types = [type(m) for m in model.modules()]
    to_save = ["head"] if kind == "mlp" else None
    targets = ["body.0"] if kind == "mlp" else ["query"]
    lt.inject(model, lt.LoraConfig(r=4, targets=targets, modules_to_save=to_save), "a")
    randomize(model)
    head_shift(model, "a", 0.45)
    assert not torch.allclose(logits(model, x), base)
    with lt.disable(model):
        torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)
    lt.unload(model)
    torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)
    assert_same_state(state(model), before)
    assert [type(m) for m in model.modules()] == types


def test_item18_unload_of_loaded_adapters_gives_the_base_model(two_heads: Any) -> None:
    _, dirs = two_heads
    model = build("bert")
    x = inputs("bert")
    base, before = logits(model, x), state(model)
    lt.load_adapter(model, dirs["a"], "a")
    lt.load_adapter(model, dirs["b"], "b")
    with lt.disable(model):
        torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)
    lt.remove_adapter(model, "b")
    lt.unload(model)
    torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)
    assert_same_state(state(model), before)


def test_item18_unload_with_merge_keeps_the_active_adapters_head(two_heads: Any) -> None:
    want, dirs = two_heads
    model = build("bert")
    x = inputs("bert")
    lt.load_adapter(model, dirs["a"], "a")
    lt.load_adapter(model, dirs["b"], "b")
    lt.set_active(model, "a")
    lt.unload(model, merge_active=True)
    assert not list(adapter_layers(model)) and not records(model)
    assert {type(m) for m in model.modules()} == {type(m) for m in build("bert").modules()}
    torch.testing.assert_close(logits(model, x), want["a"], atol=1e-5, rtol=1e-5)
    assert set(state(model)) == set(build("bert").state_dict())


def test_item18_heads_kept_aside_follow_a_cast_of_the_model(two_heads: Any) -> None:
    """Heads not in the model (the original, other adapters' copies) follow .to() lazily."""
    _, dirs = two_heads
    model = build("bert")
    x = inputs("bert")
    lt.load_adapter(model, dirs["a"], "a")
    lt.load_adapter(model, dirs["b"], "b")
    model.to(torch.float64)
    reference = build("bert").to(torch.float64)
    with lt.disable(model):
        torch.testing.assert_close(logits(model, x), logits(reference, x), atol=0, rtol=0)
    with lt.mixed_batch(model, ["a", "b", lt.BASE]):
        assert logits(model, x).dtype == torch.float64
    lt.set_active(model, "a")
    assert logits(model, x).dtype == torch.float64
    lt.unload(model)
    torch.testing.assert_close(logits(model, x), logits(reference, x), atol=0, rtol=0)


# ---------------------------------------------------------------------------- item 19


def delta_config(method: str, model: nn.Module) -> lt.AdapterConfig:
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"]
    g = torch.Generator().manual_seed(5)
    masks = {
        n: torch.randperm(model.get_submodule(n).weight.numel(), generator=g)[:8] for n in names
    }
    if method == "bitfit":
        return BitFitConfig(targets=["output.dense", "intermediate.dense"])
    if method == "layernorm":
        return LayerNormConfig()
    if method == "sparse":
        return SparseConfig(targets=names, masks=masks)
    return MixedConfig(
        parts=[
            lt.LoraConfig(targets=["bert.encoder.layer.2.attention.self.value"], r=2),
            SparseConfig(targets=names, masks=masks),
            LayerNormConfig(targets=["bert.encoder.layer.2.output.LayerNorm"]),
            BitFitConfig(targets=["bert.encoder.layer.0.output.dense"]),
        ]
    )


@pytest.mark.parametrize("method", ["bitfit", "layernorm", "sparse", "mixed"])
def test_item19_delta_methods_and_mixed_batches_under_autocast(method: str) -> None:
    model = build("bert")
    lt.inject(model, delta_config(method, model), "a")
    lt.inject(model, lt.LoraConfig(r=4, targets=["key", "value"], dropout=0.1), "b")
    randomize(model)
    x = inputs("bert")
    names = ["a", lt.BASE, "b"]
    with lt.mixed_batch(model, names):
        want = logits(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16), lt.mixed_batch(model, names):
        got = logits(model, x)
    scale = float(want.detach().abs().max())  # the contract table's bf16 tolerance
    torch.testing.assert_close(got.float(), want, atol=0.1 * scale, rtol=0)
    # Training steps under autocast: dropout's own backward and a bf16 forward.
    model.train()
    lt.mark_trainable(model, "b")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = logits(model, x).float().pow(2).mean()
    loss.backward()
    grads = [p.grad for p in lt.adapter_parameters(model, "b").values()]
    assert all(g is not None and g.dtype == torch.float32 and g.isfinite().all() for g in grads)


# ---------------------------------------------------------------------------- item 6


def poisoned(folder: Path, key_part: str, value: float) -> str:
    """Put ``value`` into the first tensor whose key has ``key_part``; return that key."""
    tensors = load_file(folder / WEIGHTS_NAME)
    key = next(k for k in sorted(tensors) if key_part in k)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    return key


@pytest.mark.parametrize(
    ("part", "value"), [("lora_B", float("nan")), ("classifier", float("inf"))]
)
def test_item06_non_finite_adapter_files_are_refused(
    tmp_path: Path, part: str, value: float
) -> None:
    model = trained("bert", "default", 3, 0.1)
    folder = lt.save_adapter(model, tmp_path / "adapter")
    key = poisoned(folder, part, value)
    pattern = rf"{WEIGHTS_NAME}.*{key}.*(NaN|inf).*diverged.*--lr"
    with pytest.raises(lt.LeantuneError, match=pattern):
        read_adapter_files(folder)
    fresh = build("bert")
    base = logits(fresh, inputs("bert"))
    with pytest.raises(lt.LeantuneError, match=pattern):
        lt.load_adapter(fresh, folder)
    assert not list(adapter_layers(fresh)) and not records(fresh)
    torch.testing.assert_close(logits(fresh, inputs("bert")), base, atol=0, rtol=0)


def test_item06_merge_and_save_refuse_non_finite_adapters(tmp_path: Path) -> None:
    model = trained("bert", "default", 3, 0.1)
    layer = next(layer for _, layer in adapter_layers(model))
    with torch.no_grad():
        next(iter(layer.adapter_params().values())).view(-1)[0] = float("nan")
    before = state(model)
    for merge in (lambda: lt.merge(model), lambda: lt.unload(model, merge_active=True)):
        with pytest.raises(lt.LeantuneError, match=r"(NaN|inf).*diverged.*--lr"):
            merge()
        assert list(adapter_layers(model))
        assert_same_state(state(model), before)
    with pytest.raises(lt.LeantuneError, match=r"lora.*(NaN|inf).*diverged.*--lr"):
        lt.save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
    # A NaN head is refused as well.
    model = trained("bert", "default", 3, 0.1)
    head_shift(model, "default", float("inf"))
    with pytest.raises(lt.LeantuneError, match=r"classifier.*(NaN|inf)"):
        lt.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(lt.LeantuneError, match=r"classifier.*(NaN|inf)"):
        lt.unload(model, merge_active=True)


# ---------------------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A peft-type LoRA adapter and a leantune-type mixed one, saved from a tiny BERT."""
    root = tmp_path_factory.mktemp("fuzz")
    out = {}
    model = build("bert")
    lt.inject(model, lt.LoraConfig(r=4, alpha=8, targets=["query", "value"]))
    randomize(model)
    out["LORA"] = lt.save_adapter(model, root / "lora")
    model = build("bert")
    lt.inject(model, delta_config("mixed", model))
    randomize(model)
    out["LEANTUNE"] = lt.save_adapter(model, root / "leantune")
    return out


WORDS = [
    "", "(", "[a-", "*", ".*", "query", "value", "classifier", "score", "8", "-1", "gaussian",
    "pissa", "LORA", "LEANTUNE", "PREFIX_TUNING", "SEQ_CLS", "layer", "lora", "sparse", "bitfit",
    "bert.encoder.layer.0.attention.self.query",
]  # fmt: skip
ODD = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**40), max_value=2**63),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(WORDS),
        st.text(max_size=6),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=12), inner, max_size=3)
    ),
    max_leaves=6,
)
# Values of the wrong type or range that a lenient reader coerces or trips over.
NASTY = [
    [1, 2], 5, "(", {"(": 4}, {"query": True}, {"query": "8"}, True, "8", 4.5, 10**12, -1, 0,
    None, float("nan"), float("inf"), [], {}, [""], ["("], "x", [None],
]  # fmt: skip
VALUES = st.one_of(st.sampled_from(NASTY), ODD)
FIELDS = [
    "r", "lora_alpha", "target_modules", "peft_type", "rank_pattern", "alpha_pattern",
    "modules_to_save", "lora_dropout", "use_dora", "use_rslora", "layers_to_transform",
    "layers_pattern", "exclude_modules", "task_type", "init_lora_weights", "bias",
    "format_version", "modules", "lora_bias",
]  # fmt: skip
SPEC_FIELDS = ["r", "alpha", "method", "dropout", "dora", "rslora", "size", None]
# One edit of adapter_config.json: ("set", key, value), ("delete", key), ("module", i, key or
# None for the whole entry, value) on the i-th module of a LEANTUNE table; or a whole file:
# ("not-object", value), ("bad", share of the text kept, bytes after it).
CONFIG_EDITS = st.one_of(
    st.lists(
        st.one_of(
            st.tuples(st.just("set"), st.sampled_from(FIELDS), VALUES),
            st.tuples(st.just("set"), st.sampled_from(FIELDS), VALUES),
            st.tuples(st.just("delete"), st.sampled_from(FIELDS)),
            st.tuples(st.just("module"), st.integers(0, 9), st.sampled_from(SPEC_FIELDS), VALUES),
        ),
        min_size=1,
        max_size=3,
    ),
    st.tuples(st.just("not-object"), st.one_of(st.lists(ODD), st.integers(), st.text())),
    st.tuples(st.just("bad"), st.floats(0, 0.99), st.sampled_from([b"", b"\xff\xfe", b"}", b"{{"])),
)


def edit_config(raw: dict[str, Any], edit: Any) -> bytes:
    if isinstance(edit, tuple) and edit[0] == "not-object":
        return json.dumps(edit[1]).encode()
    if isinstance(edit, tuple) and edit[0] == "bad":
        text = json.dumps(raw).encode()
        return text[: int(edit[1] * len(text))] + edit[2]
    cfg = json.loads(json.dumps(raw))
    for op in edit:
        value = json.loads(json.dumps(op[-1]))  # its own object: no shared or circular parts
        if op[0] == "set":
            cfg[op[1]] = value
        elif op[0] == "delete":
            cfg.pop(op[1], None)
        elif isinstance(cfg.get("modules"), dict) and cfg["modules"]:
            module = sorted(cfg["modules"])[op[1] % len(cfg["modules"])]
            spec = cfg["modules"][module]
            if op[2] is None or not isinstance(spec, dict):
                cfg["modules"][module] = value
            else:
                spec[op[2]] = value
    return json.dumps(cfg).encode()


# One edit of adapter_model.safetensors, on the i-th tensor (sorted names) where it needs one.
WEIGHT_KINDS = [
    "truncate", "length", "not-object", "dtype", "shape", "offsets", "rename", "model-shape",
    "extra",
]  # fmt: skip
WEIGHT_EDITS = st.tuples(
    st.sampled_from(WEIGHT_KINDS),
    st.integers(0, 40),
    st.one_of(
        st.integers(-2, 2**64 - 1),
        st.sampled_from(["X99", "F8", "I64", "BOOL", "C64", "", "U8", "F16"]),
        st.lists(st.integers(-2, 4096), max_size=3),
        st.lists(ODD, max_size=2),
    ),
)


def edit_weights(blob: bytes, edit: tuple[str, int, Any]) -> bytes:
    from safetensors.torch import load, save

    kind, index, param = edit
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    body = blob[8 + n :]
    names = sorted(k for k in header if k != "__metadata__")
    name = names[index % len(names)]
    number = param if isinstance(param, int) else len(str(param))
    if kind == "truncate":
        return blob[: number % len(blob)]
    if kind == "length":
        return struct.pack("<Q", max(number, len(blob)) % 2**64) + blob[8:]
    if kind == "not-object":
        head = json.dumps(param).encode()
        return struct.pack("<Q", len(head)) + head + body
    if kind in ("model-shape", "extra"):  # well-formed files that do not fit the model
        tensors = dict(load(blob))
        if kind == "model-shape":
            shape = [max(1, s + number % 3 - 1) for s in tensors[name].shape] or [2]
            tensors[name] = torch.randn(shape)
        else:
            extra = ["base_model.model.bert.pooler.dense.weight", "other", names[0] + ".x"]
            tensors[extra[number % 3]] = torch.randn(2, 2)
        return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    entry = header[name]
    if kind == "dtype":
        entry["dtype"] = param if isinstance(param, str) else "X99"
    elif kind == "shape":
        entry["shape"] = param if isinstance(param, list) else [number % 64]
    elif kind == "offsets":
        entry["data_offsets"] = param if isinstance(param, list) else [0, number % 4096]
    else:  # rename: a tensor the model has no place for
        header[name.replace("query", "querry") + ("" if number % 2 else ".x")] = header.pop(name)
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + body


def check_load_or_refuse(folder: Path) -> None:
    """load_adapter loads the folder, or raises a LeantuneError and the model is as it was."""
    model = build("bert")
    x = inputs("bert")
    lt.inject(model, lt.LoraConfig(r=2, targets=["key"]), "kept")
    randomize(model, 7)
    with torch.no_grad():
        before_out = logits(model, x)
    before = state(model)
    types = [(n, type(m)) for n, m in model.named_modules()]
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        lt.load_adapter(model, folder, "fuzzed")
    except lt.LeantuneError as e:
        assert str(e) and "\n" not in str(e)
        assert list(records(model)) == ["kept"] and lt.active_adapter(model) == "kept"
        assert [(n, type(m)) for n, m in model.named_modules()] == types
        assert_same_state(state(model), before)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
        torch.testing.assert_close(logits(model, x), before_out, atol=0, rtol=0)
        return
    # It loaded: the forward runs and removing it gives the model back.
    logits(model, x)
    lt.remove_adapter(model, "fuzzed")
    assert lt.active_adapter(model) == "kept"
    torch.testing.assert_close(logits(model, x), before_out, atol=0, rtol=0)


def copy_adapter(src: Path, dest: Path, config: bytes | None, weights: bytes | None) -> None:
    for name, blob in ((CONFIG_NAME, config), (WEIGHTS_NAME, weights)):
        (dest / name).write_bytes(blob if blob is not None else (src / name).read_bytes())


# LEANTUNE_FUZZ_EXAMPLES=1000 searches harder (random seeds); the default run is repeatable.
_EXAMPLES = int(os.environ.get("LEANTUNE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_EXAMPLES or 50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=not _EXAMPLES,
)


@FUZZ
@given(kind=st.sampled_from(["LORA", "LEANTUNE"]), edit=CONFIG_EDITS)
# Cases that crashed with TypeError/re.error or loaded wrongly before issue 13:
@example(kind="LORA", edit=[("set", "target_modules", [1, 2])])
@example(kind="LORA", edit=[("set", "rank_pattern", {"(": 4})])
@example(kind="LORA", edit=[("set", "layers_to_transform", [0]), ("set", "layers_pattern", 5)])
@example(kind="LORA", edit=[("set", "modules_to_save", [3])])
@example(kind="LEANTUNE", edit=[("module", 0, "r", float("inf"))])
def test_item06_fuzzed_adapter_config_loads_or_is_refused_cleanly(
    saved_adapters: dict[str, Path], tmp_path: Path, kind: str, edit: Any
) -> None:
    src = saved_adapters[kind]
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    copy_adapter(src, folder, edit_config(json.loads((src / CONFIG_NAME).read_text()), edit), None)
    check_load_or_refuse(folder)


@FUZZ
@given(kind=st.sampled_from(["LORA", "LEANTUNE"]), edit=WEIGHT_EDITS)
# A new head (right shape, other values) used to stay in the model after remove_adapter:
@example(kind="LEANTUNE", edit=("model-shape", 9, 1))
def test_item06_fuzzed_safetensors_loads_or_is_refused_cleanly(
    saved_adapters: dict[str, Path], tmp_path: Path, kind: str, edit: tuple[str, int, Any]
) -> None:
    src = saved_adapters[kind]
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    copy_adapter(src, folder, None, edit_weights((src / WEIGHTS_NAME).read_bytes(), edit))
    check_load_or_refuse(folder)


def test_item06_odd_config_values_are_refused_not_misread(
    saved_adapters: dict[str, Path], tmp_path: Path
) -> None:
    """Values that a lenient reader would turn into another adapter are refused."""
    src = saved_adapters["LORA"]
    raw = json.loads((src / CONFIG_NAME).read_text())
    cases: list[tuple[str, Any, str]] = [
        ("r", 4.5, "r"),
        ("r", "4", "r"),
        ("r", True, "r"),
        ("r", 10**12, "rank"),
        ("lora_alpha", "8", "lora_alpha"),
        ("lora_alpha", float("inf"), "lora_alpha"),
        ("use_rslora", "false", "use_rslora"),
        ("target_modules", [1, 2], "target_modules"),
        ("target_modules", "(", "regex"),
        ("rank_pattern", {"(": 4}, "rank_pattern"),
        ("rank_pattern", {"query": True}, "rank_pattern"),
        ("modules_to_save", [3], "modules_to_save"),
        ("layers_pattern", 5, "layers_pattern"),
        ("layers_pattern", "(", "layers_pattern"),
        ("layers_to_transform", ["0"], "layers_to_transform"),
    ]
    for i, (key, value, message) in enumerate(cases):
        folder = tmp_path / str(i)
        folder.mkdir()
        copy_adapter(src, folder, json.dumps({**raw, key: value}).encode(), None)
        with pytest.raises(lt.LeantuneError, match=message):
            lt.load_adapter(build("bert"), folder)
