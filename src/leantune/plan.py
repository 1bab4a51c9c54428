"""The Plan: which modules get which method and size, under a trainable-parameter budget.

Readable JSON (``plan.json``) that a user can print, edit and give back with
``leantune tune --plan plan.json``::

    {"budget": 68000, "base_params": 22713216, "score": "spectrum",
     "entries": [{"module": "bert.encoder.layer.5.attention.self.value", "method": "lora",
                  "size": 6, "params": 4608, "gain": 0.0123}, ...,
                 {"module": "classifier", "method": "head", "size": 1925, "params": 1925}]}

Allocation is greedy on gradient energy per parameter: one more unit of LoRA rank on module m
costs (in + out) parameters and captures σ²_{r+1} of m's mean gradient (see select.py). Those
marginal gains fall as r grows, so taking the best gain per parameter until the budget is spent
is the optimal allocation of this first-order model. The task head is always trained and is
paid for first.
"""

from __future__ import annotations

import heapq
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from leantune.errors import LeantuneError
from leantune.select import Scores

PLAN_METHODS = ("lora", "head")


@dataclass
class PlanEntry:
    module: str
    method: str
    """lora (size = rank) or head (trained in full; size = parameters)."""
    size: int
    params: int
    """Trainable parameters this entry costs."""
    gain: float = 0.0
    """Gradient energy the entry captures (lora: Σ σ² of its ranks)."""


@dataclass
class Plan:
    budget: int
    base_params: int
    entries: list[PlanEntry] = field(default_factory=list)
    score: str = "spectrum"

    @property
    def params(self) -> int:
        return sum(e.params for e in self.entries)

    def lora(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.method == "lora"]

    def heads(self) -> list[str]:
        return [e.module for e in self.entries if e.method == "head"]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        try:
            raw = json.loads(Path(path).read_text())
        except OSError as e:
            raise LeantuneError(f"cannot read plan {path}: {e.strerror}") from None
        except ValueError as e:
            raise LeantuneError(f"plan {path} is not valid JSON: {e}") from None
        try:
            entries = [PlanEntry(**e) for e in raw.pop("entries")]
            plan = cls(**raw, entries=entries)
        except (TypeError, KeyError, AttributeError) as e:
            raise LeantuneError(f"plan {path} does not have the plan layout: {e}") from None
        for entry in plan.entries:
            if entry.method not in PLAN_METHODS:
                raise LeantuneError(
                    f"plan {path}: method {entry.method!r} is not one of {PLAN_METHODS}"
                )
            if not isinstance(entry.size, int) or entry.size <= 0:
                raise LeantuneError(
                    f"plan {path}: {entry.module} has size {entry.size!r}; use a positive int"
                )
        return plan

    def check(self, model: nn.Module) -> None:
        """Every module the plan names exists in ``model``."""
        names = {n for n, _ in model.named_modules()}
        missing = [e.module for e in self.entries if e.module not in names]
        if missing:
            raise LeantuneError(
                f"the plan names {len(missing)} module(s) the model lacks, first {missing[0]!r}; "
                "was it made for another model?"
            )

    def lora_config(self, alpha_ratio: float = 2.0) -> Any:
        """A LoraConfig adapting exactly the plan's modules at its ranks (alpha = ratio · r)."""
        from leantune.methods.lora import LoraConfig

        lora = self.lora()
        if not lora:
            return None
        base = max(e.size for e in lora)
        return LoraConfig(
            r=base,
            alpha=alpha_ratio * base,
            targets="|".join(re.escape(e.module) for e in lora),
            rank_pattern={e.module: e.size for e in lora if e.size != base},
            alpha_pattern={e.module: alpha_ratio * e.size for e in lora if e.size != base},
            modules_to_save=self.heads(),
        )


def parse_budget(spec: str | float | int, base_params: int) -> int:
    """'0.5%' → that share of the base parameters; '68000' or 68000 → a count."""
    text = str(spec).strip().replace(",", "").replace("_", "")
    try:
        value = float(text[:-1]) / 100 * base_params if text.endswith("%") else float(text)
    except ValueError:
        raise LeantuneError(
            f"budget {spec!r}: give a count like 68000 or a share like 0.3%"
        ) from None
    if not value > 0:
        raise LeantuneError(f"budget {spec!r} must be more than 0")
    if value > base_params:
        raise LeantuneError(f"budget {spec!r} exceeds the model's {base_params:,} parameters")
    return int(value)


def allocate(
    scores: Scores,
    budget: int,
    base_params: int,
    heads: Sequence[tuple[str, int]] = (),
    max_rank: int = 64,
) -> Plan:
    """Spend ``budget`` parameters: the heads first, then LoRA ranks by gain per parameter."""
    if budget <= 0:
        raise LeantuneError(f"budget must be more than 0, got {budget}")
    head_cost = sum(n for _, n in heads)
    if head_cost > budget:
        raise LeantuneError(
            f"the budget ({budget:,}) is smaller than the task head ({head_cost:,} parameters); "
            "raise it"
        )
    plan = Plan(budget, base_params, [PlanEntry(m, "head", n, n) for m, n in heads])
    left = budget - head_cost
    ranks: dict[str, int] = {}
    gains: dict[str, float] = {}
    by_name = {m.name: m for m in scores.modules}
    # (−gain per parameter, name): the best next rank unit on top of the heap.
    heap = [(-m.spectrum[0] / m.rank_cost, m.name) for m in scores.modules if m.spectrum]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        m = by_name[name]
        if m.rank_cost > left:
            continue  # too big for what is left; a smaller module may still fit
        r = ranks.get(name, 0)
        ranks[name] = r + 1
        gains[name] = gains.get(name, 0.0) + m.spectrum[r]
        left -= m.rank_cost
        if r + 1 < min(max_rank, len(m.spectrum)):
            heapq.heappush(heap, (-m.spectrum[r + 1] / m.rank_cost, name))
    for m in scores.modules:  # model order, so the file reads top to bottom
        if m.name in ranks:
            r = ranks[m.name]
            plan.entries.append(PlanEntry(m.name, "lora", r, r * m.rank_cost, gains[m.name]))
    return plan
