"""The keep loss's conversations for chat models (``--task instruct --keep W``, issue 29).

An instruct run distils toward the original model on general *conversations*, not raw text:

* **instructions**: a fixed set built here without the network, every instruction template
  over every everyday topic below (``len(TEMPLATES) × len(TOPICS)`` of them) in a fixed
  shuffled order, of which a run takes the first ``--keep-examples``. The templates and
  topics stay clear of the general measure (:mod:`leantune.analysis.general_set`): no
  instruction equals or contains one of its prompts (tests/test_chat_keep.py checks it),
  none of its rule-scored forms (one word, one sentence, a list of three, uppercase, yes or no,
  a number alone, five words) and none of its topics, so the measure is never trained on;
* **answers**: the original model's own greedy answers (self-distillation), at most
  ``ANSWER_TOKENS`` new tokens, generated once in fixed blocks of ``ANSWER_BLOCK`` (so an
  instruction's answer does not depend on how many a run takes or which were cached before)
  and cached as JSON under leantune's cache folder, keyed by the model folder's fingerprint,
  the chat template, the set's version and what changes the answers (device, base dtype,
  quantization, a starting adapter). They are generated in the weights' own dtype, without
  autocast, whatever the run's --precision: as the KL's targets are computed (and on a CPU
  three times faster than under bf16 autocast);
* **rows**: each ``[user: instruction, assistant: answer]`` rendered with the chat template and
  masked as the instruct task masks its labels (:func:`leantune.models.chat.tokenize_chats`):
  only the assistant's tokens count in the KL (:class:`leantune.train.keep.KeepLoss`'s masks).

Under several processes rank 0 reads the cache and sends it to the others; answers missing from
it are generated on every rank (a sharded model's forwards run together) and rank 0's are used
everywhere and written.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from leantune.analysis.generate import Sampling, generate
from leantune.core.defaults import cache_root
from leantune.core.distributed import broadcast_json, current
from leantune.core.files import atomic_write
from leantune.models.chat import IGNORE, ChatExample, tokenize_chats

KEEP_SET_VERSION = 1
"""Changes whenever the instructions, their order or how they are answered change."""
KEEP_SEED = 29
ANSWER_TOKENS = 48
"""Longest base answer: a few sentences' worth, short enough to generate once on a CPU."""
ANSWER_BLOCK = 32
"""Instructions answered together, in the set's order (fixed: padding can move a greedy
answer under bf16)."""

TEMPLATES = (
    "Tell me about {}.",
    "Explain {} to a ten-year-old.",
    "Why do people find {} interesting?",
    "Write a short paragraph about {}.",
    "What should a beginner know about {}?",
    "Give some advice to someone curious about {}.",
    "Write a haiku about {}.",
    "What are the pros and cons of {}?",
    "How has the world of {} changed over the years?",
    "Suggest a title for a blog post about {}.",
    "Write the opening line of a story about {}.",
    "What is a common misconception about {}?",
    "Describe {} to someone from the Middle Ages.",
    "How does {} affect everyday life?",
    "Write a friendly note inviting a neighbour to try {}.",
    "What questions would you ask an expert on {}?",
    "Summarise what most people know about {}.",
    "What might {} look like in fifty years?",
    "Write a short poem about {}.",
    "What makes {} useful or enjoyable?",
    "Give a brief history of {}.",
    "Explain why {} matters.",
    "Write a back-cover blurb for a book about {}.",
    "What would you tell a curious kid who asks about {}?",
)
TOPICS = (
    "volcanoes", "lighthouses", "origami", "board games", "chess", "kites", "umbrellas",
    "dinosaurs", "hiking boots", "comets", "marathons", "street markets", "podcasts",
    "knitting", "windmills", "maps", "soap", "fireworks", "bridges", "photography", "postcards",
    "camping", "museums", "jigsaw puzzles", "handwriting", "recycling", "electric cars",
    "the printing press", "pottery", "public parks", "video games", "newspapers", "elevators",
    "stamp collecting", "candles", "paper lanterns", "roller coasters", "birthday parties",
    "letter writing", "the telephone", "magic tricks", "skateboarding", "paper airplanes",
    "the theatre", "comic books", "traffic lights", "the compass", "radio", "job interviews",
    "saving money", "public speaking", "volunteering", "carpentry", "typewriters",
)  # fmt: skip


def keep_instructions(count: int | None = None) -> list[str]:
    """The first ``count`` instructions of the set (all of them for None), in its fixed order."""
    pairs = [(t, p) for t in range(len(TEMPLATES)) for p in range(len(TOPICS))]
    random.Random(KEEP_SEED).shuffle(pairs)
    everything = [TEMPLATES[t].format(TOPICS[p]) for t, p in pairs]
    return everything if count is None else everything[:count]


def cache_file(key: Sequence[Any]) -> Path:
    """Where the answers for ``key`` (the model, template and setup) are cached."""
    text = json.dumps([KEEP_SET_VERSION, ANSWER_TOKENS, ANSWER_BLOCK, *key], sort_keys=True)
    return cache_root() / "keep-chat" / f"{hashlib.sha256(text.encode()).hexdigest()}.json"


def read_answers(file: Path) -> dict[str, str]:
    """The cached answers by instruction ({} when there are none or the file is unreadable)."""
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    answers = saved.get("answers") if isinstance(saved, dict) else None
    if not isinstance(answers, dict):
        return {}
    return {k: v for k, v in answers.items() if isinstance(k, str) and isinstance(v, str)}


def write_answers(file: Path, answers: dict[str, str]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(file, json.dumps({"version": KEEP_SET_VERSION, "answers": answers}, indent=1))


def base_answers(
    model: nn.Module,
    tok: Any,
    instructions: Sequence[str],
    key: Sequence[Any],
) -> tuple[list[str], int]:
    """The model's greedy answer to each of ``instructions`` (a prefix of the set's order) and
    how many were generated now (0: all read from the cache). Call it before training: the
    model must be the original."""
    file = cache_file(key)
    world = current()
    saved: dict[str, str] = broadcast_json(read_answers(file) if world.main else {})
    full = keep_instructions()
    blocks = range(0, len(instructions), ANSWER_BLOCK)
    missing = [full[b : b + ANSWER_BLOCK] for b in blocks]
    missing = [block for block in missing if any(p not in saved for p in block)]
    for block in missing:
        convs = [[{"role": "user", "content": p}] for p in block]
        answers = generate(model, tok, convs, Sampling(ANSWER_TOKENS), batch_size=len(block))
        saved |= dict(zip(block, broadcast_json(answers), strict=True))
    if missing and world.main:
        write_answers(file, saved)
    return [saved[p] for p in instructions], sum(map(len, missing))


def chat_rows(
    tok: Any, instructions: Sequence[str], answers: Sequence[str], max_length: int
) -> tuple[list[list[int]], list[list[bool]]]:
    """Each ``[user: instruction, assistant: answer]`` rendered with the chat template: its
    token ids and which of them count (the assistant's, as the instruct task labels them)."""
    examples = [
        ChatExample([{"role": "user", "content": p}, {"role": "assistant", "content": a}])
        for p, a in zip(instructions, answers, strict=True)
    ]
    chats = tokenize_chats(tok, examples, max_length)
    masks = [[y != IGNORE for y in labels] for labels in chats.labels]
    return chats.input_ids, masks


def chat_keep_rows(
    model: nn.Module,
    tok: Any,
    count: int,
    max_length: int,
    key: Sequence[Any],
    say: Callable[[str], None] | None = None,
) -> tuple[list[list[int]], list[list[bool]]]:
    """The keep loss's rows for a chat model: ``count`` general conversations (the set's first),
    answered by the model (read from the cache, or generated and cached), rendered and masked."""
    instructions = keep_instructions(count)
    start = time.perf_counter()
    answers, generated = base_answers(model, tok, instructions, key)
    if say is not None:
        how = (
            f"{generated} base answers generated in {time.perf_counter() - start:.1f} s and cached"
            if generated
            else "the base model's answers read from the cache"
        )
        say(f"keep loss: {len(instructions)} general conversations ({how})")
    return chat_rows(tok, instructions, answers, max_length)
