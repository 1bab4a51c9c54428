"""Adaptive budget vs fixed-rank LoRA at the same final parameter count (issue 6).

On the embedded MiniLM + BBC News (the tune job's split and defaults: LoRA r=8 on all linear
layers of the upper half, 2 epochs), for each seed: (a) fixed rank 8; (b) ``--adapt F`` (start at
F× the ranks, pruned back to the same count by 70 % of the steps). Each run is run_tune in its own
child process (``_common.tune_in_child``). The JSON is also a resume file.

Usage: python benchmarks/bench_adapt.py [--seeds 0 1 2] [--factor 1.5] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from _common import add_row, has_row, load_json, mean_sd, tune_in_child

KEEP = ("test_accuracy", "trainable_params", "adapt_start_params", "train_seconds", "best_step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--factor", type=float, default=1.5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = load_json(args.json, [])
    recipes = {"fixed": {}, f"adapt-{args.factor:g}": {"adapt": args.factor}}
    for seed in args.seeds:
        for recipe, opts in recipes.items():
            if has_row(rows, recipe=recipe, seed=seed):
                continue
            res = tune_in_child(opts | {"seed": seed, "reference_examples": 0}, KEEP)
            add_row(rows, {"recipe": recipe, "seed": seed, **res}, args.json)
    print("\n| recipe | test acc | final trainable | started at | train s |")
    print("|---|---|---|---|---|")
    for recipe in recipes:
        rs = [r for r in rows if r["recipe"] == recipe and r["seed"] in args.seeds]
        if not rs:
            continue
        shown = mean_sd([r["test_accuracy"] for r in rs], ".4f", ".4f")
        start = rs[0].get("adapt_start_params") or rs[0]["trainable_params"]
        secs = statistics.mean(r["train_seconds"] for r in rs)
        print(f"| {recipe} | {shown} | {rs[0]['trainable_params']:,} | {start:,} | {secs:.0f} |")


if __name__ == "__main__":
    main()
