"""Gradual tuning and regularizers: task accuracy and knowledge kept (issue 5).

On the embedded MiniLM + BBC News (the tune job's split), each recipe below trains with the tune
defaults otherwise, on all training data and on a stratified 100-example sample (the small-data
column; validation and test splits unchanged), for each seed. Recipes are cumulative, as the
issue's table reads: plain LoRA (constant rate, no warmup); + warmup/linear decay (the tune
default); + layer-wise decay 0.8; + gradual unfreezing (a layer every sixth of the steps);
+ L2 on the change; + EWC; and full fine-tuning with and without L2-SP. Every run is run_tune in
its own child process (``_common.tune_in_child``); knowledge kept needs the fortunes (make install).

Usage: python benchmarks/bench_gradual.py [--seeds 0 1 2] [--sizes all 100]
       [--recipes plain warmup ...] [--json out.json] [--jobs 2]
--json is also a resume file: runs already in it are not redone. --jobs N runs N children side by
side with 2/N torch threads each (more throughput on 2 cores; train seconds then not comparable
with runs made alone).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import add_row, has_row, load_json, mean_sd, tune_in_child

TRAIN_ALL = 1558  # the default split's training examples

LORA = {"reference_examples": 256}
RECIPES: dict[str, dict[str, Any]] = {
    "plain": LORA | {"schedule": "constant", "warmup_ratio": 0.0},
    "warmup": LORA,
    "layer-decay": LORA | {"layer_decay": 0.8},
    "unfreeze": LORA | {"layer_decay": 0.8, "unfreeze_every": "sixth"},
    "l2": LORA | {"layer_decay": 0.8, "unfreeze_every": "sixth", "l2": 1e-3},
    "ewc": LORA | {"layer_decay": 0.8, "unfreeze_every": "sixth", "l2": 1e-3, "ewc": 1e2},
    "full": {"method": "full", "reference_examples": 256},
    "full-l2sp": {"method": "full", "l2": 1e-2, "reference_examples": 256},
}
# Stronger penalties, for a sensitivity check, and L2 alone on the default (not in the default
# recipe list): `--recipes l2-strong ewc-strong --sizes 100 --seeds 0`.
SENSITIVITY: dict[str, dict[str, Any]] = {
    "l2-strong": RECIPES["unfreeze"] | {"l2": 1.0},
    "ewc-strong": RECIPES["unfreeze"] | {"ewc": 1e6},
    "full-l2sp-strong": RECIPES["full"] | {"l2": 10.0},
    # The candidate default: the tune default plus L2 alone (no layer decay, no unfreezing).
    "warmup-l2": RECIPES["warmup"] | {"l2": 1e-3},
}
DEFAULT_RECIPES = list(RECIPES)
RECIPES |= SENSITIVITY
KEEP = (
    "test_accuracy",
    "knowledge_cosine",
    "knowledge_knn_overlap",
    "train_seconds",
    "knowledge_seconds",
    "knowledge_share_of_wall",
)


def options(recipe: str, size: str, seed: int) -> dict[str, Any]:
    opts = dict(RECIPES[recipe]) | {"seed": seed}
    n = TRAIN_ALL if size == "all" else int(size)
    if size != "all":
        opts["train_examples"] = n
    if opts.get("unfreeze_every") == "sixth":
        steps = math.ceil(n / 16) * 2  # batch 16, 2 epochs
        opts["unfreeze_every"] = max(1, steps // 6)
    return opts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sizes", nargs="+", default=["all", "100"])
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, choices=list(RECIPES))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = load_json(args.json, [])
    todo = [
        (recipe, size, seed)
        for size in args.sizes
        for seed in args.seeds
        for recipe in args.recipes
        if not has_row(rows, recipe=recipe, size=size, seed=seed)
    ]
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0
    lock = threading.Lock()

    def one(key: tuple[str, str, int]) -> None:
        recipe, size, seed = key
        res = tune_in_child(options(recipe, size, seed), KEEP, threads)
        with lock:
            row = {"recipe": recipe, "size": size, "seed": seed, "jobs": args.jobs, **res}
            add_row(rows, row, args.json)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, todo))
    rows = [r for r in rows if r["seed"] in args.seeds]
    print(
        "\n| recipe | data | test acc | embedding cosine | 10-NN overlap | train s "
        "| knowledge s | knowledge share of wall | Δ test acc vs plain (paired) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for recipe in args.recipes:
        for size in args.sizes:
            rs = [r for r in rows if r["recipe"] == recipe and r["size"] == size]
            cells = []
            for key in KEEP:
                values = [r[key] for r in rs if r.get(key) is not None]
                cells.append(mean_sd(values) if values else "-")
            plain = {
                r["seed"]: r["test_accuracy"]
                for r in rows
                if r["recipe"] == "plain" and r["size"] == size
            }
            diffs = [r["test_accuracy"] - plain[r["seed"]] for r in rs if r["seed"] in plain]
            cells.append(
                "-"
                if recipe == "plain" or not diffs
                else f"{statistics.mean(diffs):+.4f} (worse in {sum(d < 0 for d in diffs)}/{len(diffs)})"
            )
            print(f"| {recipe} | {size} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
