"""Generation from a chat model, and instruct evaluation by generation.

Prompts are conversations rendered with the tokenizer's chat template (``add_generation_prompt``)
and left-padded into batches; ``model.generate`` (transformers' generation API, KV cache) makes
the answers, greedy by default or sampled with a temperature and top-p. An instruct run's test
split is scored on the answers: exact match for short answers (the BBC topic word, or any
reference of at most ``SHORT_WORDS`` words) and ROUGE-L for free text (headlines).
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from leantune.core.errors import LeantuneError
from leantune.models.chat import ChatExample, Message, prompt_and_reference
from leantune.models.loading import model_inputs

SHORT_WORDS = 3
"""References of at most this many words are scored by exact match, longer ones by ROUGE-L
(when the data does not say which: the embedded data's rows do)."""
SHORT_KINDS = ("topic", "short")


@dataclass(frozen=True)
class Sampling:
    """How answers are drawn: greedy (temperature 0) or sampled."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise LeantuneError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise LeantuneError(f"--temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LeantuneError(f"--top-p must be in (0, 1], got {self.top_p}")

    def kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
        }


def render_prompts(tok: Any, conversations: Sequence[Sequence[Message]]) -> list[str]:
    """Each conversation as the text the model continues (chat template, generation prompt)."""
    if not getattr(tok, "chat_template", None):
        raise LeantuneError(
            "the tokenizer has no chat template, so prompts cannot be rendered; use a chat "
            "model, or a run made with --template"
        )
    return [
        tok.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True)
        for c in conversations
    ]


def generate(
    model: nn.Module,
    tok: Any,
    conversations: Sequence[Sequence[Message]],
    sampling: Sampling = Sampling(),
    *,
    batch_size: int = 8,
    streamer: Any = None,
) -> list[str]:
    """The model's answer to each conversation (special tokens dropped, stripped)."""
    texts = render_prompts(tok, conversations)
    return generate_texts(model, tok, texts, sampling, batch_size=batch_size, streamer=streamer)


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    tok: Any,
    texts: Sequence[str],
    sampling: Sampling = Sampling(),
    *,
    batch_size: int = 8,
    streamer: Any = None,
) -> list[str]:
    """The model's continuation of each text (special tokens dropped, stripped).

    On a CPU the answers of a model whose weights share one dtype are decoded in that dtype,
    whatever autocast the caller set: autocast casts every weight again at each new token,
    which costs more than the small matmuls of one token (SmolLM2-135M, 40 general prompts: 1.19x the fp32 time on the shared
    2-core VM), and bf16 rounding changes a small model's greedy answers ("12 * 11 = 132"
    against fp32's 121; a batch of 40 mixed prompts gave a garbled capital of France)."""
    was_training, side = model.training, tok.padding_side
    model.eval()
    tok.padding_side = "left"  # new tokens follow the prompt in every row
    device = next(model.parameters()).device
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    own = device.type == "cpu" and len(dtypes) == 1  # a bf16 base with fp32 adapters needs it
    cpu = torch.autocast("cpu", enabled=False) if own else nullcontext()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    answers: list[str] = []
    try:
        # Longest first keeps padding small; answers go back to the callers' order.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out: dict[int, str] = {}
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            enc = tok([texts[i] for i in rows], return_tensors="pt", padding=True).to(device)
            enc = model_inputs(model, enc)  # not token_type_ids to a model that takes none
            with cpu:
                ids = model.generate(  # type: ignore[operator]
                    **enc, pad_token_id=pad, streamer=streamer, **sampling.kwargs()
                )
            new = ids[:, enc["input_ids"].shape[1] :]
            for i, seq in zip(rows, new, strict=True):
                out[i] = tok.decode(seq, skip_special_tokens=True).strip()
        answers = [out[i] for i in range(len(texts))]
    finally:
        tok.padding_side = side
        model.train(was_training)
    return answers


def _normalize(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def exact_match(pred: str, ref: str) -> float:
    """1.0 when the texts are equal ignoring case, punctuation and runs of whitespace."""
    return float(_normalize(pred) == _normalize(ref))


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise LeantuneError(
            "ROUGE-L needs the package rouge-score; install it with `pip install rouge-score`"
        ) from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words, Porter-stemmed), 0..1."""
    return float(_rouge_scorer().score(ref, pred)["rougeL"].fmeasure)


def is_short(example: ChatExample, reference: str) -> bool:
    if example.kind:
        return example.kind in SHORT_KINDS
    return len(reference.split()) <= SHORT_WORDS


def sample_examples(
    examples: Sequence[ChatExample], limit: int | None, seed: int
) -> list[ChatExample]:
    """At most ``limit`` examples, a seeded sample that keeps each kind's share."""
    if limit is None or limit >= len(examples):
        return list(examples)
    by_kind: dict[str, list[ChatExample]] = {}
    for ex in examples:
        by_kind.setdefault(ex.kind, []).append(ex)
    rng = random.Random(seed)
    picked: list[ChatExample] = []
    for kind in sorted(by_kind):
        rows = by_kind[kind]
        take = max(1, round(limit * len(rows) / len(examples)))
        picked += rng.sample(rows, min(take, len(rows)))
    return picked[:limit]


def score_answers(
    examples: Sequence[ChatExample], answers: Sequence[str]
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """exact_match over the short-answer examples, rouge_l over the others (a metric is left
    out when no example has its kind), and one row per example for the report."""
    short: list[float] = []
    free: list[float] = []
    rows = []
    for ex, answer in zip(examples, answers, strict=True):
        prompt, reference = prompt_and_reference(ex)
        if is_short(ex, reference):
            short.append(exact_match(answer, reference))
        else:
            free.append(rouge_l(answer, reference))
        rows.append(
            {"prompt": prompt[-1]["content"], "reference": reference, "answer": answer}
            | ({"kind": ex.kind} if ex.kind else {})
        )
    metrics = {}
    if short:
        metrics["exact_match"] = sum(short) / len(short)
    if free:
        metrics["rouge_l"] = sum(free) / len(free)
    return metrics, rows


def evaluate_by_generation(
    model: nn.Module,
    tok: Any,
    examples: Sequence[ChatExample],
    sampling: Sampling,
    *,
    batch_size: int = 8,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Generate an answer to each example's last prompt and score it (``score_answers``)."""
    if not examples:
        raise LeantuneError("no examples to evaluate by generation")
    prompts = [prompt_and_reference(ex)[0] for ex in examples]
    answers = generate(model, tok, prompts, sampling, batch_size=batch_size)
    return score_answers(examples, answers)
