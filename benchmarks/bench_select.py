"""Selected parameters vs hand-placed LoRA at the same budget (issue 4).

For each budget (a share of MiniLM's parameters) and seed, on the embedded MiniLM + BBC News
(the tune job's split): (a) ``--select auto`` (the scored Plan), (b) LoRA on query,value and
(c) LoRA on all linear layers of all layers, both at the largest rank whose trainable count
(head included) fits the budget (rank 1 at least), plus full fine-tuning once per seed.
Other recipes: auto-mixed (the plan may also buy BitFit, LayerNorm and sparse units) and
sparse (a FISH mask over the upper half at the budget). Every run is ``run_tune`` in its own
child process (``_common.tune_in_child``; peak RSS = that process's VmHWM); everything else is
the tune defaults (2 epochs, lr 2e-3 for LoRA, 5e-5 for full).

Usage: python benchmarks/bench_select.py [--budgets 0.1% 0.3% 1%] [--seeds 0 1 2]
       [--no-full] [--full-seeds 0] [--recipes auto query,value all-linear] [--layers all] [--json out.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from _common import add_row, mean_sd, save_json, tune_in_child

MINILM_PARAMS = 22_713_216  # base parameters without the 5-class head
HEAD = 384 * 5 + 5
# Parameters one unit of LoRA rank costs across all 6 layers.
PER_RANK = {"query,value": 6 * 2 * (384 + 384), "all-linear": 6 * (4 * 768 + 2 * (384 + 1536))}


def budget_count(spec: str) -> int:
    return int(float(spec.rstrip("%")) / 100 * (MINILM_PARAMS + HEAD))


def recipe_options(recipe: str, budget: str) -> dict[str, Any]:
    if recipe == "auto":
        return {"select": "auto", "budget": budget}
    if recipe == "auto-mixed":  # the plan may also buy biases, norms and sparse entries
        return {"select": "auto", "budget": budget, "plan_methods": "lora,bitfit,layernorm,sparse"}
    if recipe == "sparse":  # a FISH mask over the upper half at the budget
        return {"method": "sparse", "budget": budget}
    if recipe == "full":
        return {"method": "full"}
    rank = max(1, (budget_count(budget) - HEAD) // PER_RANK[recipe])
    return {
        "targets": "query,value" if recipe == "query,value" else "all-linear",
        "layers": "all",
        "r": rank,
        "alpha": 2.0 * rank,
    }


KEEP = (
    "test_accuracy",
    "test_macro_f1",
    "train_seconds",
    "trainable_params",
    "select_seconds",
    "select_share_of_wall",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", default=["0.3%"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--no-full", action="store_true")
    parser.add_argument(
        "--full-seeds", nargs="+", type=int, default=None, help="seeds for full FT (default all)"
    )
    parser.add_argument(
        "--recipes", nargs="+", default=["auto", "query,value", "all-linear"], help="a subset"
    )
    parser.add_argument("--layers", default=None, help="--layers for auto (default upper-half)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for budget in args.budgets:
            for recipe in args.recipes:
                extra = {"layers": args.layers} if recipe.startswith("auto") and args.layers else {}
                res = tune_in_child(recipe_options(recipe, budget) | {"seed": seed} | extra, KEEP)
                add_row(rows, {"budget": budget, "recipe": recipe, "seed": seed, **res})
        if not args.no_full and (args.full_seeds is None or seed in args.full_seeds):
            res = tune_in_child(recipe_options("full", "") | {"seed": seed}, KEEP)
            add_row(rows, {"budget": "100%", "recipe": "full", "seed": seed, **res})
    print("\n| budget | recipe | trainable | test acc | train s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["budget"], r["recipe"]), []).append(r)
    for (budget, recipe), rs in groups.items():
        print(
            f"| {budget} | {recipe} | {rs[0]['trainable_params']:,} | "
            f"{mean_sd([r['test_accuracy'] for r in rs])} | "
            f"{mean_sd([r['train_seconds'] for r in rs])} | "
            f"{mean_sd([r['peak_rss_mb'] for r in rs])} |"
        )
    if args.json:
        save_json(args.json, rows)


if __name__ == "__main__":
    main()
