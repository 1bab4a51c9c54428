"""The tokenizer's part of a GGUF file: llama.cpp's ``gpt2`` (byte-level BPE) vocabulary.

Written as llama.cpp's own converter writes it: every id's token string, its type (``CONTROL``
for special added tokens, ``USER_DEFINED`` for other added tokens, ``NORMAL`` for the rest,
``UNUSED`` for ids the model has beyond the tokenizer's), the merges, bos / eos / pad / unk and
the chat template's end-of-turn token as ``eot``, whether a bos is added, and the chat template
the run trained with.

``tokenizer.ggml.pre`` names the pre-tokenizer (how text is split before BPE); llama.cpp knows a
fixed list of names. It is read from the tokenizer's ``tokenizer.json``: a bare byte-level split
is ``gpt-2`` (llama.cpp's spelling: ``gpt2`` is refused when the file loads), digits split one by one before it is ``smollm``, and the Llama 3 / Qwen2 split
patterns are ``llama-bpe`` / ``qwen2``. The embedded SmolLM2 folder is built from a GGUF file
whose metadata names it (``smollm``); transformers rebuilds that tokenizer with the bare split,
which gives the same ids here because its vocabulary holds no token joining a digit to anything.
Other tokenizers (SentencePiece, WordPiece, unknown split patterns) are refused by name.
"""

from __future__ import annotations

import json
from typing import Any

from leantune.core.errors import LeantuneError

LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
QWEN2_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def _is_byte_level(step: dict[str, Any], regex: bool) -> bool:
    return step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == regex


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (module doc); refuses others."""
    model = tokenizer_json.get("model") or {}
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if model.get("type") != "BPE" or not any(s.get("type") == "ByteLevel" for s in steps):
        raise LeantuneError(
            f"GGUF export takes byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM style); "
            f"this one is {model.get('type', 'unknown')} with a "
            f"{pre.get('type', 'missing')} pre-tokenizer: use --to hf"
        )
    if len(steps) == 1 and _is_byte_level(steps[0], True):
        return "gpt-2"
    if (
        len(steps) == 2
        and steps[0].get("type") == "Digits"
        and steps[0].get("individual_digits")
        and _is_byte_level(steps[1], True)
    ):
        return "smollm"
    if len(steps) == 2 and steps[0].get("type") == "Split" and _is_byte_level(steps[1], False):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern in SPLITS:
            return SPLITS[pattern]
    raise LeantuneError(
        "the tokenizer's pre-tokenizer is not one leantune maps to llama.cpp's names (gpt-2, "
        "smollm, llama-bpe, qwen2); use --to hf and llama.cpp's convert_hf_to_gguf.py"
    )


def vocabulary(tok: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids 0 .. vocab_size-1."""
    from gguf import TokenType

    by_id = {i: t for t, i in tok.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise LeantuneError(
            f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} "
            "embeddings; the run's tokenizer does not belong to its model"
        )
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        elif token in added:
            tokens.append(token)
            special = decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(int(TokenType.CONTROL if special else TokenType.USER_DEFINED))
        else:
            tokens.append(token)
            types.append(int(TokenType.NORMAL))
    return tokens, types


def merges(tokenizer_json: dict[str, Any]) -> list[str]:
    """BPE merges as ``"a b"`` strings (tokenizers writes pairs as lists since 0.20)."""
    found = (tokenizer_json.get("model") or {}).get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in found]


def adds_bos(tok: Any) -> bool:
    """Whether encoding a text puts the bos token first (Llama 3 does; SmolLM2 does not)."""
    if tok.bos_token_id is None:
        return False
    ids = tok("a")["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id


def write_vocabulary(
    writer: Any, tok: Any, vocab_size: int, eot: int | None, pre: str | None = None
) -> None:
    """The tokenizer keys of a GGUF file (module doc); ``pre`` overrides the derived name."""
    if not getattr(tok, "is_fast", False):
        raise LeantuneError("GGUF export needs a fast tokenizer (tokenizer.json); use --to hf")
    spec = json.loads(tok.backend_tokenizer.to_str())
    name = pre or pre_tokenizer_name(spec)
    tokens, types = vocabulary(tok, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges(spec))
    for key, value in (
        ("bos", tok.bos_token_id),
        ("eos", tok.eos_token_id),
        ("unk", tok.unk_token_id),
        ("pad", tok.pad_token_id),
        ("eot", eot),
    ):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(int(value))
    writer.add_add_bos_token(adds_bos(tok))
    writer.add_add_eos_token(False)
    if getattr(tok, "chat_template", None):
        writer.add_chat_template(tok.chat_template)
