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
of the top-Fisher entries of a weight (sparse, Σ ḡ² per chunk). A module takes one method: the
first unit bought on it decides. Sparse masks are kept beside plan.json in
``<plan>.masks.safetensors`` (flat (out, in) indices per module).
"""

from __future__ import annotations

import heapq
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from leantune.errors import LeantuneError
from leantune.select import SPARSE_CHUNK, Scores

PLAN_METHODS = ("lora", "bitfit", "layernorm", "sparse", "head")
ALLOCATED = ("lora", "bitfit", "layernorm", "sparse")
"""Methods a Plan can spend its budget on (the head is always paid first)."""


@dataclass
class PlanEntry:
    module: str
    method: str
    """lora (size = rank), bitfit or layernorm (size = parameters), sparse (size = entries, mask
    in the masks file) or head (trained in full; size = parameters)."""
    size: int
    params: int
    """Trainable parameters this entry costs."""
    gain: float = 0.0
    """Gradient energy the entry captures (lora: Σ σ² of its ranks)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The method's options for this module (lora: alpha_ratio = alpha / r, dropout, dora,
    rslora, init); empty means the method's defaults."""


@dataclass
class Plan:
    budget: int
    base_params: int
    entries: list[PlanEntry] = field(default_factory=list)
    score: str = "spectrum"
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    """Sparse entries' masks (not in the JSON: in the masks file beside it)."""

    @property
    def params(self) -> int:
        return sum(e.params for e in self.entries)

    def lora(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.method == "lora"]

    def of(self, method: str) -> list[PlanEntry]:
        return [e for e in self.entries if e.method == method]

    def heads(self) -> list[str]:
        return [e.module for e in self.entries if e.method == "head"]

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("masks")
        return json.dumps(data, indent=1) + "\n"

    def save(self, path: str | os.PathLike[str]) -> Path:
        """plan.json, and its masks file when the plan has sparse entries (each atomically)."""
        path = Path(path)
        if self.of("sparse"):
            masks = masks_path(path)
            tmp_masks = masks.with_name(f".{masks.name}.tmp")
            tensors = {e.module: self.masks[e.module].contiguous() for e in self.of("sparse")}
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
            if entry.method not in PLAN_METHODS:
                raise LeantuneError(
                    f"plan {path}: method {entry.method!r} is not one of {PLAN_METHODS}"
                )
            if not isinstance(entry.size, int) or entry.size <= 0:
                raise LeantuneError(
                    f"plan {path}: {entry.module} has size {entry.size!r}; use a positive int"
                )
            bad = _bad_option(entry.options)
            if bad:
                raise LeantuneError(f"plan {path}: {entry.module} options: {bad}")
        sparse = plan.of("sparse")
        if sparse:
            masks = masks_path(Path(path))
            try:
                plan.masks = load_file(str(masks))
            except (OSError, SafetensorError) as e:
                raise LeantuneError(
                    f"plan {path} has sparse entries but its masks file {masks} cannot be read "
                    f"({e}); rerun leantune select"
                ) from None
            for entry in sparse:
                mask = plan.masks.get(entry.module)
                if mask is None or mask.numel() != entry.size:
                    raise LeantuneError(
                        f"plan {path}: the sparse mask of {entry.module} does not have "
                        f"{entry.size} entries; a sparse size cannot be edited by hand, rerun "
                        "leantune select"
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

    def lora_config(self, alpha_ratio: float = 2.0) -> Any:
        """A LoraConfig adapting exactly the plan's modules at its ranks (alpha = ratio · r);
        the entries' options (the same for every LoRA entry: one adapter) override the
        defaults."""
        from leantune.methods.lora import LoraConfig

        lora = self.lora()
        if not lora:
            return None
        options = [dict(e.options) for e in lora]
        if any(o != options[0] for o in options):
            odd = next(e for e, o in zip(lora, options, strict=True) if o != options[0])
            raise LeantuneError(
                f"the plan's LoRA entries disagree on their options ({lora[0].module}: "
                f"{options[0]}, {odd.module}: {odd.options}); one adapter takes one set. Make "
                "them the same"
            )
        extra = options[0]
        unknown = sorted(set(extra) - LORA_OPTIONS)
        if unknown:
            raise LeantuneError(
                f"plan LoRA option {unknown[0]!r} is unknown; use {sorted(LORA_OPTIONS)}"
            )
        alpha_ratio = float(extra.pop("alpha_ratio", alpha_ratio))
        base = max(e.size for e in lora)
        return LoraConfig(
            **extra,
            r=base,
            alpha=alpha_ratio * base,
            targets="|".join(re.escape(e.module) for e in lora),
            rank_pattern={re.escape(e.module): e.size for e in lora if e.size != base},
            alpha_pattern={
                re.escape(e.module): alpha_ratio * e.size for e in lora if e.size != base
            },
            modules_to_save=self.heads(),
        )

    def adapter_config(self, alpha_ratio: float = 2.0) -> Any:
        """The adapter config for this plan: a plain LoraConfig (peft loads it) when the plan is
        LoRA only, else a MixedConfig of one part per method; None when only heads train."""
        from leantune.methods.bitfit import BitFitConfig
        from leantune.methods.layernorm import LayerNormConfig
        from leantune.methods.mixed import MixedConfig
        from leantune.methods.sparse import SparseConfig

        if not any(self.of(m) for m in ("bitfit", "layernorm", "sparse")):
            return self.lora_config(alpha_ratio)
        parts: list[Any] = []
        lora = self.lora_config(alpha_ratio)
        if lora is not None:
            parts.append(replace(lora, targets=[e.module for e in self.lora()], modules_to_save=[]))
        if self.of("bitfit"):
            parts.append(BitFitConfig(targets=[e.module for e in self.of("bitfit")]))
        if self.of("layernorm"):
            parts.append(LayerNormConfig(targets=[e.module for e in self.of("layernorm")]))
        if self.of("sparse"):
            names = [e.module for e in self.of("sparse")]
            parts.append(SparseConfig(targets=names, masks={n: self.masks[n] for n in names}))
        return MixedConfig(parts=parts, modules_to_save=self.heads())


LORA_OPTIONS = {"alpha_ratio", "dropout", "dora", "rslora", "init"}
"""LoRA options a plan entry may carry (the rank is its size)."""


def apply_lora_options(
    plan: Plan, options: dict[str, Any], defaults: dict[str, Any], where: str = "the plan"
) -> None:
    """Give the plan's LoRA entries the run's LoRA ``options`` (keys of ``LORA_OPTIONS``).

    Entries without options take them (a plan made by --select auto). Entries that carry
    options keep theirs; an option the run sets away from its default (``defaults``) to a value
    other than the plan's is refused: one of the two would be silently dropped."""
    for entry in plan.lora():
        if not entry.options:
            entry.options = dict(options)
            continue
        for key, value in options.items():
            planned = entry.options.get(key, defaults.get(key))
            if value != defaults.get(key) and planned != value:
                raise LeantuneError(
                    f"{where}: the plan's LoRA entries say {key} {planned}, the command line "
                    f"{value}; edit the plan, or drop the option"
                )


def _bad_option(options: Any) -> str | None:
    """What is wrong with a plan entry's options, or None."""
    if not isinstance(options, dict):
        return f"{options!r} is not a mapping of option: value"
    for key, value in options.items():
        if key in ("dora", "rslora") and not isinstance(value, bool):
            return f"{key} {value!r} must be true or false"
        if key == "init" and not isinstance(value, str):
            return f"init {value!r} must be a name (standard, gaussian, pissa)"
        if key in ("dropout", "alpha_ratio") and (
            isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0
        ):
            return f"{key} {value!r} must be a number, 0 or more"
    return None


def masks_path(plan_path: Path) -> Path:
    return plan_path.with_name(plan_path.stem + ".masks.safetensors")


def parse_methods(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'lora,bitfit' → ('lora', 'bitfit'); unknown names refused."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    bad = [n for n in names if n not in ALLOCATED]
    if bad or not names:
        raise LeantuneError(f"plan methods {spec!r}: use a comma list of {', '.join(ALLOCATED)}")
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
    plan = Plan(budget, base_params, [PlanEntry(m, "head", n, n) for m, n in heads])
    units = _Units(scores, max_rank)
    taken, count, gains = _buy_units(units, methods, budget - head_cost)
    order = [m.name for m in scores.modules] + [n.name for n in scores.norms]
    for name in order:  # model order, so the file reads top to bottom
        if name not in taken:
            continue
        method, n = taken[name], count[name]
        if method == "lora":
            size, params = n, n * units.by_name[name].rank_cost
        elif method == "sparse":
            order_idx = units.by_name[name].sparse_order
            assert order_idx is not None
            plan.masks[name] = order_idx[: n * SPARSE_CHUNK].clone()
            size = params = plan.masks[name].numel()
        elif method == "bitfit":
            size = params = units.by_name[name].bias_size
        else:
            size = params = units.norms[name].size
        plan.entries.append(PlanEntry(name, method, size, params, gains[name]))
    return plan


class _Units:
    """The units the planner can buy, read from the scores."""

    def __init__(self, scores: Scores, max_rank: int) -> None:
        self.by_name = {m.name: m for m in scores.modules}
        self.norms = {n.name: n for n in scores.norms}
        self.max_rank = max_rank

    def __call__(self, method: str, name: str, i: int) -> tuple[float, int] | None:
        """Unit (gain, cost) of ``method`` number ``i`` on ``name``, or None when there is none."""
        if method == "lora":
            m = self.by_name[name]
            ok = i < min(self.max_rank, len(m.spectrum))
            return (m.spectrum[i], m.rank_cost) if ok else None
        if method == "sparse":
            m = self.by_name[name]
            return (m.sparse_gains[i], SPARSE_CHUNK) if i < len(m.sparse_gains) else None
        if i > 0:
            return None  # bitfit and layernorm are one unit each
        if method == "bitfit":
            m = self.by_name[name]
            return (m.bias_gain, m.bias_size) if m.bias_size else None
        return self.norms[name].gain, self.norms[name].size


def _buy_units(
    unit: _Units, methods: Sequence[str], left: int
) -> tuple[dict[str, str], dict[str, int], dict[str, float]]:
    """Greedy by gain per parameter within ``left`` parameters, one method per module:
    per module its method, how many units it took and their summed gain."""
    heap: list[tuple[float, str, str]] = []  # (−gain per parameter, module, method)

    def push(method: str, name: str, i: int) -> None:
        u = unit(method, name, i)
        if u is not None and u[0] > 0:
            heapq.heappush(heap, (-u[0] / u[1], name, method))

    for method in methods:
        for name in unit.norms if method == "layernorm" else unit.by_name:
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
