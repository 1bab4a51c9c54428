"""Selected parameters vs hand-placed LoRA at the same budget (issue 4).

For each budget (a share of MiniLM's parameters) and seed, on the embedded MiniLM + BBC News
(the tune job's split): (a) ``--select auto`` (the scored Plan), (b) LoRA on query,value and
(c) LoRA on all linear layers of all layers, both at the largest rank whose trainable count
(head included) fits the budget (rank 1 at least), plus full fine-tuning once per seed.
Other recipes: auto-mixed (the plan may also buy BitFit, LayerNorm and sparse units) and
sparse (a FISH mask over the upper half at the budget). Every
run is ``run_tune`` in its own child process (peak RSS = that process's VmHWM); everything else
is the tune defaults (2 epochs, lr 2e-3 for LoRA, 5e-5 for full).

Usage: python benchmarks/bench_select.py [--budgets 0.1% 0.3% 1%] [--seeds 0 1 2]
       [--no-full] [--full-seeds 0] [--recipes auto query,value all-linear] [--layers all] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
from pathlib import Path
from typing import Any

from leantune.core.memory import peak_memory_mb

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


def child_run(
    options: dict[str, Any], out: Any, keep: tuple[str, ...] = KEEP, threads: int = 0
) -> None:
    import torch

    from leantune.tune import TuneConfig, run_tune

    if threads:
        torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory() as tmp:
        # The figures in docs/BENCHMARKS.md were made before L2 1e-3 became LoRA's default:
        # off unless a recipe sets it, so they reproduce.
        config = TuneConfig(runs_dir=tmp, name="b", **({"l2": 0.0} | options))
        summary = run_tune(config)
    out.put({k: summary[k] for k in keep if k in summary} | {"peak_rss_mb": peak_memory_mb()})


def run(options: dict[str, Any], keep: tuple[str, ...] = KEEP, threads: int = 0) -> dict[str, Any]:
    """run_tune(options) in a fresh child process: its summary's ``keep`` keys + peak RSS.

    ``threads`` > 0 sets the child's torch threads (for runs side by side)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=child_run, args=(options, queue, keep, threads))
    proc.start()
    result = queue.get()
    proc.join()
    return result  # type: ignore[no-any-return]


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


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
                res = run(recipe_options(recipe, budget) | {"seed": seed} | extra)
                rows.append({"budget": budget, "recipe": recipe, "seed": seed, **res})
                print(json.dumps(rows[-1]), flush=True)
        if not args.no_full and (args.full_seeds is None or seed in args.full_seeds):
            res = run(recipe_options("full", "") | {"seed": seed})
            rows.append({"budget": "100%", "recipe": "full", "seed": seed, **res})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| budget | recipe | trainable | test acc | train s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["budget"], r["recipe"]), []).append(r)
    for (budget, recipe), rs in groups.items():
        print(
            f"| {budget} | {recipe} | {rs[0]['trainable_params']:,} | "
            f"{mean_std([r['test_accuracy'] for r in rs])} | "
            f"{mean_std([r['train_seconds'] for r in rs])} | "
            f"{mean_std([r['peak_rss_mb'] for r in rs])} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
