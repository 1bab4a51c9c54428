"""Preference data for ``--task preference``: reading TRL's formats, rendering with the chat
template (as ``--task instruct`` does, ``models/chat.py``), the completion tokens' labels,
prompt-side truncation, and batches.

**Formats** (CSV, JSON Lines or ``save_to_disk`` rows; in CSV a conversation is its JSON text):

- ``prompt`` / ``chosen`` / ``rejected``: each a string, or a list of ``{role, content}``
  messages (the prompt's ending with a user turn, the answers' a single assistant message);
  a string prompt is one user turn, a string answer one assistant turn;
- the implicit prompt: ``chosen`` / ``rejected`` conversations with no ``prompt`` column, sharing
  every message but the last (that shared beginning is the prompt);
- KTO's unpaired form: ``prompt`` / ``completion`` / ``label`` (true: desirable).

Paired data also trains ``--objective kto`` (chosen desirable, rejected not, as TRL unpairs it).
A row with an empty answer, chosen equal to rejected, or a missing column is refused with one
line naming the file and the row.

**Tokens.** The conversation (prompt + answer) is rendered with the chat template and
tokenized once with character offsets; the answer's tokens are those starting at or after the
end of the prompt rendered with the generation prompt, up to the end of the answer's turn (its
end-of-turn token included, the template's trailing whitespace not) — the instruct task's rule.
A sequence longer than ``max_length`` keeps the head of the prompt (system message, at most half
of the room) and its end, and the whole answer; an answer that alone does not fit keeps its
beginning and one prompt token.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leantune.core.defaults import bbc_news
from leantune.core.errors import LeantuneError
from leantune.models.chat import HEADLINE, Message, _messages, _render, _spans, check_template
from leantune.models.data import _kind, _missing, read_rows, stratified_split

IGNORE = -100
COLUMNS = ("prompt", "chosen", "rejected", "completion", "label")


@dataclass(frozen=True)
class PreferenceExample:
    """A prompt and its answers: ``rejected`` None for an unpaired (KTO) row, whose label is
    ``desirable``."""

    prompt: list[Message]
    chosen: str
    rejected: str | None = None
    desirable: bool = True

    @property
    def paired(self) -> bool:
        return self.rejected is not None


def load_preferences(path: str | Path, prompt_column: str = "prompt") -> list[PreferenceExample]:
    """Preference rows from a file or folder, in one of the formats of the module doc."""
    path = Path(path)
    raw = read_rows(path, {prompt_column, *COLUMNS[1:]})
    cols = raw.columns
    paired = "chosen" in cols or "rejected" in cols
    if paired:
        need = ["chosen", "rejected"]
    elif "completion" in cols or "label" in cols:
        need = [prompt_column, "completion", "label"]
    else:
        need = [prompt_column, "chosen", "rejected"]
    missing = [c for c in need if c not in cols]
    if missing:
        raise LeantuneError(
            f"{path} has no column {missing[0]!r} (its columns are {cols}); preference data "
            f"needs {prompt_column}/chosen/rejected, chosen/rejected conversations sharing their "
            f"beginning, or {prompt_column}/completion/label (KTO)"
        )
    out = []
    for row, at in zip(raw.rows, raw.positions, strict=True):
        where = f"{path} {raw.unit} {at}"
        if paired:
            out.append(
                _paired_row(
                    row, prompt_column in cols, prompt_column, where, f"{raw.unit} {at}", path
                )
            )
        else:
            prompt = _prompt(row.get(prompt_column), where, prompt_column, path, f"{raw.unit} {at}")
            answer = _answer(row.get("completion"), where, "completion", path, f"{raw.unit} {at}")
            out.append(PreferenceExample(prompt, answer, None, _label(row.get("label"), where)))
    return out


def _paired_row(
    row: dict[str, Any], has_prompt: bool, column: str, where: str, at: str, path: Path
) -> PreferenceExample:
    if has_prompt:
        prompt = _prompt(row.get(column), where, column, path, at)
        chosen = _answer(row.get("chosen"), where, "chosen", path, at)
        rejected = _answer(row.get("rejected"), where, "rejected", path, at)
    else:  # the implicit prompt: the conversations' shared beginning
        convs = [_conversation(row.get(c), where, c, path, at) for c in ("chosen", "rejected")]
        c, r = convs
        if c[:-1] != r[:-1] or len(c) < 2:
            raise LeantuneError(
                f"{where}: with no {column!r} column, chosen and rejected must be conversations "
                "that share every message but the last (the prompt) and end with the answers"
            )
        prompt, chosen, rejected = c[:-1], c[-1]["content"], r[-1]["content"]
    if chosen == rejected:
        raise LeantuneError(
            f"{where}: chosen and rejected are the same answer, so there is no preference to "
            "learn; fix or remove that row"
        )
    return PreferenceExample(prompt, chosen, rejected)


def _parsed(value: Any) -> Any:
    """A CSV cell holding a JSON list of messages, parsed; anything else as it is."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            found = json.loads(value)
        except ValueError:
            return value
        if isinstance(found, list) and all(isinstance(m, dict) for m in found):
            return found
    return value


def _empty(where: str, column: str) -> LeantuneError:
    return LeantuneError(
        f"{where}: column {column!r} is empty; give every row its text or remove that row"
    )


def _prompt(value: Any, where: str, column: str, path: Path, at: str) -> list[Message]:
    value = _parsed(value)
    if _missing(value) or (isinstance(value, str) and not value.strip()):
        raise _empty(where, column)
    if isinstance(value, list):
        messages = _messages(value, path, column, at, need_answer=False)
        if messages[-1]["role"] == "assistant":
            raise LeantuneError(
                f"{where}: the {column!r} conversation ends with an assistant turn; end it with the user's"
            )
        return messages
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [{"role": "user", "content": str(value)}]
    raise LeantuneError(f"{where}: column {column!r} holds a {_kind(value)}, not text")


def _answer(value: Any, where: str, column: str, path: Path, at: str) -> str:
    value = _parsed(value)
    if isinstance(value, list):
        messages = _messages(value, path, column, at, need_answer=False) if value else []
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise LeantuneError(
                f"{where}: column {column!r} must hold one assistant message (or text)"
            )
        return messages[0]["content"]
    if _missing(value) or (isinstance(value, str) and not value.strip()):
        raise _empty(where, column)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise LeantuneError(f"{where}: column {column!r} holds a {_kind(value)}, not text")


def _conversation(value: Any, where: str, column: str, path: Path, at: str) -> list[Message]:
    value = _parsed(value)
    if _missing(value) or (isinstance(value, str) and not value.strip()):
        raise _empty(where, column)
    if not isinstance(value, list):
        raise LeantuneError(
            f"{where}: column {column!r} holds text but there is no prompt column; give a "
            "prompt column, or conversations (lists of {role, content}) sharing their beginning"
        )
    messages = _messages(value, path, column, at)
    if messages[-1]["role"] != "assistant":
        raise LeantuneError(
            f"{where}: the {column!r} conversation must end with the answer (an assistant turn)"
        )
    return messages


def _label(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = "" if _missing(value) else str(value).strip().lower()
    if text in ("true", "1", "yes", "1.0"):
        return True
    if text in ("false", "0", "no", "0.0"):
        return False
    raise LeantuneError(
        f"{where}: column 'label' holds {value!r}; use true (desirable) or false (undesirable)"
    )


def unpaired(examples: Sequence[PreferenceExample]) -> list[PreferenceExample]:
    """Paired rows as KTO's: the chosen answer desirable, the rejected one not."""
    out: list[PreferenceExample] = []
    for ex in examples:
        if ex.rejected is None:
            out.append(ex)
        else:
            out.append(PreferenceExample(ex.prompt, ex.chosen, None, True))
            out.append(PreferenceExample(ex.prompt, ex.rejected, None, False))
    return out


# ---------------------------------------------------------------------------- tokens


@dataclass
class PreferenceTokens:
    """Token ids per example and where each answer starts: ``sides[0]`` the chosen (or
    unpaired) sequences, ``sides[1]`` the rejected ones (empty for KTO). ``ref`` holds the
    reference's precomputed log-probs, one column per side (KTO: the row, then its KL row)."""

    sides: list[list[list[int]]] = field(default_factory=lambda: [[], []])
    starts: list[list[int]] = field(default_factory=lambda: [[], []])
    desirable: list[int] = field(default_factory=list)
    truncated: int = 0
    ref: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.sides[0])

    @property
    def paired(self) -> bool:
        return bool(self.sides[1])


def _encode_answer(
    tok: Any, prompt: list[Message], answer: str, template: str | None
) -> tuple[list[int], int, int]:
    """Ids of prompt + answer (rendered), where the answer's tokens start, and the system head."""
    messages = [*prompt, {"role": "assistant", "content": answer}]
    text, spans, head_end = _spans(tok, messages, template)
    start = len(_render(tok, prompt, template, True))
    end = spans[-1][1]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    first = next(t for t, (a, _) in enumerate(offsets) if a >= start)
    last = max(t for t, (a, _) in enumerate(offsets) if a < end) + 1
    head = sum(1 for a, _ in offsets if a < head_end)
    return ids[:last], first, min(head, first)


def _fit(ids: list[int], start: int, head: int, max_length: int) -> tuple[list[int], int, bool]:
    """Prompt-side truncation (module doc)."""
    if len(ids) <= max_length:
        return ids, start, False
    prompt, answer = ids[:start], ids[start:]
    room = max_length - len(answer)
    if room < 1:
        return prompt[-1:] + answer[: max_length - 1], 1, True
    head = head if head <= room // 2 else 0
    kept = prompt[:head] + prompt[len(prompt) - (room - head) :]
    return kept + answer, len(kept), True


def encode_preferences(
    tok: Any,
    examples: Sequence[PreferenceExample],
    max_length: int,
    template: str | None = None,
) -> PreferenceTokens:
    """Token ids of every example's answers (see the module doc), truncated to ``max_length``."""
    if max_length < 2:
        raise LeantuneError(
            f"--max-length must be at least 2 for preference data, got {max_length}"
        )
    check_template(tok, template)
    out = PreferenceTokens()
    for ex in examples:
        answers = [ex.chosen] if ex.rejected is None else [ex.chosen, ex.rejected]
        cut = False
        for side, answer in enumerate(answers):
            ids, start, head = _encode_answer(tok, ex.prompt, answer, template)
            ids, start, was_cut = _fit(ids, start, head, max_length)
            cut |= was_cut
            out.sides[side].append(ids)
            out.starts[side].append(start)
        out.desirable.append(int(ex.desirable))
        out.truncated += cut
    if out.sides[1] and len(out.sides[1]) != len(out.sides[0]):
        raise LeantuneError("paired and unpaired rows are mixed in one file; give one kind")
    return out


def _rows(seqs: list[list[int]], starts: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for r, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        labels[r, start : len(seq)] = torch.tensor(seq[start:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def kl_partner(i: int, n: int) -> int:
    """KTO's mismatched pair for example i: the previous example's answer (fixed over the whole
    set, so the reference's side can be computed once)."""
    return (i - 1) % n


def preference_batch(
    data: PreferenceTokens, rows: Sequence[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """Paired: the chosen sequences of ``rows``, then their rejected ones; KTO: the rows, their
    labels (``desirable``) and the mismatched KL rows. ``ref_logps`` when precomputed."""
    first, starts = data.sides[0], data.starts[0]
    if data.paired:
        seqs = [first[i] for i in rows] + [data.sides[1][i] for i in rows]
        at = [starts[i] for i in rows] + [data.starts[1][i] for i in rows]
        batch = _rows(seqs, at, pad_id)
        if data.ref is not None:
            batch["ref_logps"] = torch.cat([data.ref[list(rows), 0], data.ref[list(rows), 1]])
        return batch
    n = len(first)
    batch = _rows([first[i] for i in rows], [starts[i] for i in rows], pad_id)
    kl_seqs, kl_starts = [], []
    for i in rows:
        j = kl_partner(i, n)
        kl_seqs.append(first[i][: starts[i]] + first[j][starts[j] :])
        kl_starts.append(starts[i])
    kl = _rows(kl_seqs, kl_starts, pad_id)
    batch |= {f"kl_{k}": v for k, v in kl.items()}
    batch["desirable"] = torch.tensor([data.desirable[i] for i in rows], dtype=torch.long)
    if data.ref is not None:
        batch["ref_logps"] = data.ref[list(rows), 0]
        batch["ref_kl_logps"] = data.ref[list(rows), 1]
    return batch


# ---------------------------------------------------------------------------- the embedded pairs


def bbc_preferences(
    seed: int, fractions: tuple[float, float, float], body_words: int | None
) -> tuple[list[PreferenceExample], list[PreferenceExample], list[PreferenceExample]]:
    """The embedded preference pairs: for each BBC article, its real headline preferred over
    the headline of another article of the same topic (a hard negative: as fluent and as much
    on topic, so only the article's own facts tell them apart), the prompt being the instruct
    default's headline request (``models/chat.py``); split by article, stratified by topic."""
    bbc = bbc_news()
    heads, bodies = [], []
    for text in bbc.texts:
        head, _, body = text.partition("\n")
        words = body.split()
        if body_words is not None and len(words) > body_words:
            body = " ".join(words[:body_words])
        heads.append(head.strip())
        bodies.append(body.strip())
    by_topic: dict[int, list[int]] = {}
    for n, label in enumerate(bbc.labels):
        by_topic.setdefault(label, []).append(n)
    rng = random.Random(seed)
    pairs: list[PreferenceExample] = []
    for n, label in enumerate(bbc.labels):
        others = [m for m in by_topic[label] if heads[m] != heads[n]]
        other = others[rng.randrange(len(others))]
        prompt = [{"role": "user", "content": f"{bodies[n]}\n\n{HEADLINE}"}]
        pairs.append(PreferenceExample(prompt, heads[n], heads[other]))
    parts = stratified_split(bbc.labels, fractions, seed)
    train, val, test = ([pairs[i] for i in part] for part in parts)
    return train, val, test
