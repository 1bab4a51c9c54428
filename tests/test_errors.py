"""Bad input: each case gives a clear error and leaves the model and files as they were."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import leantune as lt
from helpers import build, inputs, logits, tiny_bert
from leantune.adapters import formats
from leantune.adapters.base import records
from leantune.adapters.inject import adapter_layers
from test_contract import randomize


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = build("bert")
    lt.inject(model, lt.LoraConfig(r=4, targets=["query", "value"]))
    randomize(model)
    return lt.save_adapter(model, tmp_path / "adapter")


def assert_untouched(model: torch.nn.Module, kind: str) -> None:
    assert not list(adapter_layers(model))
    assert not records(model)
    torch.testing.assert_close(logits(model, inputs(kind)), logits(build(kind), inputs(kind)))


def test_targets_matching_nothing_list_closest_names() -> None:
    model = build("bert")
    with pytest.raises(lt.TargetError, match=r"match no module; closest module names: query"):
        lt.inject(model, lt.LoraConfig(targets=["querry"]))
    with pytest.raises(lt.TargetError, match=r"in layers \[7\]"):
        lt.inject(model, lt.LoraConfig(targets=["query"], layers=[7]))
    with pytest.raises(lt.TargetError, match="cannot adapt"):
        lt.inject(model, lt.LoraConfig(targets=["LayerNorm"]))
    with pytest.raises(lt.TargetError, match="not a valid regex"):
        lt.LoraConfig(targets="(unclosed")
    assert_untouched(model, "bert")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "rank r must be a positive integer"),
        ({"r": -2}, "rank r must be a positive integer"),
        ({"alpha": 0}, "alpha must be positive"),
        ({"alpha": -1.0}, "alpha must be positive"),
        ({"dropout": 1.0}, "dropout"),
        ({"init": "svd"}, "init 'svd' is unknown"),
        ({"rank_pattern": {"query": 0}}, "rank_pattern"),
        ({"dora": True, "init": "pissa"}, "DoRA with PiSSA"),
    ],
)
def test_bad_lora_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(lt.LeantuneError, match=message):
        lt.LoraConfig(**kwargs)


def test_same_adapter_name_twice() -> None:
    model = build("bert")
    lt.inject(model, lt.LoraConfig(targets=["query"]))
    with pytest.raises(lt.LeantuneError, match="already in this model"):
        lt.inject(model, lt.LoraConfig(targets=["value"]))
    assert {n for n, _ in adapter_layers(model)} == {
        f"bert.encoder.layer.{i}.attention.self.query" for i in range(3)
    }


def test_dora_on_embedding_rolls_back() -> None:
    model = build("bert")
    with pytest.raises(lt.LeantuneError, match="DoRA adapts Linear and Conv1D"):
        lt.inject(model, lt.LoraConfig(targets=["query", "word_embeddings"], dora=True))
    assert_untouched(model, "bert")


def test_adapter_for_other_modules_or_shapes(saved: Path) -> None:
    before = digest(saved)
    llama = build("llama")
    with pytest.raises(lt.TargetError, match="match no module"):
        lt.load_adapter(llama, saved)
    assert_untouched(llama, "llama")
    # Same names, other sizes: a wider BERT.
    torch.manual_seed(0)
    wide = tiny_bert(hidden=48).eval()
    x = inputs("bert")
    expected = logits(wide, x)
    with pytest.raises(
        lt.AdapterFileError, match=r"has shape \(4, 32\) but the model needs \(4, 48\)"
    ):
        lt.load_adapter(wide, saved)
    assert not list(adapter_layers(wide))
    torch.testing.assert_close(logits(wide, x), expected, atol=0, rtol=0)
    assert digest(saved) == before


def test_file_with_unknown_or_missing_tensors(saved: Path) -> None:
    tensors = load_file(saved / formats.WEIGHTS_NAME)
    key = next(k for k in tensors if "lora_A" in k)
    extra = dict(tensors) | {"base_model.model.bert.nothing.lora_A.weight": torch.zeros(1)}
    save_file(extra, saved / formats.WEIGHTS_NAME)
    model = build("bert")
    with pytest.raises(lt.AdapterFileError, match="fits no module"):
        lt.load_adapter(model, saved)
    assert_untouched(model, "bert")
    tensors.pop(key)
    save_file(tensors, saved / formats.WEIGHTS_NAME)
    with pytest.raises(lt.AdapterFileError, match="lacks"):
        lt.load_adapter(model, saved)
    assert_untouched(model, "bert")


@pytest.mark.parametrize("cut", [0, 5, 100, -10])
def test_truncated_or_corrupt_safetensors(saved: Path, cut: int) -> None:
    weights = saved / formats.WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[:cut])
    before = digest(saved)
    model = build("bert")
    with pytest.raises(lt.AdapterFileError, match="truncated or corrupt"):
        lt.load_adapter(model, saved)
    assert digest(saved) == before
    assert_untouched(model, "bert")


def test_garbage_header_and_bad_json(saved: Path) -> None:
    weights = saved / formats.WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[10:20] = b"@@@@@@@@@@"
    weights.write_bytes(bytes(data))
    with pytest.raises(lt.AdapterFileError, match="truncated or corrupt"):
        lt.load_adapter(build("bert"), saved)
    (saved / formats.CONFIG_NAME).write_text("{not json")
    with pytest.raises(lt.AdapterFileError, match="not valid JSON"):
        lt.load_adapter(build("bert"), saved)


def test_pickle_offered_as_adapter_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / formats.CONFIG_NAME).write_text(
        json.dumps({"peft_type": "LORA", "target_modules": ["query"]})
    )
    torch.save({"w": torch.zeros(2)}, folder / "adapter_model.bin")
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"w": 1}))
    before = digest(folder)
    # Nothing may unpickle: make any attempt fail loudly.
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    for target in (folder, folder / "adapter_model.bin", tmp_path / "raw.pkl"):
        with pytest.raises(lt.AdapterFileError, match="pickle"):
            lt.load_adapter(build("bert"), target)
    # A pickle renamed to .safetensors is caught too.
    (folder / "adapter_model.bin").rename(folder / formats.WEIGHTS_NAME)
    with pytest.raises(lt.AdapterFileError, match="never unpickles"):
        lt.load_adapter(build("bert"), folder)
    assert digest(folder) == {
        formats.WEIGHTS_NAME: before["adapter_model.bin"],
        formats.CONFIG_NAME: before[formats.CONFIG_NAME],
    }


def test_unsupported_peft_configs(saved: Path) -> None:
    cfg_path = saved / formats.CONFIG_NAME
    good = json.loads(cfg_path.read_text())
    for change, message in [
        ({"peft_type": "LOHA"}, "peft_type 'LOHA' is not supported"),
        ({"bias": "all"}, "bias training"),
        ({"init_lora_weights": "pissa"}, "rewritten base model"),
        ({"target_modules": []}, "no target_modules"),
        ({"r": 0}, "rank r must be a positive"),
    ]:
        cfg_path.write_text(json.dumps(good | change))
        model = build("bert")
        with pytest.raises(lt.LeantuneError, match=message):
            lt.load_adapter(model, saved)
        assert_untouched(model, "bert")


def test_missing_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(lt.AdapterFileError, match="does not exist"):
        lt.load_adapter(build("bert"), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(lt.AdapterFileError, match=r"no adapter_model\.safetensors"):
        lt.load_adapter(build("bert"), tmp_path / "empty")


def test_save_never_destroys_other_folders_or_half_writes(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build("bert")
    lt.inject(model, lt.LoraConfig(targets=["query"]))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(lt.AdapterFileError, match="non-empty folder that holds no adapter"):
        lt.save_adapter(model, other)
    assert (other / "todo.txt").read_text() == "keep me"
    # A failure while writing leaves the old adapter exactly as it was, and no temp folder.
    before = digest(saved)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(formats, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        lt.save_adapter(model, saved)
    assert digest(saved) == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["adapter", "notes"]
    monkeypatch.undo()
    lt.save_adapter(model, saved)  # replacing an adapter folder is allowed
    assert digest(saved) != before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["adapter", "notes"]
