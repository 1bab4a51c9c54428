"""The general measure in a run's report (issue 29): the headline's general score, the share
of the general prompts passed by category, and the sample of answers shown side by side."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from leantune.tune.figures import summary_number
from leantune.tune.html import history_table


def general_text(summary: Mapping[str, Any]) -> str | None:
    """``general score 0.402 → 0.310 (-0.092) on 200 prompts``; None when not measured."""
    after = summary_number(summary, "general_after")
    before = summary_number(summary, "general_before")
    if after is None or before is None:
        return None
    count = summary.get("general_examples", "")
    return f"general score {before:.3f} → {after:.3f} ({after - before:+.3f}) on {count} prompts"


def general_scores(general: Sequence[Mapping[str, Any]]) -> list[str]:
    """The share of the prompts passed by category, base and tuned (nothing for the rows of
    a run from before the scores: four prompts and their answers)."""
    scored = [r for r in general if "score" in r and "base_score" in r]
    if not scored:
        return []
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in scored:
        groups.setdefault(str(row.get("category", "")), []).append(row)
    table: list[dict[str, Any]] = [
        {
            "category": name,
            "prompts": len(rows),
            "base model": round(sum(float(r["base_score"]) for r in rows) / len(rows), 3),
            "tuned": round(sum(float(r["score"]) for r in rows) / len(rows), 3),
        }
        for name, rows in groups.items()
    ]
    return [
        f'<p class="muted">{len(scored)} prompts outside the task, scored by rule: the '
        "expected number or word(s) in the answer, instructions (one word, one sentence, a "
        "list of three, ...) by their rule. The share passed:</p>",
        history_table(table),
    ]


def general_sample(general: Sequence[Mapping[str, Any]], limit: int) -> list[Mapping[str, Any]]:
    """The first four rows (the four prompts every run answered before the set), then the
    first row of each category not shown yet, then the rest in order, ``limit`` in all."""
    shown = list(general[:4])
    seen = {r.get("category") for r in shown}
    for row in general[4:]:
        if row.get("category") not in seen:
            seen.add(row.get("category"))
            shown.append(row)
    shown += [r for r in general[4:] if r not in shown]
    return shown[:limit]
