"""Selected parameters vs hand-placed LoRA at the same budget (issue 4).

For each budget (a share of MiniLM's parameters) and seed, on the embedded MiniLM + BBC News
(the tune job's split): (a) ``--select auto`` (the scored Plan), (b) LoRA on query,value and
(c) LoRA on all linear layers of all layers, both at the largest rank whose trainable count
(head included) fits the budget (rank 1 at least), plus full fine-tuning once per seed.
Other recipes: auto-mixed (the plan may also buy BitFit, LayerNorm and sparse units) and
sparse (a FISH mask over the upper half at the budget). Every run is ``run_tune`` in its own
child process (``_common.tune_in_child``; peak RSS = that process's VmHWM); everything else is
the tune defaults (2 epochs, lr 2e-3 for LoRA, 5e-5 for full).

Issue 28 (placement at the same trainable count): ``uniform`` is LoRA on every linear layer
of the top k layers at rank r, ``qv`` LoRA on query and value of every layer at rank r, both
``leantune.analysis.plan.uniform_plan`` written as plans (``--plan``) with a few modules at
r + 1 so the count lands near auto's; ``eva`` is peft's EVA init and ``kappa`` peft's
KappaTuneSelector targets (``peft_placement.py``, peft's own API); ``auto*`` rows pin LoRA's
standard init (as recorded before ``--init auto``); a ``+grad`` suffix adds ``--init grad``
(``auto+grad`` is today's ``--select auto``), ``+warm`` ``--score-head warm``. Every recipe
runs with the tune defaults (warm head, keep loss, L2, schedule, epochs): the table compares
placement (and the start) and nothing else. ``--data bbc-headlines``, ``--train-examples
100``, ``--task instruct`` (SmolLM2; ``--metric best_val_loss``); ``--json`` resumes
(finished rows are kept); ``--table`` prints the table of a JSON with each recipe's paired
difference from ``--versus`` (default auto; mean, 95 % t interval).

Usage: python benchmarks/bench_select.py [--budgets 0.1% 0.3% 1%] [--seeds 0 1 2]
       [--no-full] [--full-seeds 0] [--recipes auto query,value all-linear] [--layers all] [--json out.json]
       python benchmarks/bench_select.py --defaults --data bbc-headlines --budgets 0.1% \
           --recipes auto uniform qv auto-mixed sparse --seeds 0 1 2 --no-full --json b.json
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any

from _common import add_row, has_row, load_json, mean_sd, save_json, tune_in_child
from peft_placement import eva_adapter, plan_file

MINILM_PARAMS = 22_713_216  # base parameters without the 5-class head
HEAD = 384 * 5 + 5
# Parameters one unit of LoRA rank costs across all 6 layers.
PER_RANK = {"query,value": 6 * 2 * (384 + 384), "all-linear": 6 * (4 * 768 + 2 * (384 + 1536))}


def budget_count(spec: str) -> int:
    return int(float(spec.rstrip("%")) / 100 * (MINILM_PARAMS + HEAD))


def recipe_options(recipe: str, budget: str, common: dict[str, Any]) -> dict[str, Any]:
    if "+" in recipe:  # qv+grad: the recipe with --init grad; +warm: --score-head warm
        base, *extras = recipe.split("+")
        more = {"grad": {"init": "grad"}, "warm": {"score_head": "warm"}}
        options = recipe_options(base, budget, common)
        for extra in extras:
            options |= more[extra]
        return options
    if recipe in ("uniform", "qv", "kappa"):  # plans written for the run's model and data
        return {"plan": plan_file(common, budget, recipe)}
    if recipe == "eva":  # peft's EVA init on uniform's modules, trained from there
        return {"init_adapter": eva_adapter(common, budget)}
    if recipe.startswith("auto"):  # the rows before --init auto: LoRA's standard init
        return {"init": "standard"} | recipe_options(f"selected{recipe[4:]}", budget, common)
    if recipe == "selected":
        return {"select": "auto", "budget": budget}
    if recipe == "selected-all":  # free to place on every layer, as qv is (issue 28)
        return {"select": "auto", "budget": budget, "layers": "all"}
    if recipe == "selected-warm":  # scored through the probe's head (issue 28)
        return {"select": "auto", "budget": budget, "score_head": "warm"}
    if recipe == "selected-mixed":  # the plan may also buy biases, norms and sparse entries
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
    "knowledge_cosine",
    "probe_test_accuracy",
    "wall_seconds",
    # --task instruct (SmolLM2): the figures
    "best_val_loss",
    "test_exact_match",
    "test_rouge_l",
    "test_perplexity",
    "reference_perplexity",
    "reference_perplexity_change",
)
LOWER_IS_BETTER = ("loss", "perplexity")


T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired_table(
    rows: list[dict[str, Any]], metric: str = "test_accuracy", versus: str = "auto"
) -> str:
    """Per (data, budget, recipe): trainable count, ``metric`` mean ± sd, and the paired
    difference from ``versus`` over the seeds both have (mean and 95 % t interval; accuracies in
    points, losses as they are)."""
    groups: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}
    for r in rows:
        if metric in r:
            key = (str(r.get("data", "bbc")), str(r["budget"]), str(r["recipe"]))
            groups.setdefault(key, {})[int(r["seed"])] = r
    scale = 1 if any(w in metric for w in LOWER_IS_BETTER) else 100
    lines = [
        f"| data | budget | recipe | trainable | {metric} | vs {versus} (95 % CI) | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for (data, budget, recipe), by_seed in sorted(groups.items()):
        values = [r[metric] for r in by_seed.values()]
        counts = sorted({r["trainable_params"] for r in by_seed.values()})
        auto = groups.get((data, budget, versus), {})
        diffs = [scale * (by_seed[s][metric] - auto[s][metric]) for s in by_seed if s in auto]
        vs = "—"
        if recipe != versus and len(diffs) >= 2:
            m, sd = statistics.mean(diffs), statistics.stdev(diffs)
            half = T95.get(len(diffs) - 1, 2.0) * sd / math.sqrt(len(diffs))
            vs = (
                f"{m:+.3g} [{m - half:+.3g}, {m + half:+.3g}]"
                if scale == 1
                else (f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}]")
            )
        elif recipe != versus and diffs:
            vs = f"{diffs[0]:+.3g} (one seed)"
        count = ", ".join(f"{c:,}" for c in counts)
        lines.append(
            f"| {data} | {budget} | {recipe} | {count} | {mean_sd(values)} | {vs} | {len(values)} |"
        )
    return "\n".join(lines)


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
    parser.add_argument("--data", default=None, help="--data for every run (bbc-headlines)")
    parser.add_argument("--train-examples", type=int, default=None)
    parser.add_argument(
        "--defaults", action="store_true", help="the tune defaults (L2 too), as issue 28 asks"
    )
    parser.add_argument("--table", action="store_true", help="print the JSON's table, run nothing")
    parser.add_argument("--task", default=None, help="--task for every run (instruct: SmolLM2)")
    parser.add_argument("--gen-examples", type=int, default=None, help="instruct: test prompts")
    parser.add_argument("--metric", default="test_accuracy", help="the table's column")
    parser.add_argument("--versus", default="auto", help="the table's paired differences from")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = load_json(args.json, []) if args.json else []
    if args.table:
        print(paired_table(rows, args.metric, args.versus))
        return
    data = args.data or ("smollm2-instruct" if args.task == "instruct" else "bbc")
    data_label = data + (f"/{args.train_examples}" if args.train_examples else "")
    common: dict[str, Any] = {"l2": None} if args.defaults else {}
    if args.data:
        common["data"] = args.data
    if args.train_examples:
        common["train_examples"] = args.train_examples
    if args.task:  # the general-ability set is not what placement is measured on here
        common |= {"task": args.task, "general_examples": 0}
    if args.gen_examples is not None:
        common["gen_examples"] = args.gen_examples
    for seed in args.seeds:
        for budget in args.budgets:
            for recipe in args.recipes:
                done = {"data": data_label, "budget": budget, "recipe": recipe, "seed": seed}
                if has_row(rows, **done):
                    continue
                extra = {"layers": args.layers} if recipe.startswith("auto") and args.layers else {}
                options = (
                    common
                    | recipe_options(recipe, budget, common | {"seed": seed})
                    | {"seed": seed}
                    | extra
                )
                res = tune_in_child(options, KEEP)
                add_row(rows, done | res, args.json)
        if not args.no_full and (args.full_seeds is None or seed in args.full_seeds):
            res = tune_in_child(recipe_options("full", "", {}) | {"seed": seed}, KEEP)
            add_row(rows, {"budget": "100%", "recipe": "full", "seed": seed, **res})
    print(f"\n| budget | recipe | trainable | {args.metric} | train s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if args.metric in r:
            groups.setdefault((r["budget"], r["recipe"]), []).append(r)
    for (budget, recipe), rs in groups.items():
        print(
            f"| {budget} | {recipe} | {rs[0]['trainable_params']:,} | "
            f"{mean_sd([r[args.metric] for r in rs])} | "
            f"{mean_sd([r['train_seconds'] for r in rs])} | "
            f"{mean_sd([r['peak_rss_mb'] for r in rs])} |"
        )
    if args.json:
        save_json(args.json, rows)
    print()
    print(paired_table(rows, args.metric, args.versus))


if __name__ == "__main__":
    main()
