"""Instruction / chat data for ``--task instruct``: reading, chat-template rendering with a loss
mask on the assistant's tokens, truncation, packing, batches, and the embedded BBC default.

**Reading.** Rows of ``leantune.models.data`` (errors name the file and line): prompt / response
(/ system) columns, a ``messages`` column of ``{role, content}`` lists (in CSV a JSON string), or
Alpaca / ShareGPT columns (``models/sft_formats.py``). Every conversation needs an assistant turn.

**Masking.** The conversation is rendered to text with the tokenizer's chat template and
tokenized once, with character offsets. The assistant's characters are found by rendering
prefixes: for assistant message *i*, the text of messages ``[:i]`` with the generation prompt is
a prefix of the text of messages ``[:i+1]``, and the difference is that turn: its content and
the end-of-turn token (the template's whitespace after it is left out: generation stops at the
end-of-turn token). A token is trained (its label is its id) when it starts inside such a span;
every other label is -100. Why not ``return_assistant_tokens_mask``: it needs a template written
with ``{% generation %}`` blocks, which few shipped templates have (SmolLM2's has not); prefix
rendering works with any template that renders a conversation's beginning as the beginning of
its text, and a template that does not (one that rewrites earlier turns) is refused by name.
Tokenizing the whole text once (not pieces) gives exactly the ids the model sees at run time.

**Truncation.** Tokens after the last assistant token are dropped (they carry no loss). A longer
conversation keeps its head — the system message, or without one the template's text before the
first message (a default system prompt, the first role header) — when that takes at most half of
``max_length``, and the last tokens: the final answer survives and the earliest turns (or the
start of the first user message) are cut; a final answer longer than the room left loses its
beginning too.

**Packing.** Examples are placed into rows of at most ``max_length`` tokens (first fit,
longest first); ``position_ids`` restart at 0 for each example and the first label of each
example is -100, so no loss crosses a boundary. Attention is kept inside each example either by
transformers itself — with ``attention_mask=None``, ``use_cache=False`` and restarting
``position_ids``, its mask builder (transformers >= 4.56, sdpa and eager alike) makes the mask
block-diagonal — or by ``segment_mask``, an explicit 4-D additive mask for models that take one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leantune.core.defaults import bbc_news
from leantune.core.errors import LeantuneError
from leantune.models.data import _kind, _missing, pad_batch, read_rows, stratified_split
from leantune.models.sft_formats import FORMAT_COLUMNS, as_messages, sft_format

ROLES = ("system", "user", "assistant")
IGNORE = -100
Message = dict[str, str]


@dataclass(frozen=True)
class ChatExample:
    """One conversation; ``kind`` says how generation is scored ("topic": exact match,
    "headline": ROUGE-L, "" unknown); ``group`` ties rows that must share a split."""

    messages: list[Message]
    kind: str = ""
    group: str = ""


@dataclass
class TokenizedChats:
    """Token ids and labels (-100 off the assistant's tokens); ``truncated`` counts the
    conversations cut to ``max_length``."""

    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    truncated: int = 0


def load_chats(
    path: str | Path,
    prompt_column: str = "prompt",
    response_column: str = "response",
    system_column: str = "system",
    messages_column: str = "messages",
) -> list[ChatExample]:
    """Conversations from a CSV, JSON Lines file or ``save_to_disk`` folder (see the module doc):
    a ``messages`` column when there is one, else the prompt / response (/ system) columns."""
    path = Path(path)
    wanted = {prompt_column, response_column, system_column, messages_column, *FORMAT_COLUMNS}
    raw = read_rows(path, wanted)
    fmt = None if messages_column in raw.columns else sft_format(raw.columns)
    if fmt is not None:  # Alpaca or ShareGPT (models/sft_formats.py)
        column = "conversations" if fmt == "sharegpt" else "output"
        return [ChatExample(_messages(as_messages(row, fmt), path, column, f"{raw.unit} {at}"))
                for row, at in zip(raw.rows, raw.positions, strict=True)]  # fmt: skip
    if messages_column in raw.columns:
        read = [_messages(row.get(messages_column), path, messages_column, f"{raw.unit} {at}")
                for row, at in zip(raw.rows, raw.positions, strict=True)]  # fmt: skip
        return [ChatExample(m) for m in read]
    missing = [c for c in (prompt_column, response_column) if c not in raw.columns]
    if missing:
        raise LeantuneError(
            f"{path} has no column {missing[0]!r} (its columns are {raw.columns}); name the "
            "prompt and response columns with --prompt-column / --response-column, or give a "
            f"{messages_column!r} column of {{role, content}} lists"
        )
    examples = []
    for row, at in zip(raw.rows, raw.positions, strict=True):
        where = f"{path} {raw.unit} {at}"
        messages = []
        system = _cell(row.get(system_column), where, system_column)
        if system.strip():
            messages.append({"role": "system", "content": system})
        for role, column in (("user", prompt_column), ("assistant", response_column)):
            content = _cell(row.get(column), where, column)
            if not content.strip():
                raise LeantuneError(
                    f"{where}: column {column!r} is empty; give every row a "
                    f"{'prompt' if role == 'user' else 'response'} or remove that row"
                )
            messages.append({"role": role, "content": content})
        examples.append(ChatExample(messages))
    return examples


def _cell(value: Any, where: str, column: str) -> str:
    if _missing(value):
        return ""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise LeantuneError(f"{where}: column {column!r} holds a {_kind(value)}, not text")


def load_prompts(
    path: str | Path,
    prompt_column: str = "prompt",
    system_column: str = "system",
    messages_column: str = "messages",
) -> list[list[Message]]:
    """Conversations to answer (``leantune generate --input``): a ``messages`` column (a
    trailing assistant turn is dropped: it is the reference), else the prompt (/ system)
    columns; a response column, if any, is ignored."""
    path = Path(path)
    raw = read_rows(path, {prompt_column, system_column, messages_column})
    out = []
    for row, at in zip(raw.rows, raw.positions, strict=True):
        where = f"{path} {raw.unit} {at}"
        if messages_column in raw.columns:
            msgs = _messages(row.get(messages_column), path, messages_column, f"{raw.unit} {at}",
                             need_answer=False)  # fmt: skip
            while msgs and msgs[-1]["role"] == "assistant":
                msgs.pop()
        else:
            if prompt_column not in raw.columns:
                raise LeantuneError(
                    f"{path} has no column {prompt_column!r} (its columns are {raw.columns}); "
                    "name it with --prompt-column, or give a messages column"
                )
            system = _cell(row.get(system_column), where, system_column)
            prompt = _cell(row.get(prompt_column), where, prompt_column)
            msgs = [{"role": "system", "content": system}] if system.strip() else []
            msgs.append({"role": "user", "content": prompt})
        if not msgs or not msgs[-1]["content"].strip():
            raise LeantuneError(f"{where}: nothing to answer (an empty prompt)")
        out.append(msgs)
    return out


def _messages(
    value: Any, path: Path, column: str, at: str, need_answer: bool = True
) -> list[Message]:
    """A validated ``messages`` cell (a list, or in CSV its JSON text)."""
    where = f"{path} {at}"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise LeantuneError(
                f"{where}: column {column!r} is not a JSON list; write it like "
                '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'
            ) from None
    if not isinstance(value, list) or not value:
        what = "an empty list" if isinstance(value, list) else f"a {_kind(value)}"
        raise LeantuneError(
            f"{where}: column {column!r} holds {what}, not a list of {{role, content}} messages"
        )
    messages = []
    for n, item in enumerate(value, 1):
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            raise LeantuneError(
                f"{where}: message {n} is not a {{role, content}} object; write each message "
                'like {"role": "user", "content": "..."}'
            )
        role, content = item["role"], item["content"]
        if role not in ROLES:
            raise LeantuneError(
                f"{where}: message {n} has unknown role {role!r}; use system, user or assistant"
            )
        if not isinstance(content, str) or not content.strip():
            raise LeantuneError(
                f"{where}: message {n} ({role}) has empty content; give it text or remove it"
            )
        messages.append({"role": role, "content": content})
    if need_answer and not any(m["role"] == "assistant" for m in messages):
        raise LeantuneError(
            f"{where}: the conversation has no assistant message, so there is nothing to "
            "learn; add the assistant's reply or remove that row"
        )
    return messages


def _render(tokenizer: Any, messages: list[Message], template: str | None, prompt: bool) -> str:
    return str(
        tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=prompt
        )
    )


def _spans(
    tokenizer: Any, messages: list[Message], template: str | None
) -> tuple[str, list[tuple[int, int]], int]:
    """The rendered text, the character spans of the assistant turns, and where the head kept by
    truncation ends: the system message, else the template's text before the first message."""
    text = _render(tokenizer, messages, template, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], template, True)
        upto = _render(tokenizer, messages[: i + 1], template, False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise LeantuneError(
                "the chat template does not render a conversation's beginning as the beginning "
                f"of its text (at message {i + 1}), so the assistant's tokens cannot be told "
                "apart; pass --template with a template that does (e.g. ChatML)"
            )
        spans.append((len(before), len(before) + len(upto[len(before) :].rstrip())))
    if messages[0]["role"] == "system":
        head = _render(tokenizer, messages[:1], template, False)
        return text, spans, len(head) if text.startswith(head) else 0
    return text, spans, max(text.find(messages[0]["content"]), 0)  # the template's preamble


def use_template(tok: Any, template: str | None) -> None:
    """--template (text, or a file holding it) as the tokenizer's chat template; without one
    the tokenizer must have its own."""
    if template is not None:
        path = Path(template)
        text = (
            path.read_text(encoding="utf-8") if "{" not in template and path.is_file() else template
        )
        if "{" not in text:
            raise LeantuneError(
                f"--template {template!r} is neither a Jinja template nor a file holding one"
            )
        tok.chat_template = text
    check_template(tok, None)


def check_template(tokenizer: Any, template: str | None) -> None:
    """Refuse a tokenizer with no chat template when none is given, and a slow tokenizer."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise LeantuneError(
            "the tokenizer has no chat template, so conversations cannot be rendered; pass "
            "--template with a Jinja chat template (a file or the text), or use a model whose "
            "tokenizer has one (e.g. --model smollm2)"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise LeantuneError(
            "instruct data needs a fast tokenizer (tokenizer.json) for character offsets; "
            "save the model with a tokenizer.json"
        )


def _encode(
    tokenizer: Any, messages: list[Message], template: str | None
) -> tuple[list[int], list[int], int]:
    """Full-length ids and labels, and how many leading tokens are the system prompt."""
    text, spans, system_end = _spans(tokenizer, messages, template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    for t, (start, _) in enumerate(enc["offset_mapping"]):
        if any(a <= start < b for a, b in spans):
            labels[t] = ids[t]
    head = sum(1 for start, _ in enc["offset_mapping"] if start < system_end)
    return ids, labels, head


def _truncate(
    ids: list[int], labels: list[int], max_length: int, head: int
) -> tuple[list[int], list[int], bool]:
    """Drop tokens after the last trained one, then cut from the prompt side (module doc)."""
    last = max((t for t, y in enumerate(labels) if y != IGNORE), default=len(ids) - 1) + 1
    ids, labels = ids[:last], labels[:last]
    if len(ids) <= max_length:
        return ids, labels, False
    head = head if head <= max_length // 2 else 0
    tail = max_length - head
    return ids[:head] + ids[-tail:], labels[:head] + labels[-tail:], True


def tokenize_chat(
    tokenizer: Any, messages: list[Message], max_length: int, template: str | None = None
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation: labels are the ids on the assistant turns'
    tokens (content and end-of-turn token) and -100 elsewhere; at most ``max_length`` tokens."""
    check_template(tokenizer, template)
    ids, labels, head = _encode(tokenizer, messages, template)
    ids, labels, _ = _truncate(ids, labels, max_length, head)
    return ids, labels


def tokenize_chats(
    tokenizer: Any, examples: Sequence[ChatExample], max_length: int, template: str | None = None
) -> TokenizedChats:
    """``tokenize_chat`` over many conversations, counting those truncated."""
    if max_length < 2:
        raise LeantuneError(f"--max-length must be at least 2 for instruct data, got {max_length}")
    check_template(tokenizer, template)
    out = TokenizedChats()
    for example in examples:
        ids, labels, head = _encode(tokenizer, example.messages, template)
        ids, labels, cut = _truncate(ids, labels, max_length, head)
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.truncated += cut
    return out


def prompt_and_reference(example: ChatExample) -> tuple[list[Message], str]:
    """The messages before the last assistant turn (to generate from) and that turn's text."""
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    return example.messages[:last], example.messages[last]["content"]


def instruct_batch(
    ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Pad to the longest row: input_ids with ``pad_id``, labels with -100, attention_mask."""
    batch = pad_batch(ids, pad_id)
    padded = torch.full_like(batch["input_ids"], IGNORE)
    for row, seq in enumerate(labels):
        padded[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    batch["labels"] = padded
    return batch


@dataclass
class PackedRow:
    """Several examples in one row; ``lengths`` in order, position ids restart for each."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)


def pack(examples: TokenizedChats, max_length: int) -> list[PackedRow]:
    """Examples placed into rows of at most ``max_length`` tokens, first fit, longest first."""
    ids, labels = examples.input_ids, examples.labels
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    rows: list[PackedRow] = []
    for i in order:
        n = len(ids[i])
        if n > max_length:
            raise LeantuneError(f"example {i} has {n} tokens, more than {max_length}; truncate it")
        row = next((r for r in rows if len(r.input_ids) + n <= max_length), None)
        if row is None:
            row = PackedRow()
            rows.append(row)
        row.input_ids += ids[i]
        row.labels += [IGNORE, *labels[i][1:]]  # the first token is never a target
        row.position_ids += range(n)
        row.lengths.append(n)
    return rows


def packed_batch(rows: Sequence[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Tensors of packed rows: input_ids, labels, position_ids (no 2-D attention_mask: see the
    module doc). Padding at a row's end forms its own segment (positions from 0, labels -100)."""
    width = max(len(r.input_ids) for r in rows)
    out = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
    }
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        out["input_ids"][b, :n] = torch.tensor(row.input_ids)
        out["labels"][b, :n] = torch.tensor(row.labels)
        out["position_ids"][b, :n] = torch.tensor(row.position_ids)
        out["position_ids"][b, n:] = torch.arange(width - n)
    return out


def segment_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 4-D additive mask (batch, 1, L, L): 0 where a token may attend (earlier or same token of
    its own example), the dtype's minimum elsewhere; examples start where positions restart."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    segment = starts.long().cumsum(-1)
    same = segment[:, :, None] == segment[:, None, :]
    n = position_ids.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (same & causal)[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


TOPICS = {"business": "business", "entertainment": "entertainment", "politics": "politics"}
TOPICS |= {"sports": "sport", "sport": "sport", "tech": "tech"}
HEADLINE = "Write a headline for this article."
TOPIC = "Which topic is this article about: business, entertainment, politics, sport or tech?"


@dataclass(frozen=True)
class InstructSplits:
    train: list[ChatExample]
    validation: list[ChatExample]
    test: list[ChatExample]


def bbc_instruct(
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    body_words: int | None = 150,
) -> InstructSplits:
    """The embedded instruction data: two rows per BBC News article (headline: its first line;
    topic: its folder), articles split stratified by topic so both rows share a split. The
    instruction follows the article, so prompt-side truncation cuts the article's start, never
    the instruction; bodies are cut to their first ``body_words`` words (None: whole)."""
    bbc = bbc_news()
    rows: list[list[ChatExample]] = []
    for n, (text, label) in enumerate(zip(bbc.texts, bbc.labels, strict=True)):
        headline, _, body = text.partition("\n")
        words = body.split()
        if body_words is not None and len(words) > body_words:
            body = " ".join(words[:body_words])
        body, topic, group = body.strip(), TOPICS[bbc.label_names[label]], f"bbc/{n}"
        rows.append(
            [
                ChatExample(_pair(f"{body}\n\n{HEADLINE}", headline.strip()), "headline", group),
                ChatExample(_pair(f"{body}\n\n{TOPIC}", topic), "topic", group),
            ]
        )
    parts = stratified_split(bbc.labels, fractions, seed)
    train, validation, test = ([ex for i in part for ex in rows[i]] for part in parts)
    return InstructSplits(train, validation, test)


def _pair(prompt: str, answer: str) -> list[Message]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
