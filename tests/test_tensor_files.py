"""Safetensors files are told from pickles by their structure, not their first byte (issue 26).

A safetensors file starts with its header's length as an 8-byte little-endian integer; its low
byte is 0x80 (pickle's PROTO opcode) or 0x50 ('P', a zip's first byte) in one file of 32 each.
"""

from __future__ import annotations

import itertools
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from safetensors.torch import save

import leantune as lt
from helpers import build, inputs, logits
from leantune.adapters.formats import WEIGHTS_NAME, describe, read_adapter_files
from leantune.core.errors import LeantuneError
from leantune.core.files import check_tensors, read_tensors

PICKLE = "is a pickle/torch.save file; leantune never unpickles"


def with_first_byte(first: int) -> bytes:
    """A valid safetensors file (bytes) whose header length's low byte is ``first``."""
    for n in range(1, 600):
        data = save({"w" * n: torch.arange(6, dtype=torch.float32).view(2, 3)})
        if data[0] == first:
            return data
    raise AssertionError(f"no name length gives first byte {first:#x}")


@pytest.mark.parametrize("first", [0x80, 0x50, 0x00, 0xF8])
def test_safetensors_whose_first_byte_looks_like_another_format_load(
    first: int, tmp_path: Path
) -> None:
    data = with_first_byte(first)
    file = tmp_path / "x.safetensors"
    file.write_bytes(data)
    for source in (file, data):
        (tensor,) = read_tensors(source).values()
        assert torch.equal(tensor, torch.arange(6, dtype=torch.float32).view(2, 3))


def one_line(source: Path | bytes, match: str) -> str:
    with pytest.raises(LeantuneError, match=match) as info:
        read_tensors(source)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_pickles_zips_and_damaged_files_are_refused_in_one_line(tmp_path: Path) -> None:
    good = save({"a": torch.ones(4), "b": torch.zeros(2, 2, dtype=torch.bfloat16)})
    for protocol in (2, 4, 5):
        file = tmp_path / f"p{protocol}.bin"
        file.write_bytes(pickle.dumps({"a": [1.0, 2.0]}, protocol=protocol))
        one_line(file, PICKLE)
    zipped = tmp_path / "t.pt"
    torch.save({"a": torch.ones(3)}, zipped)
    assert zipped.read_bytes()[:2] == b"PK"
    one_line(zipped, PICKLE)
    one_line(b"", "not a whole safetensors file: it holds 0 bytes")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    one_line(empty, "empty.safetensors is truncated or corrupt")
    one_line(good[:-3], "outside the file.s 21 data bytes .truncated")
    one_line(good + b"\0" * 8, "truncated or padded")
    one_line(good[:20], "header length")
    # A header whose offsets run past the end of the file.
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + n])
    header["a"]["data_offsets"] = [0, 10_000]
    text = json.dumps(header).encode()
    one_line(struct.pack("<Q", len(text)) + text + good[8 + n :], "'a' has offsets")
    # The right span for another dtype or shape, or a header that is not JSON.
    header = json.loads(good[8 : 8 + n])
    header["a"]["shape"] = [5]
    text = json.dumps(header).encode()
    one_line(struct.pack("<Q", len(text)) + text + good[8 + n :], "'a' spans 16 bytes")
    one_line(struct.pack("<Q", 4) + b"\x80\x04K." + b"\0" * 16, "not JSON")


def test_every_reader_refuses_a_pickle_behind_a_safetensors_name(tmp_path: Path) -> None:
    """The adapter reader, the run folders' weights and the model folders refuse a pickle that
    wears a .safetensors name, with the pickle message."""
    folder = lt.save_adapter(_lora_bert(), tmp_path / "adapter")
    (folder / WEIGHTS_NAME).write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(LeantuneError, match=PICKLE):
        read_adapter_files(folder)
    from leantune.models.loading import check_weights

    model = tmp_path / "model"
    model.mkdir()
    torch.save({"w": torch.ones(1)}, model / "model.safetensors")
    with pytest.raises(LeantuneError, match=PICKLE):
        check_weights(model)


def _lora_bert() -> torch.nn.Module:
    model = build("bert")
    lt.inject(model, lt.LoraConfig(r=2, targets=["query", "value"]))
    return model


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    shapes=st.lists(st.lists(st.integers(0, 5), max_size=3), min_size=1, max_size=6),
    name_pad=st.integers(0, 300),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.bool]),
    cut=st.integers(1, 64),
)
def test_any_safetensors_file_passes_and_any_cut_or_padded_one_fails(
    shapes: list[list[int]], name_pad: int, dtype: torch.dtype, cut: int
) -> None:
    """Header lengths of every low byte and any count of tensors: what the safetensors library
    writes passes the check and reads back; the same bytes cut short or padded do not."""
    tensors = {
        f"t{i}" + "x" * (name_pad if i == 0 else 0): torch.zeros(s, dtype=dtype)
        for i, s in enumerate(shapes)
    }
    data = save(tensors)
    check_tensors(data)
    back = read_tensors(data)
    assert set(back) == set(tensors)
    assert all(back[k].shape == tensors[k].shape for k in tensors)
    for bad in (data[: max(0, len(data) - cut)], data + b"\0" * cut):
        with pytest.raises(LeantuneError):
            check_tensors(bad)


def _peft_file_starting_with(first: int, folder: Path) -> torch.nn.Module:
    """A peft LoRA adapter on the tiny Llama saved by peft's own save_pretrained, its targets
    and rank searched until the file's first byte is ``first``."""
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for n in range(len(modules), 0, -1):
        for targets, r in itertools.product(itertools.combinations(modules, n), (1, 2, 4, 3)):
            torch.manual_seed(5)
            config = PeftLoraConfig(
                r=r, lora_alpha=8, target_modules=list(targets), init_lora_weights=False
            )
            peft_model = get_peft_model(build("llama"), config).eval()
            peft_model.save_pretrained(folder)
            if (folder / "adapter_model.safetensors").read_bytes()[0] == first:
                return peft_model
    raise AssertionError(f"no peft adapter found whose file starts with {first:#x}")


def test_a_peft_adapter_whose_file_starts_with_0x80_loads(tmp_path: Path) -> None:
    peft_model = _peft_file_starting_with(0x80, tmp_path)
    x = inputs("llama")
    expected = logits(peft_model, x)
    model = build("llama")
    lt.load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=1e-5)
    assert describe(tmp_path)


def test_every_tensor_reader_goes_through_the_check() -> None:
    """No module but leantune.core.files parses safetensors itself: the adapters, checkpoints, run
    folders, plans' masks, caches, combine and hotswap inputs all read through read_tensors."""
    src = Path(lt.__file__).parent
    readers = []
    for file in src.rglob("*.py"):
        text = file.read_text()
        for name in ("load_file", "safe_open", "safetensors.torch import load", "torch.load("):
            if name in text and file.name != "files.py":
                readers.append((file.relative_to(src), name))
    assert not readers
