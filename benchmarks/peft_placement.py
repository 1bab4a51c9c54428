"""Placement recipes for bench_select (issue 28) that leantune does not make itself.

- ``plan_file(..., "uniform" | "qv")``: ``leantune.analysis.plan.uniform_plan`` written as a
  plan.json for the run's model at the budget (any model: the modules come from the model).
- ``eva_adapter``: peft's EVA (``init_lora_weights="eva"``, ``initialize_lora_eva_weights``) on
  every linear module of the top k layers at rank r (k, r: the count closest to the budget),
  computed by peft on the run's own training batches and saved by peft; the run then starts from it (``--init-adapter``), so leantune's
  loop trains it with the same defaults as every other recipe. EVA redistributes the ranks
  (rho 2), so its count differs a little from the others (the table lists it).
- ``plan_file(..., "kappa")``: the targets ``peft.helpers.KappaTuneSelector`` ranks best (lowest
  condition number of the weight), rank 1 each in its order until the budget is spent. It also
  ranks the task head (``classifier``/``score``): dropped, since every recipe trains the head
  in full; the pooler, a pretrained linear layer, stays a candidate (as it is for auto).

Each runs in a child process (``run_in_child``) so the parent stays small.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

PLANS = Path(tempfile.gettempdir()) / "bench_select_plans"


def _prepared(options: dict[str, Any]) -> Any:
    from leantune.tune import make_config
    from leantune.tune.prepare import prepare

    return prepare(make_config(dict(options)), with_method=False)


def _modules_and_heads(prep: Any) -> tuple[list[Any], list[tuple[str, int]], int]:
    from leantune.adapters.planning import ModuleScore
    from leantune.adapters.targets import layer_index
    from leantune.analysis.select import _kind, scorable_modules
    from leantune.tune.strategy import head_modules

    model = prep.model
    named = dict(model.named_modules())
    heads = [] if prep.config.causal else head_modules(model, False)
    modules = []
    for name, m in scorable_modules(model, heads).items():
        w = m.weight
        out_f, in_f = w.shape if type(m).__name__ != "Conv1D" else w.shape[::-1]
        modules.append(ModuleScore(name, _kind(name), layer_index(name), (out_f, in_f)))
    sized = [(h, sum(p.numel() for p in named[h].parameters())) for h in heads]
    return modules, sized, sum(p.numel() for p in model.parameters())


def _plan(options: dict[str, Any], budget: str, recipe: str) -> str:
    from leantune.analysis.plan import parse_budget, uniform_plan

    prep = _prepared(options)
    modules, heads, base = _modules_and_heads(prep)
    count = parse_budget(budget, base)
    if recipe == "kappa":
        plan = _kappa(prep.model, modules, heads, count, base)
    else:
        kinds = sorted(
            {m.kind for m in modules if m.kind.endswith(("q_proj", "v_proj", "query", "value"))}
        )
        plan = uniform_plan(modules, count, base, heads, kinds if recipe == "qv" else None)
    PLANS.mkdir(exist_ok=True)
    path = PLANS / f"{recipe}-{budget.rstrip('%')}-{abs(hash(str(sorted(options.items()))))}.json"
    plan.save(path)
    return str(path)


def _kappa(
    model: Any, modules: list[Any], heads: list[tuple[str, int]], count: int, base: int
) -> Any:
    from peft.helpers import KappaTuneSelector

    from leantune.adapters.planning import PlanEntry
    from leantune.analysis.plan import HEAD, Plan

    by_name = {m.name: m for m in modules}
    ranked = KappaTuneSelector(model, show_progress=False).get_best_targets(
        num_modules=len(named(model))
    )
    ranked = [n for n in ranked if n in by_name]  # the head is dropped (trained in full anyway)
    left = count - sum(n for _, n in heads)
    plan = Plan(count, base, [PlanEntry(h, HEAD, n, n) for h, n in heads], "kappatune")
    for name in ranked:
        cost = by_name[name].rank_cost
        if cost <= left:
            plan.entries.append(PlanEntry(name, "lora", 1, cost))
            left -= cost
    return plan


def named(model: Any) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def plan_file(options: dict[str, Any], budget: str, recipe: str) -> str:
    """A plan.json of ``recipe`` (uniform, qv, kappa) for the run's model at ``budget``."""
    from _common import run_in_child

    return run_in_child(_plan, options, budget, recipe)


def _one_rank_recipe(modules: list[Any], left: int) -> tuple[list[str], int]:
    """Every linear module of the top k layers at one rank r, k and r chosen so the count is
    closest to ``left``: EVA's starting point (it then moves ranks between these modules,
    keeping their sum)."""
    layers = sorted({m.layer for m in modules if m.layer is not None}, reverse=True)
    best: tuple[int, list[str], int] = (left, [], 1)
    for k in range(1, len(layers) + 1):
        chosen = [m for m in modules if m.layer in layers[:k]]
        cost = sum(m.rank_cost for m in chosen)
        for r in range(1, 65):
            if abs(r * cost - left) < best[0]:
                best = (abs(r * cost - left), [m.name for m in chosen], r)
    return best[1], best[2]


def _eva(options: dict[str, Any], budget: str, out: str) -> str:
    import torch
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    from leantune.analysis.evaluate import make_batch
    from leantune.analysis.plan import parse_budget

    prep = _prepared(options)
    modules, heads, base = _modules_and_heads(prep)
    targets, r = _one_rank_recipe(modules, parse_budget(budget, base) - sum(n for _, n in heads))
    causal = prep.config.causal
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,  # leantune's default alpha / r = 2
        target_modules=targets,
        modules_to_save=[h for h, _ in heads] or None,
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=2.0, use_label_mask=causal),
        task_type="CAUSAL_LM" if causal else "SEQ_CLS",
    )
    model = get_peft_model(prep.model, config, low_cpu_mem_usage=True)
    rows = list(range(len(prep.train)))
    size = prep.config.batch_size
    batches = [
        make_batch(prep.train, rows[i : i + size], prep.tok.pad_token_id, causal)
        for i in range(0, len(rows), size)
    ]
    torch.manual_seed(prep.config.seed)
    initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    model.save_pretrained(out)
    return out


def eva_adapter(options: dict[str, Any], budget: str) -> str:
    """peft's EVA-initialised adapter for the run (a folder for --init-adapter)."""
    from _common import run_in_child

    PLANS.mkdir(exist_ok=True)
    out = PLANS / f"eva-{budget.rstrip('%')}-{abs(hash(str(sorted(options.items()))))}"
    return run_in_child(_eva, options, budget, str(out))
