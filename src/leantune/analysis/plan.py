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

With more methods allowed (``methods``), their units join the same heap: a layer's bias
(BitFit, ‖ḡ_b‖² for ``out`` parameters), a norm's scale and shift (LayerNorm tuning), and chunks
of the top-Fisher entries of a weight (sparse, Σ ḡ² per chunk). Each method prices its own units
(``plan_modules``, ``plan_unit``, ``plan_size``) and builds its config from its entries
(``from_plan``); any registered method that does is plannable. A module takes one method: the
first unit bought on it decides. Sparse masks are kept beside plan.json in
``<plan>.masks.safetensors`` (flat (out, in) indices per module).
"""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from leantune.adapters.config import METHODS, AdapterConfig, MixedConfig, method_config
from leantune.adapters.planning import ModuleScore, PlanEntry, Scores
from leantune.core.errors import LeantuneError
from leantune.core.files import read_tensors

HEAD = "head"
"""The method of a plan entry trained in full with the adapter (a task head)."""


def allocated() -> tuple[str, ...]:
    """Methods a Plan can spend its budget on: the registered ones with planner units (the
    head is always paid first)."""
    return tuple(n for n, c in METHODS.items() if c.plannable())


def plan_methods() -> tuple[str, ...]:
    return (*allocated(), HEAD)


@dataclass
class Plan:
    budget: int
    base_params: int
    entries: list[PlanEntry] = field(default_factory=list)
    score: str = "spectrum"
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    """Tensors entries keep by module (sparse masks; ``plan_keeps_tensor``): not in the JSON
    but in the masks file beside it."""

    @property
    def params(self) -> int:
        return sum(e.params for e in self.entries)

    def of(self, method: str) -> list[PlanEntry]:
        return [e for e in self.entries if e.method == method]

    def methods(self) -> list[str]:
        """The adapter methods the plan uses, in registry order (the head aside)."""
        return [m for m in METHODS if self.of(m)]

    def heads(self) -> list[str]:
        return [e.module for e in self.entries if e.method == HEAD]

    def kept(self) -> list[PlanEntry]:
        """Entries that keep a tensor in the masks file."""
        return [e for m in self.methods() if METHODS[m].plan_keeps_tensor for e in self.of(m)]

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("masks")
        return json.dumps(data, indent=1) + "\n"

    def save(self, path: str | os.PathLike[str]) -> Path:
        """plan.json, and its masks file when the plan has sparse entries (each atomically)."""
        path = Path(path)
        if self.kept():
            masks = masks_path(path)
            tmp_masks = masks.with_name(f".{masks.name}.tmp")
            tensors = {e.module: self.masks[e.module].contiguous() for e in self.kept()}
            save_file(tensors, str(tmp_masks))
            os.replace(tmp_masks, masks)
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
            if entry.method not in plan_methods():
                raise LeantuneError(
                    f"plan {path}: method {entry.method!r} is not one of {plan_methods()}"
                )
            if not isinstance(entry.size, int) or entry.size <= 0:
                raise LeantuneError(
                    f"plan {path}: {entry.module} has size {entry.size!r}; use a positive int"
                )
            bad = _bad_option(entry)
            if bad:
                raise LeantuneError(f"plan {path}: {entry.module} options: {bad}")
        sparse = plan.kept()
        if sparse:
            masks = masks_path(Path(path))
            try:
                plan.masks = read_tensors(masks)
            except LeantuneError as e:
                raise LeantuneError(
                    f"plan {path} has {sparse[0].method} entries but its masks file cannot be "
                    f"used ({e}); rerun leantune select"
                ) from None
            for entry in sparse:
                mask = plan.masks.get(entry.module)
                if mask is None or mask.numel() != entry.size:
                    raise LeantuneError(
                        f"plan {path}: the {entry.method} mask of {entry.module} does not have "
                        f"{entry.size} entries; a {entry.method} size cannot be edited by hand, "
                        "rerun leantune select"
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

    def method_config(self, method: str) -> AdapterConfig | None:
        """The config adapting exactly the plan's ``method`` entries (``from_plan``), None
        when the plan has none."""
        entries = self.of(method)
        return method_config(method).from_plan(entries, self.masks) if entries else None

    def adapter_config(self) -> AdapterConfig | None:
        """The adapter config for this plan: the method's own config when the plan uses one
        method (a LoRA-only plan gives a LoraConfig, which peft loads), else a MixedConfig of
        one part per method; None when only heads train."""
        parts = [self.method_config(m) for m in self.methods()]
        if len(parts) == 1 and parts[0] is not None:
            return replace(parts[0], modules_to_save=self.heads())
        if not parts:
            return None
        listed = [
            replace(p, targets=[e.module for e in self.of(m)], modules_to_save=[])
            for m, p in zip(self.methods(), parts, strict=True)
            if p is not None
        ]
        return MixedConfig(parts=listed, modules_to_save=self.heads())


def apply_options(
    plan: Plan,
    method: str,
    options: dict[str, Any],
    defaults: dict[str, Any],
    where: str = "the plan",
) -> None:
    """Give the plan's ``method`` entries the run's ``options`` for that method.

    Entries without options take them (a plan made by --select auto). Entries that carry
    options keep theirs; an option the run sets away from its default (``defaults``) to a value
    other than the plan's is refused: one of the two would be silently dropped."""
    for entry in plan.of(method):
        if not entry.options:
            entry.options = dict(options)
            continue
        for key, value in options.items():
            planned = entry.options.get(key, defaults.get(key))
            if value != defaults.get(key) and planned != value:
                title = METHODS[method].title or method
                raise LeantuneError(
                    f"{where}: the plan's {title} entries say {key} {planned}, the command "
                    f"line {value}; edit the plan, or drop the option"
                )


def _bad_option(entry: PlanEntry) -> str | None:
    """What is wrong with a plan entry's options, or None."""
    if not isinstance(entry.options, dict):
        return f"{entry.options!r} is not a mapping of option: value"
    if entry.method == HEAD:
        return f"a head takes no options, got {entry.options}" if entry.options else None
    return method_config(entry.method).plan_option_error(entry.options)


def entry_label(entry: PlanEntry) -> str:
    """An entry's method and size as a person reads it (``r=4``, ``bitfit 768``, ``head 1,925``)."""
    if entry.method == HEAD:
        return f"{HEAD} {entry.size:,}"
    return method_config(entry.method).size_label(entry.size)


def masks_path(plan_path: Path) -> Path:
    return plan_path.with_name(plan_path.stem + ".masks.safetensors")


def parse_methods(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'lora,bitfit' → ('lora', 'bitfit'); unknown names refused."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    bad = [n for n in names if n not in allocated()]
    if bad or not names:
        raise LeantuneError(f"plan methods {spec!r}: use a comma list of {', '.join(allocated())}")
    return tuple(dict.fromkeys(names))


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
    methods: Sequence[str] = ("lora",),
) -> Plan:
    """Spend ``budget`` parameters: the heads first, then units of ``methods`` by gain per
    parameter, one method per module."""
    if budget <= 0:
        raise LeantuneError(f"budget must be more than 0, got {budget}")
    methods = parse_methods(methods)
    head_cost = sum(n for _, n in heads)
    if head_cost > budget:
        raise LeantuneError(
            f"the budget ({budget:,}) is smaller than the task head ({head_cost:,} parameters); "
            "raise it"
        )
    plan = Plan(budget, base_params, [PlanEntry(m, HEAD, n, n) for m, n in heads])
    taken, count, gains = _buy_units(scores, methods, budget - head_cost, max_rank)
    order = [m.name for m in scores.modules] + [n.name for n in scores.norms]
    for name in order:  # model order, so the file reads top to bottom
        if name not in taken:
            continue
        method = taken[name]
        size = method_config(method).plan_size(scores, name, count[name])
        if size.tensor is not None:
            plan.masks[name] = size.tensor
        plan.entries.append(PlanEntry(name, method, size.size, size.params, gains[name]))
    return plan


def _buy_units(
    scores: Scores, methods: Sequence[str], left: int, max_rank: int
) -> tuple[dict[str, str], dict[str, int], dict[str, float]]:
    """Greedy by gain per parameter within ``left`` parameters, one method per module:
    per module its method, how many units it took and their summed gain. Units come from
    each method's ``plan_unit``."""
    heap: list[tuple[float, str, str]] = []  # (−gain per parameter, module, method)

    def unit(method: str, name: str, i: int) -> tuple[float, int] | None:
        return METHODS[method].plan_unit(scores, name, i, max_rank)

    def push(method: str, name: str, i: int) -> None:
        u = unit(method, name, i)
        if u is not None and u[0] > 0:
            heapq.heappush(heap, (-u[0] / u[1], name, method))

    for method in methods:
        for name in METHODS[method].plan_modules(scores):
            push(method, name, 0)
    taken: dict[str, str] = {}
    count: dict[str, int] = {}
    gains: dict[str, float] = {}
    while heap:
        _, name, method = heapq.heappop(heap)
        if taken.get(name, method) != method:
            continue  # the module already took another method
        i = count.get(name, 0)
        u = unit(method, name, i)
        assert u is not None
        if u[1] > left:
            continue  # too big for what is left; a smaller unit may still fit
        taken[name] = method
        count[name] = i + 1
        gains[name] = gains.get(name, 0.0) + u[0]
        left -= u[1]
        push(method, name, i + 1)
    return taken, count, gains


def uniform_plan(
    modules: Sequence[ModuleScore],
    budget: int,
    base_params: int,
    heads: Sequence[tuple[str, int]] = (),
    kinds: Sequence[str] | None = None,
) -> Plan:
    """The hand-placed recipe of the same size a plan is measured against: LoRA on every
    linear layer (or those of ``kinds``) of as many top layers as rank 1 pays for within
    ``budget`` less the heads, at one rank, a few top modules at one more where that brings
    the count closer; with ``kinds`` (e.g. query, value), every layer."""
    left = budget - sum(n for _, n in heads)
    stack = [m for m in modules if m.layer is not None and (kinds is None or m.kind in kinds)]
    if not stack or left <= 0:
        raise LeantuneError("no layer-stack linear modules (or no budget past the head)")
    layers = sorted({m.layer for m in stack if m.layer is not None}, reverse=True)
    if kinds is None:  # top layers whole, as many as rank 1 pays for (one at least)
        per_layer = {i: sum(m.rank_cost for m in stack if m.layer == i) for i in layers}
        chosen: list[int] = []
        for i in layers:
            if chosen and sum(per_layer[j] for j in [*chosen, i]) > left:
                break
            chosen.append(i)
        stack = [m for m in stack if m.layer in chosen]
        if per_layer[chosen[0]] > left:
            raise LeantuneError(
                f"the budget past the head ({left:,}) buys less than rank 1 on one layer's "
                f"linear modules ({per_layer[chosen[0]]:,} parameters)"
            )
    stack.sort(key=lambda m: -(m.layer or 0))  # top layers first, model order within
    rank = max(1, left // sum(m.rank_cost for m in stack))
    ranks = {m.name: rank for m in stack}
    spent = rank * sum(m.rank_cost for m in stack)
    for m in stack:  # one more rank while it brings the count closer to the budget
        if abs(spent + m.rank_cost - left) < abs(spent - left):
            ranks[m.name] += 1
            spent += m.rank_cost
    plan = Plan(budget, base_params, [PlanEntry(m, HEAD, n, n) for m, n in heads], "uniform")
    order = {m.name: i for i, m in enumerate(modules)}
    for m in sorted(stack, key=lambda m: order[m.name]):
        plan.entries.append(PlanEntry(m.name, "lora", ranks[m.name], ranks[m.name] * m.rank_cost))
    return plan
