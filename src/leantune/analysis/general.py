"""General ability (issue 29): the set of :mod:`leantune.analysis.general_set` answered before
and after a causal LM is tuned and scored, so that a run says what the model could do and
whether it still can.

Scoring: arithmetic and facts pass when the expected number or word(s) appear in the answer
(case, accents, punctuation, thousands separators and number words normalised); instruction
prompts pass by their rule. A chat model answers each prompt as a one-turn conversation
rendered with its chat template; a model without one is prompted with plain text,
``Question: ...`` then ``Answer:``, and its answer is cut at the first blank line or the next
``Question:``. Greedy, batched, at most 32 new tokens for a short answer, 48 for an
instruction.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from leantune.analysis.general_set import GeneralItem, general_items
from leantune.analysis.generate import Sampling, generate_texts, render_prompts
from leantune.models.precision import autocast

PLAIN = "Question: {}\nAnswer:"
"""How a model without a chat template is asked."""
BATCH = 64
"""Prompts answered at once, fixed so that runs' scores compare (under bf16 the batch's padding
moves a few answers)."""

_UNITS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)  # fmt: skip
_TENS = ("thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_NUMBER_WORDS = {w: i for i, w in enumerate(_UNITS)} | {w: 30 + 10 * i for i, w in enumerate(_TENS)}
_NUMBER_WORDS |= {"hundred": 100, "thousand": 1000}


def normalize(text: str) -> str:
    """Lower case, accents and punctuation dropped, thousands separators joined, number words
    as digits (``one hundred`` → 100, ``twenty-one`` → 21), single spaces."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = re.sub(r"[^a-z0-9.]+|\.(?!\d)", " ", text)
    text = re.sub(r"\b(?:a|one) (hundred|thousand)\b", r"\1", text)
    tens = r"(twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety) (one|two|three|four|five|six|seven|eight|nine)"
    text = re.sub(rf"\b{tens}\b", lambda m: str(_NUMBER_WORDS[m[1]] + _NUMBER_WORDS[m[2]]), text)
    words = [str(_NUMBER_WORDS.get(w, w)) for w in text.split()]
    return " ".join(words)


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?", text)


def _contains(text: str, answers: Sequence[str]) -> bool:
    said = f" {normalize(text)} "
    return any(f" {normalize(a)} " in said for a in answers)


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if _words(s)]


def _list_items(text: str) -> int:
    """Lines that start a bulleted or numbered item; else the parts of a comma list."""
    items = [ln for ln in text.splitlines() if re.match(r"\s*(?:[-*•]|\d+[.)])\s*\S", ln)]
    if items:
        return len(items)
    parts = re.split(r",\s*(?:and\s+|or\s+)?|\s+and\s+", text.strip().rstrip("."))
    return len([p for p in parts if _words(p)])


def _uppercase(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 2 and all(c.isupper() for c in letters)


def _first_word(text: str, answers: Sequence[str]) -> bool:
    words = _words(text.lower())
    return bool(words) and words[0] in answers


def _number_only(text: str, answers: Sequence[str]) -> bool:
    return normalize(text) in answers


RULES: dict[str, Callable[[str, Sequence[str]], bool]] = {
    "contains": _contains,
    "one_word": lambda text, answers: len(_words(text)) == 1 and _contains(text, answers),
    "one_sentence": lambda text, _: len(_sentences(text)) == 1 and len(_words(text)) >= 3,
    "list_three": lambda text, _: _list_items(text) == 3,
    "uppercase": lambda text, _: _uppercase(text),
    "yes_no": _first_word,
    "number_only": _number_only,
    "few_words": lambda text, _: 2 <= len(_words(text)) <= 5,
    "min_words": lambda text, _: len(_words(text)) >= 20,
}
"""Each rule: (the model's answer, the item's expected answers) → passed."""


def score_item(item: GeneralItem, answer: str) -> float:
    """1.0 when ``answer`` passes the item's rule, else 0.0."""
    return float(RULES[item.rule](answer, item.answers))


def plain_answer(text: str) -> str:
    """A plain-text prompted answer up to the first blank line or the next ``Question:``."""
    return re.split(r"\n\s*\n|\n?Question:", text, maxsplit=1)[0].strip()


def general_answers(
    model: nn.Module,
    tok: Any,
    items: Sequence[GeneralItem],
    precision: str = "fp32",
    batch_size: int = BATCH,
) -> list[str]:
    """The model's greedy answers to ``items`` (chat template when the tokenizer has one, else
    plain ``Question: ... Answer:`` text), under autocast to ``precision``; batched, each
    answer at most its item's ``max_new_tokens``."""
    chat = bool(getattr(tok, "chat_template", None))
    device = next(model.parameters()).device
    out = [""] * len(items)
    with autocast(precision, device):
        for budget in sorted({item.max_new_tokens for item in items}):
            rows = [i for i, item in enumerate(items) if item.max_new_tokens == budget]
            prompts = [items[i].prompt for i in rows]
            texts = (
                render_prompts(tok, [[{"role": "user", "content": p}] for p in prompts])
                if chat
                else [PLAIN.format(p) for p in prompts]
            )
            sampling = Sampling(max_new_tokens=budget)
            answers = generate_texts(model, tok, texts, sampling, batch_size=batch_size)
            for i, answer in zip(rows, answers, strict=True):
                out[i] = answer if chat else plain_answer(answer)
    return out


@dataclass
class GeneralScore:
    """Each item's 0/1 score, their mean (the general score, 0..1) and the mean by kind and
    by category."""

    scores: list[float]
    mean: float
    by_kind: dict[str, float]
    by_category: dict[str, float]


def _means(keys: Sequence[str], scores: Sequence[float]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for key, s in zip(keys, scores, strict=True):
        groups.setdefault(key, []).append(s)
    return {k: sum(v) / len(v) for k, v in groups.items()}


def score_general(items: Sequence[GeneralItem], answers: Sequence[str]) -> GeneralScore:
    """Score each answer by its item's rule (``score_item``)."""
    scores = [score_item(item, a) for item, a in zip(items, answers, strict=True)]
    return GeneralScore(
        scores,
        sum(scores) / len(scores) if scores else 0.0,
        _means([i.kind for i in items], scores),
        _means([i.category for i in items], scores),
    )


@dataclass
class GeneralMeasure:
    """A run's general measure: the items, the answers before and after, the time spent."""

    items: list[GeneralItem]
    precision: str = "fp32"
    batch_size: int = BATCH
    before: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    seconds: float = 0.0
    chat: bool = True

    @classmethod
    def of(cls, count: int, precision: str, batch_size: int = BATCH) -> GeneralMeasure | None:
        """``count`` items of the set (``general_items``), or None for 0 (off)."""
        items = general_items(count)
        return cls(items, precision, batch_size) if items else None

    def answer(self, model: nn.Module, tok: Any) -> list[str]:
        start = time.perf_counter()
        answers = general_answers(model, tok, self.items, self.precision, self.batch_size)
        self.seconds += time.perf_counter() - start
        self.chat = bool(getattr(tok, "chat_template", None))
        return answers

    def answer_before(self, model: nn.Module, tok: Any) -> None:
        self.before = self.answer(model, tok)

    def answer_after(self, model: nn.Module, tok: Any) -> None:
        self.after = self.answer(model, tok)

    def summary(self) -> dict[str, Any]:
        """summary.json's general-ability keys: the score before and after, their difference,
        how many prompts, how they were put and how long answering them took (both sides)."""
        b = score_general(self.items, self.before).mean
        a = score_general(self.items, self.after).mean
        return {
            "general_before": round(b, 4),
            "general_after": round(a, 4),
            "general_delta": round(a - b, 4),
            "general_examples": len(self.items),
            "general_prompting": "chat template" if self.chat else "plain Question/Answer",
            "general_seconds": round(self.seconds, 2),
        }

    def table(self) -> list[dict[str, Any]]:
        return general_table(self.items, self.before, self.after)


def general_table(
    items: Sequence[GeneralItem], before: Sequence[str], after: Sequence[str]
) -> list[dict[str, Any]]:
    """Each general prompt with its category, the base model's and the tuned model's answer
    and their scores (history.json; the report shows a sample and the scores by category)."""
    return [
        {
            "prompt": item.prompt,
            "kind": item.kind,
            "category": item.category,
            "base_answer": b,
            "answer": a,
            "base_score": score_item(item, b),
            "score": score_item(item, a),
        }
        for item, b, a in zip(items, before, after, strict=True)
    ]


def general_line(summary: Mapping[str, Any]) -> str:
    """The run's line's general part: `` | general: 0.61 -> 0.48 (-0.13) on 200 prompts``;
    empty when the run did not measure it."""
    if "general_after" not in summary:
        return ""
    return (
        f" | general: {summary['general_before']:.3f} -> {summary['general_after']:.3f} "
        f"({summary['general_delta']:+.3f}) on {summary['general_examples']} prompts"
    )
