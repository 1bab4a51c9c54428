"""IA3 (Liu et al., 2022, "(IA)³"): learned vectors that rescale activations.

Each adapted layer gets one trained vector l. On an attention layer (keys, values) it scales
the output, ``y = l ⊙ (W x + b)``; on a feed-forward layer (``feedforward``) it scales the input,
``y = W (l ⊙ x) + b``, as peft's ``is_feedforward`` does. Vectors start at 1, so the adapted
model starts as the base model. Merging scales W's rows (and b) by l, or W's columns for a
feed-forward layer; unmerging divides them again (peft adds 1e-8 to the divisor, leantune does
not, and refuses to merge a vector holding a zero, which could not be taken out again).

Adapts nn.Linear and GPT-2's Conv1D. Saved in peft's ``IA3`` format: ``<layer>.ia3_l`` of
shape (out, 1), or (1, in) on a feed-forward layer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn

from leantune.adapters.base import LINEAR_TYPES, AdapterLayer, Change, Conv1D
from leantune.adapters.config import AdapterConfig, AdapterRecord, PlanSize
from leantune.core import checks
from leantune.core.errors import AdapterFileError, LeantuneError

if TYPE_CHECKING:
    from leantune.adapters.planning import PlanEntry, Scores

PEFT_TYPE = "IA3"
KEY = "ia3_l"
"""The vector's name in peft's files (``<layer>.ia3_l``)."""

DEFAULT_TARGETS = r"(.*\.)?(key|value|k_proj|v_proj|c_attn|output\.dense|down_proj|mlp\.c_proj)"
"""peft's default targets of BERT/RoBERTa (key, value, output.dense), Llama/Mistral (k_proj,
v_proj, down_proj) and GPT-2 (c_attn, mlp.c_proj), as one regex."""
DEFAULT_FEEDFORWARD = r"(.*\.)?(output\.dense|down_proj|mlp\.c_proj)"
"""peft's default feed-forward modules of the same models (their input is scaled)."""


def is_feedforward(module_name: str, feedforward: str | list[str]) -> bool:
    """peft's rule: a string is a regex full-match, a list matches names ending in an item."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, module_name) is not None
    return any(module_name.endswith(f) for f in feedforward)


@dataclass
class IA3Config(AdapterConfig):
    """IA3: a trained vector scaling the output (keys, values) or input (feed-forward) of each
    targeted layer."""

    method: ClassVar[str] = "ia3"
    title: ClassVar[str] = "IA3"

    targets: str | list[str] = DEFAULT_TARGETS
    """Modules to adapt; the default is peft's: keys, values and feed-forward outputs of BERT,
    Llama and GPT-2 style models."""
    feedforward: str | list[str] = DEFAULT_FEEDFORWARD
    """Targets whose input is scaled instead of their output: a regex matching the whole name,
    or a list of name endings (peft's feedforward_modules)."""
    init_weights: bool = True
    """Vectors start at 1 (the base model); False draws them from N(0, 1), as peft does."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.feedforward, str):
            try:
                re.compile(self.feedforward)
            except re.error as e:
                raise LeantuneError(f"IA3 feedforward {self.feedforward!r} is no regex: {e}") from e
        elif not all(isinstance(f, str) for f in self.feedforward):
            raise LeantuneError(f"IA3 feedforward must list module names, got {self.feedforward}")

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return LINEAR_TYPES

    def adapt(self, module: nn.Module, adapter_name: str, module_name: str) -> nn.Module:
        layer = IA3Layer.wrap(module, module_name)
        layer.add_adapter(adapter_name, is_feedforward(module_name, self.feedforward), self)
        return layer

    # --- runs

    default_lr: ClassVar[float] = 1e-2
    """IA3 trains a few values per layer, each a relative scale: peft's examples and the paper
    (3e-3 with Adafactor on T0) use rates well above LoRA's; 1e-2 with AdamW."""

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> IA3Config:
        """--targets (tune's default all-linear means IA3's own default targets), --layers."""
        targets: str | list[str] = options.get("targets") or "all-linear"
        if targets == "all-linear":
            targets = DEFAULT_TARGETS
        return cls(targets=targets, layers=options.get("layers"))

    # --- the planner: one unit is one module's vector

    @classmethod
    def plan_unit(
        cls, scores: Scores, module: str, i: int, max_rank: int
    ) -> tuple[float, int] | None:
        """Gain of a module's output-scaling vector, ‖∂L/∂l‖² = Σ_i (Σ_j W_ij ḡ_ij)². Scores
        keep only Σ_ij |W_ij ḡ_ij| (``taylor``), so the gain is taken as taylor² / out: the value
        when each row's terms share a sign and the rows weigh alike (an upper estimate)."""
        m = scores.module(module)
        out = m.shape[0]
        return (m.taylor**2 / out, out) if i == 0 and m.taylor > 0 else None

    @classmethod
    def plan_size(cls, scores: Scores, module: str, n: int) -> PlanSize:
        out = scores.module(module).shape[0]
        return PlanSize(out, out)

    @classmethod
    def from_plan(
        cls, entries: Sequence[PlanEntry], tensors: Mapping[str, torch.Tensor]
    ) -> IA3Config:
        """Exactly the entries' modules, each scaling its output (the unit the planner priced)."""
        return cls(targets=[e.module for e in entries], feedforward=[], modules_to_save=[])

    @classmethod
    def size_label(cls, size: int) -> str:
        return f"ia3 {size:,}"


class IA3Vector(nn.Module):
    """One adapter's vector on one layer, in peft's shape: (out, 1), or (1, in) on a
    feed-forward layer."""

    def __init__(self, size: int, feedforward: bool, init_weights: bool):
        super().__init__()
        self.feedforward = feedforward
        shape = (1, size) if feedforward else (size, 1)
        self.scale = nn.Parameter(torch.ones(shape) if init_weights else torch.randn(shape))

    def extra_repr(self) -> str:
        return f"size={self.scale.numel()}, feedforward={self.feedforward}"


class IA3Layer(AdapterLayer):
    """A linear layer (nn.Linear or Conv1D) with named IA3 vectors."""

    method: ClassVar[str] = "ia3"
    store: ClassVar[str] = "ia3"
    ia3: nn.ModuleDict
    bias: nn.Parameter | None

    def vector(self, name: str) -> IA3Vector:
        return cast(IA3Vector, self.ia3[name])

    def weight_oi(self) -> torch.Tensor:
        """The weight as an (out, in) view (Conv1D stores it (in, out))."""
        conv = Conv1D is not None and issubclass(self._base_class, Conv1D)
        return self.weight.T if conv else self.weight

    def add_adapter(self, name: str, feedforward: bool, config: IA3Config) -> None:
        if name in self.ia3:
            raise LeantuneError(f"adapter {name!r} is already on this layer")
        out, inp = self.weight_oi().shape
        vec = IA3Vector(inp if feedforward else out, feedforward, config.init_weights)
        self.ia3[name] = vec.to(device=self.weight.device, dtype=self.weight.dtype)

    # --- forward: a feed-forward vector scales the input, so the base runs on the scaled input

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = None if self._disabled or self._batch_names is not None else self.active_name()
        if name is not None and self.vector(name).feedforward:
            return self.base_forward(x * self.vector(name).scale[0].to(x.dtype), *args, **kwargs)
        return super().forward(x, *args, **kwargs)

    def apply_adapter(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        vec = self.vector(name)
        if vec.feedforward:  # a mixed batch: these rows again, on the scaled input
            return self.base_forward(x * vec.scale[0].to(x.dtype))
        return out * vec.scale[:, 0].to(out.dtype)

    # --- merging: W's rows (and b) or columns times l; unmerging divides

    def _fold(self, name: str, scale: torch.Tensor) -> None:
        vec = self.vector(name)
        weight = self.weight_oi()
        if vec.feedforward:
            weight.mul_(scale[0].to(weight.dtype))
            return
        weight.mul_(scale.to(weight.dtype))
        if self.bias is not None:
            self.bias.mul_(scale[:, 0].to(self.bias.dtype))

    def merge_adapter(self, name: str) -> None:
        scale = self.vector(name).scale
        if bool((scale == 0).any()):
            raise LeantuneError(
                f"IA3 adapter {name!r} scales some features by exactly 0; merging could not be "
                "undone. Keep it unmerged, or unload(merge_active=True) if you never unmerge"
            )
        self._fold(name, scale)

    def unmerge_adapter(self, name: str) -> None:
        self._fold(name, 1 / self.vector(name).scale)

    # --- files and the change it makes

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {KEY: self.vector(name).scale.detach()}

    def file_targets(self, name: str) -> dict[str, torch.Tensor]:
        return {KEY: self.vector(name).scale}

    def change_entries(self, name: str) -> list[Change]:
        """ΔW = W·(l − 1) by rows (columns on a feed-forward layer); Δb = b·(l − 1)."""
        vec = self.vector(name)
        d = vec.scale - 1  # (out, 1) or (1, in): broadcasts over W's rows or columns
        delta = self.weight_oi().detach() * d
        changes = [Change("weight", delta if self.weight_oi() is self.weight else delta.T)]
        if not vec.feedforward and self.bias is not None:
            changes.append(Change("bias", self.bias.detach() * d[:, 0]))
        return changes

    def l2_change(self, name: str) -> torch.Tensor:
        """Σ (l_i − 1)² ‖W_i‖² (+ b_i² on output scaling), without the dense change."""
        vec = self.vector(name)
        w2 = self.weight_oi().detach().float().pow(2)
        d2 = (vec.scale - 1).float().pow(2)
        if vec.feedforward:
            return (d2[0] * w2.sum(0)).sum()
        total = (d2[:, 0] * w2.sum(1)).sum()
        if self.bias is not None:
            total = total + (d2[:, 0] * self.bias.detach().float().pow(2)).sum()
        return total


# ---------------------------------------------------------------------------- peft's format


class IA3Format:
    """peft's ``IA3`` adapter_config.json (``PeftFormat``): explicit module names in
    target_modules and feedforward_modules, so peft rebuilds exactly these layers."""

    peft_type = PEFT_TYPE

    def write(
        self, rec: AdapterRecord, name: str, layers: list[tuple[str, Any]], base: str | None
    ) -> dict[str, Any]:
        ff = sorted(n for n, layer in layers if layer.vector(name).feedforward)
        conv = any(Conv1D is not None and issubclass(lay._base_class, Conv1D) for _, lay in layers)
        return {
            "peft_type": PEFT_TYPE,
            "task_type": rec.task_type,
            "base_model_name_or_path": base,
            "target_modules": sorted(n for n, _ in layers),
            "feedforward_modules": ff,
            "modules_to_save": rec.modules_to_save or None,
            "init_ia3_weights": True,
            "fan_in_fan_out": conv,
            "exclude_modules": None,
            "inference_mode": True,
        }

    def read(self, raw: Mapping[str, Any]) -> IA3Config:
        targets = raw.get("target_modules")
        if not targets:
            raise AdapterFileError("IA3 adapter config has no target_modules")
        ff = raw.get("feedforward_modules")
        try:
            return IA3Config(
                targets=targets
                if isinstance(targets, str)
                else checks.names("target_modules", targets),
                feedforward=ff if isinstance(ff, str) else checks.names("feedforward_modules", ff),
                exclude=checks.names("exclude_modules", raw.get("exclude_modules")),
                modules_to_save=checks.names("modules_to_save", raw.get("modules_to_save")),
                task_type=checks.optional_str("task_type", raw.get("task_type")),
            )
        except LeantuneError as e:
            raise AdapterFileError(
                f"adapter config does not describe a usable IA3 adapter: {e}"
            ) from None

    def describe(self, raw: Mapping[str, Any]) -> list[tuple[str, str]]:
        def count(v: Any) -> str:
            return v if isinstance(v, str) else f"{len(v or [])} modules"

        return [
            ("method", PEFT_TYPE),
            ("targets", count(raw.get("target_modules"))),
            ("feed-forward", count(raw.get("feedforward_modules"))),
        ]


IA3_FORMAT = IA3Format()
