"""Gradual tuning and regularizers: task accuracy and knowledge kept (issue 5).

On the embedded MiniLM + BBC News (the tune job's split), each recipe below trains with the tune
defaults otherwise, on all training data and on a stratified 100-example sample (the small-data
column; validation and test splits unchanged), for each seed. Recipes are cumulative, as the
issue's table reads: plain LoRA (constant rate, no warmup); + warmup/linear decay (the tune
default); + layer-wise decay 0.8; + gradual unfreezing (a layer every sixth of the steps);
+ L2 on the change; + EWC; and full fine-tuning with and without L2-SP. Every run is run_tune in
its own child process (bench_select.run); knowledge kept needs the fortunes (make install).

Usage: python benchmarks/bench_gradual.py [--seeds 0 1 2] [--sizes all 100]
       [--recipes plain warmup ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from bench_select import run

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
KEEP = ("test_accuracy", "knowledge_cosine", "knowledge_knn_overlap", "train_seconds")


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
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for size in args.sizes:
            for recipe in args.recipes:
                res = run(options(recipe, size, seed), keep=KEEP)
                rows.append({"recipe": recipe, "size": size, "seed": seed, **res})
                print(json.dumps(rows[-1]), flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print("\n| recipe | data | test acc | embedding cosine | 10-NN overlap | train s |")
    print("|---|---|---|---|---|---|")
    for recipe in args.recipes:
        for size in args.sizes:
            rs = [r for r in rows if r["recipe"] == recipe and r["size"] == size]
            cells = []
            for key in KEEP:
                values = [r[key] for r in rs if r.get(key) is not None]
                if not values:
                    cells.append("-")
                elif len(values) == 1:
                    cells.append(f"{values[0]:.4g}")
                else:
                    cells.append(f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}")
            print(f"| {recipe} | {size} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
