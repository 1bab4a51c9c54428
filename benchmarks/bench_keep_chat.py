"""The keep loss on the instruct default (issue 29): task gain against general ability kept.

Each recipe is ``leantune tune --task instruct`` on the embedded default (SmolLM2-135M-Instruct,
the BBC headline and topic instructions) with its own ``--keep`` / ``--keep-every``, run by the
CLI in its own process, so every other option is the shipped default. Seeds are rounds: round
``s`` runs every recipe with ``--seed s``, in the given order on even rounds and reversed on odd
ones, so a drift in the machine's speed hits every recipe alike. Recorded per run: topic exact
match and headline ROUGE-L on the test prompts (before and after), the general score (the
embedded general set, before and after), reference perplexity on the fortunes (before and
after), training seconds and the whole run's wall seconds.

The table gives each recipe's mean ± sd over the seeds, its share of keep-off's task gain, and
its training time over keep-off's in the same round (paired ratios).

Usage (not part of CI; about 6 minutes a run on the 2-core VM):
    python benchmarks/bench_keep_chat.py --seeds 0 1 2 --json benchmarks/bench_keep_chat.json
    python benchmarks/bench_keep_chat.py --json benchmarks/bench_keep_chat.json --table

With --json, finished (recipe, seed) runs are read back and skipped (resumable).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from _common import (
    add_row,
    has_row,
    leantune_command,
    load_json,
    offline_env,
    read_summary,
    run_timed,
)

RECIPES: dict[str, tuple[str, ...]] = {
    "keep off": ("--keep", "0"),
    "keep 1": ("--keep", "1"),
    "keep 1, every 3": ("--keep", "1", "--keep-every", "3"),
    "keep 3": ("--keep", "3"),
}
KEPT = (
    "test_exact_match_before",
    "test_exact_match",
    "test_rouge_l_before",
    "test_rouge_l",
    "general_before",
    "general_after",
    "reference_perplexity_before",
    "reference_perplexity_after",
    "train_seconds",
    "wall_seconds",
    "peak_memory_mb",
    "trainable_params",
    "steps",
)
"""The summary keys kept per run."""


def run_one(recipe: str, seed: int, runs: Path) -> dict[str, Any]:
    name = f"{recipe.replace(', ', '-').replace(' ', '')}-s{seed}"
    cmd = leantune_command(
        "tune", "--task", "instruct", "--seed", str(seed), "--name", name,
        "--runs-dir", str(runs), "--overwrite", *RECIPES[recipe],
    )  # fmt: skip
    done, seconds = run_timed(cmd, offline_env(), log=runs / f"{name}.log")
    if done.returncode != 0:
        raise SystemExit(f"{recipe} seed {seed} failed (exit {done.returncode}): {runs}/{name}.log")
    summary = read_summary(runs / name)
    return {"recipe": recipe, "seed": seed, "process_seconds": round(seconds, 1)} | {
        k: summary.get(k) for k in KEPT
    }


def _mean_sd(values: list[float], fmt: str) -> str:
    if len(values) < 2:
        return format(values[0], fmt) if values else "–"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def table(rows: list[dict[str, Any]], recipes: list[str]) -> str:
    by = {(r["recipe"], r["seed"]): r for r in rows}
    base = [r for r in rows if r["recipe"] == "keep off"]
    gain_off = {
        r["seed"]: (
            r["test_exact_match"] - r["test_exact_match_before"],
            r["test_rouge_l"] - r["test_rouge_l_before"],
        )
        for r in base
    }
    lines = [
        "| recipe | seeds | topic EM | headline ROUGE-L | share of keep-off's gain (EM, ROUGE-L) "
        "| general score (base → tuned) | reference ppl Δ | train s | train time ÷ keep off |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for recipe in recipes:
        rs = [r for r in rows if r["recipe"] == recipe]
        if not rs:
            continue
        em = [r["test_exact_match"] for r in rs]
        rl = [r["test_rouge_l"] for r in rs]
        shares_em, shares_rl, ratios = [], [], []
        for r in rs:
            off = by.get(("keep off", r["seed"]))
            if off is None:
                continue
            g_em, g_rl = gain_off[r["seed"]]
            shares_em.append((r["test_exact_match"] - r["test_exact_match_before"]) / g_em)
            shares_rl.append((r["test_rouge_l"] - r["test_rouge_l_before"]) / g_rl)
            ratios.append(r["train_seconds"] / off["train_seconds"])
        general_b = [r["general_before"] for r in rs]
        general_a = [r["general_after"] for r in rs]
        ref = [
            100 * (r["reference_perplexity_after"] / r["reference_perplexity_before"] - 1)
            for r in rs
            if r.get("reference_perplexity_after") is not None
        ]
        share = (
            f"{statistics.mean(shares_em):.0%}, {statistics.mean(shares_rl):.0%}"
            if shares_em
            else "–"
        )
        lines.append(
            f"| {recipe} | {len(rs)} | {_mean_sd(em, '.3f')} | {_mean_sd(rl, '.3f')} | {share} "
            f"| {statistics.mean(general_b):.3f} → {_mean_sd(general_a, '.3f')} "
            f"| {_mean_sd(ref, '+.1f')} % | {_mean_sd([r['train_seconds'] for r in rs], '.0f')} "
            f"| {_mean_sd(ratios, '.2f') if ratios else '–'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, default=Path("runs/keep_chat"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--table", action="store_true", help="print the table and stop")
    args = parser.parse_args()

    rows: list[dict[str, Any]] = load_json(args.json, [])
    if not args.table:
        args.runs.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(args.seeds):
            order = args.recipes if i % 2 == 0 else args.recipes[::-1]
            for recipe in order:
                if has_row(rows, recipe=recipe, seed=seed):
                    continue
                add_row(rows, run_one(recipe, seed, args.runs), args.json)
                print(f"{recipe} seed {seed}: done", flush=True)
    print(table(rows, args.recipes))


if __name__ == "__main__":
    main()
