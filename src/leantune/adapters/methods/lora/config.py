"""LoRA and its family: rsLoRA scaling, DoRA (a variant hook), gaussian and PiSSA inits.

``LoraConfig`` says where LoRA goes and at what rank, and holds LoRA's hooks for the core: its
options in a run, its entries in files and plans, its planner units (a unit is one rank of one
module, priced by the squared singular values of the module's mean gradient). The adapters and
layers are in ``layers.py`` (convolutions ``conv.py``), peft's file format in ``peft.py``,
combining and hot-swapping in ``arith.py`` (registered with the method).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from leantune.adapters.base import LINEAR_TYPES
from leantune.adapters.config import AdapterConfig, PlanSize
from leantune.adapters.methods.lora.conv import CONV_TYPES, conv_layer_class
from leantune.adapters.methods.lora.layers import LoraLayer, layer_class_for
from leantune.core import checks
from leantune.core.errors import AdapterFileError, LeantuneError

if TYPE_CHECKING:
    from leantune.adapters.planning import PlanEntry, Scores

INITS = ("standard", "gaussian", "pissa", "grad")
PLAN_OPTIONS = ("alpha_ratio", "dropout", "dora", "rslora", "init")
"""Options a plan's LoRA entry may carry (the rank is its size; alpha = alpha_ratio · r)."""


def _positive_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _matches_pattern(key: str, module_name: str) -> bool:
    # peft's rule for rank_pattern / alpha_pattern keys.
    return re.match(rf"(.*\.)?({key})$", module_name) is not None


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA: a trainable low-rank update ``scaling * B @ A`` beside each frozen weight."""

    method: ClassVar[str] = "lora"
    title: ClassVar[str] = "LoRA"

    r: int = 8
    """Rank of the update."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the layer input before A."""
    rslora: bool = False
    """Rank-stabilized scaling alpha / sqrt(r)."""
    dora: bool = False
    """DoRA: learn a per-output magnitude and a LoRA direction (Linear and Conv1D layers)."""
    init: str = "standard"
    """standard (A Kaiming-uniform, B zero), gaussian (A normal with std 1/r, B zero), or
    pissa (A, B from the top-r singular vectors of W; the residual stays frozen in W), or
    grad (A on the top-r right singular vectors of the layer's task gradient, measured on
    --score-examples training examples as --select auto scores; B zero, so the model starts
    unchanged and the adapter is a plain LoRA in peft's format). leantune tune's default,
    auto: grad under --select auto, standard otherwise."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module ranks: a key matches a module whose name ends in it (peft's rule)."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alphas, matched like rank_pattern."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise LeantuneError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not _positive_number(self.alpha):
            raise LeantuneError(f"LoRA alpha must be positive and finite, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LeantuneError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise LeantuneError(f"LoRA init {self.init!r} is unknown; use one of {INITS}")
        if self.dora and self.init == "pissa":
            raise LeantuneError("DoRA with PiSSA init is not supported; pick one of the two")
        for key, r in self.rank_pattern.items():
            if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
                raise LeantuneError(f"rank_pattern[{key!r}] must be a positive integer, got {r!r}")
        for key, a in self.alpha_pattern.items():
            if not _positive_number(a):
                raise LeantuneError(f"alpha_pattern[{key!r}] must be positive, got {a!r}")
        for key in [*self.rank_pattern, *self.alpha_pattern]:
            try:
                re.compile(rf"(.*\.)?({key})$")
            except (re.error, TypeError) as e:
                raise LeantuneError(
                    f"rank/alpha pattern key {key!r} is not a valid regex ({e}); peft matches "
                    "these keys as regexes against module names"
                ) from None

    def rewrites_base_weight(self) -> bool:
        return self.init == "pissa"

    def rank_for(self, module_name: str) -> int:
        return next(
            (r for k, r in self.rank_pattern.items() if _matches_pattern(k, module_name)), self.r
        )

    def alpha_for(self, module_name: str) -> float:
        return next(
            (a for k, a in self.alpha_pattern.items() if _matches_pattern(k, module_name)),
            self.alpha,
        )

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return (*LINEAR_TYPES, nn.Embedding, *CONV_TYPES)  # "all-linear" takes no conv

    def adapt(self, module: nn.Module, adapter_name: str, module_name: str) -> nn.Module:
        cls = conv_layer_class(module, module_name, self) or layer_class_for(module)
        layer = cls.wrap(module, module_name)
        layer.add_adapter(
            adapter_name, self.rank_for(module_name), self.alpha_for(module_name), self
        )
        return layer

    # --- runs

    adapts_rank: ClassVar[bool] = True
    default_l2_weight: ClassVar[float] = 1e-3
    """Measured (docs/BENCHMARKS.md, gradual tuning): on a full pass over the data L2 1e-3 on
    the update keeps more of the original model at no cost in accuracy."""

    def default_l2(self) -> float:
        return 0.0 if self.penalty_refusal() else self.default_l2_weight

    def penalty_refusal(self) -> str | None:
        if self.dora or self.init == "pissa":
            return (
                "--l2/--l1/--ewc penalize the LoRA update s·B·A, which is not the change from "
                "the pretrained weights under PiSSA or DoRA; drop one of the two"
            )
        return None

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> LoraConfig:
        keys = ("r", "alpha", "dropout", "rslora", "dora", "init", "targets", "layers")
        return cls(**{k: options[k] for k in keys if options.get(k) is not None})

    @classmethod
    def run_refusal(cls, options: Mapping[str, Any]) -> str | None:
        plain = not options.get("dora") and options.get("init") != "pissa"
        if not plain and options.get("quantize"):
            kind = options["quantize"]
            return (
                f"--quantize {kind} freezes the base in {kind}: DoRA and PiSSA change the base "
                "weights' norm or values; use plain LoRA"
            )
        if not plain and any(options.get(k) for k in ("l2", "l1", "ewc")):
            return (
                "--l2/--l1/--ewc penalize the LoRA update s·B·A, which is not the change from the "
                "pretrained weights under PiSSA or DoRA; drop one of the two"
            )
        if not plain and (options.get("adapt") or 1) > 1:
            return "--adapt prunes plain LoRA ranks, not PiSSA or DoRA ones"
        return None

    # --- files (peft's LORA format is lora/peft.py, which builds on this module)

    def check_file(self, module_name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        check_factors(module_name, self, tensors)

    @classmethod
    def from_file_entries(
        cls, entries: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, torch.Tensor]
    ) -> AdapterConfig:
        return lora_from_leantune(entries)

    # --- the planner: one unit is one rank, gain σ²ᵢ of the module's mean gradient

    @classmethod
    def plan_unit(
        cls, scores: Scores, module: str, i: int, max_rank: int
    ) -> tuple[float, int] | None:
        m = scores.module(module)
        return (m.spectrum[i], m.rank_cost) if i < min(max_rank, len(m.spectrum)) else None

    @classmethod
    def plan_size(cls, scores: Scores, module: str, n: int) -> PlanSize:
        return PlanSize(n, n * scores.module(module).rank_cost)

    @classmethod
    def plan_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """The rank is the entry's size; alpha travels as alpha / r."""
        return {
            "alpha_ratio": options["alpha"] / options["r"],
            **{k: options[k] for k in ("dropout", "dora", "rslora", "init")},
        }

    @classmethod
    def plan_option_error(cls, options: Mapping[str, Any]) -> str | None:
        for key, value in options.items():
            if key not in PLAN_OPTIONS:
                return f"LoRA option {key!r} is unknown; use {sorted(PLAN_OPTIONS)}"
            if key in ("dora", "rslora") and not isinstance(value, bool):
                return f"{key} {value!r} must be true or false"
            if key == "init" and not isinstance(value, str):
                return f"init {value!r} must be a name ({', '.join(INITS)})"
            if key in ("dropout", "alpha_ratio") and (
                isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0
            ):
                return f"{key} {value!r} must be a number, 0 or more"
        return None

    @classmethod
    def from_plan(
        cls, entries: Sequence[PlanEntry], tensors: Mapping[str, torch.Tensor]
    ) -> LoraConfig:
        """Exactly the entries' modules at their ranks (alpha = alpha_ratio · r, default 2);
        the entries' options, the same for all (one adapter), override the defaults."""
        options = [dict(e.options) for e in entries]
        if any(o != options[0] for o in options):
            odd = next(e for e, o in zip(entries, options, strict=True) if o != options[0])
            raise LeantuneError(
                f"the plan's LoRA entries disagree on their options ({entries[0].module}: "
                f"{options[0]}, {odd.module}: {odd.options}); one adapter takes one set. Make "
                "them the same"
            )
        extra = options[0]
        ratio = float(extra.pop("alpha_ratio", 2.0))
        base = max(e.size for e in entries)
        return cls(
            **extra,
            r=base,
            alpha=ratio * base,
            targets="|".join(re.escape(e.module) for e in entries),
            rank_pattern={re.escape(e.module): e.size for e in entries if e.size != base},
            alpha_pattern={re.escape(e.module): ratio * e.size for e in entries if e.size != base},
            modules_to_save=[],
        )

    @classmethod
    def size_label(cls, size: int) -> str:
        return f"r={size}"


# ---------------------------------------------------------------------------- files


def lora_from_leantune(specs: Mapping[str, Mapping[str, Any]]) -> LoraConfig:
    """The LoraConfig of the LoRA rows (module -> row) of a ``LEANTUNE`` modules table."""
    settings: tuple[float, bool, bool] | None = None
    for m, spec in specs.items():
        if "r" not in spec or "alpha" not in spec:
            raise AdapterFileError(f"adapter config: LoRA module {m!r} lacks r or alpha")
        checks.rank(f"modules[{m!r}].r", spec["r"])
        checks.positive_number(f"modules[{m!r}].alpha", spec["alpha"])
        these = (
            checks.dropout(f"modules[{m!r}].dropout", spec.get("dropout")),
            checks.flag(f"modules[{m!r}].rslora", spec.get("rslora")),
            checks.flag(f"modules[{m!r}].dora", spec.get("dora")),
        )
        if settings is not None and these != settings:
            raise AdapterFileError(
                f"adapter config: LoRA module {m!r} differs from the others in dropout, "
                "rslora or dora; leantune writes one setting for all its LoRA modules"
            )
        settings = these
    assert settings is not None
    first = next(iter(specs.values()))
    dropout, rslora, dora = settings
    return LoraConfig(
        targets=list(specs),
        r=int(first["r"]),
        alpha=float(first["alpha"]),
        dropout=dropout,
        rslora=rslora,
        dora=dora,
        rank_pattern={re.escape(m): int(s["r"]) for m, s in specs.items()},
        alpha_pattern={re.escape(m): float(s["alpha"]) for m, s in specs.items()},
        modules_to_save=[],
    )


def check_factors(
    module_name: str, config: LoraConfig, tensors: Mapping[str, torch.Tensor]
) -> None:
    """The file holds ``module_name``'s LoRA factors at the rank ``config`` gives it; checked
    before any layer is built (a config saying r=10**12 must not allocate it)."""
    key = next(
        (
            k
            for k in (
                f"{module_name}.{LoraLayer.peft_keys['A']}",
                f"{module_name}.lora_embedding_A",
            )
            if k in tensors
        ),
        None,
    )
    if key is None:
        raise AdapterFileError(
            f"adapter file lacks the LoRA factors of {module_name}, which its config "
            "targets; the file and adapter_config.json do not belong together"
        )
    rank = config.rank_for(module_name)
    if tensors[key].ndim < 2 or tensors[key].shape[0] != rank:  # convs: (r, in, *kernel)
        raise AdapterFileError(
            f"adapter tensor {key!r} has shape {tuple(tensors[key].shape)} but "
            f"adapter_config.json gives {module_name} rank {rank}; the file and the config "
            "do not belong together"
        )
