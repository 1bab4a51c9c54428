"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021): a small trained MLP after
a layer's output.

An adapted layer computes ``h + up(act(down(h)))`` where ``h`` is its base output (width d),
``down`` a linear map d → b and ``up`` b → d, b = d // reduction_factor. ``up`` starts at zero
(weight and bias), so a new adapter leaves the model exactly as it was; ``down`` starts like
LoRA's A (Kaiming-uniform, a=√5) with a zero bias. Houlsby places one after the attention output
projection and one after the feed-forward output projection of each block; Pfeiffer only the
feed-forward one. Cost per adapted layer: 2·d·b + b + d parameters, two small matmuls a token.

The adapter is nonlinear, so it cannot be folded into any weight: ``merge`` refuses it. peft
has no such type, so files are ``LEANTUNE`` (docs/FORMAT.md: ``leantune_bottleneck.*``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from leantune.adapters.base import LINEAR_TYPES, AdapterLayer, Change
from leantune.adapters.config import AdapterConfig, name_matches
from leantune.core import checks
from leantune.core.errors import AdapterFileError, LeantuneError, TargetError

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "swish": F.silu,
}
VARIANTS = ("houlsby", "pfeiffer")
DEFAULT = "default"
# The output projections of attention and of the feed-forward block, per architecture family.
_ATTENTION_OUT = r"attention\.output\.dense|self_attn\.o_proj|attn\.c_proj"  # BERT, Llama, GPT-2
_FFN_OUT = r"layer\.\d+\.output\.dense|mlp\.down_proj|mlp\.c_proj"
DEFAULT_TARGETS = {
    "houlsby": rf".*\.({_ATTENTION_OUT}|{_FFN_OUT})",
    "pfeiffer": rf".*\.({_FFN_OUT})",
}
"""The regex ``targets="default"`` becomes, per variant (BERT/RoBERTa, Llama-style, GPT-2)."""

MERGE_REFUSAL = (
    "bottleneck adapters cannot be merged: each is a small nonlinear module after its layer, "
    "not a change of the layer's weights. Keep the adapter unmerged (load_adapter on the base "
    "model), or unload it without merging"
)
PENALTY_REFUSAL = (
    "--l2/--l1/--ewc penalize the change of the pretrained weights, and a bottleneck adapter "
    "changes none (it adds a module after each layer); drop those options"
)


@dataclass
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapters: a trained down-project, nonlinearity, up-project after each
    targeted layer's output, added to it."""

    method: ClassVar[str] = "bottleneck"
    title: ClassVar[str] = "Bottleneck adapter"

    targets: str | list[str] = DEFAULT
    """Layers followed by an adapter; "default" places them by ``variant`` (BERT:
    attention.output.dense and output.dense; Llama: o_proj and down_proj; GPT-2: attn.c_proj
    and mlp.c_proj). Other models name their layers explicitly."""
    variant: str = "houlsby"
    """houlsby (after the attention and the feed-forward output projections) or pfeiffer (after
    the feed-forward output only); it decides where "default" targets go."""
    reduction_factor: int = 16
    """Bottleneck width = a layer's output width // reduction_factor."""
    non_linearity: str = "relu"
    """Activation between down and up projection: relu, gelu or swish."""
    widths: dict[str, int] = field(default_factory=dict)
    """Bottleneck width per module (exact name or dotted suffix), overriding reduction_factor
    (what a loaded file gives)."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise LeantuneError(f"bottleneck variant {self.variant!r} is unknown; use {VARIANTS}")
        rf = self.reduction_factor
        if not isinstance(rf, int) or isinstance(rf, bool) or rf <= 0:
            raise LeantuneError(f"reduction_factor must be a positive integer, got {rf!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise LeantuneError(
                f"non_linearity {self.non_linearity!r} is unknown; use one of {list(ACTIVATIONS)}"
            )
        for key, w in self.widths.items():
            if not isinstance(w, int) or isinstance(w, bool) or w <= 0:
                raise LeantuneError(f"widths[{key!r}] must be a positive integer, got {w!r}")
        if self.targets == DEFAULT:
            self.targets = DEFAULT_TARGETS[self.variant]
        super().__post_init__()

    def width_for(self, module_name: str, out_features: int) -> int:
        """The bottleneck width of the adapter after ``module_name``."""
        return next(
            (w for k, w in self.widths.items() if name_matches(module_name, [k])),
            out_features // self.reduction_factor,
        )

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return LINEAR_TYPES

    def adapt(self, module: nn.Module, adapter_name: str, module_name: str) -> nn.Module:
        weight = cast(torch.Tensor, module.weight)
        # nn.Linear stores its weight (out, in), GPT-2's Conv1D (in, out).
        out = weight.shape[0] if isinstance(module, nn.Linear) else weight.shape[1]
        width = self.width_for(module_name, out)
        if width < 1:
            raise TargetError(
                f"{module_name} has {out} outputs: reduction_factor {self.reduction_factor} "
                "leaves no bottleneck; lower it or leave the layer out"
            )
        layer = BottleneckLayer.wrap(module, module_name)
        layer.add_adapter(adapter_name, out, width, self.non_linearity)
        return layer

    # --- runs

    default_lr: ClassVar[float] = 1e-3
    """Adapters are trained from scratch (up starts at zero): Houlsby et al. searched
    3e-5..3e-3; 1e-3 is the middle of the range that works for small models."""

    def merge_refusal(self) -> str | None:
        return MERGE_REFUSAL

    def penalty_refusal(self) -> str | None:
        return PENALTY_REFUSAL

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> BottleneckConfig:
        """``tune --method bottleneck``: --targets all-linear (the run's default) means the
        default placement; reduction_factor, non_linearity and variant when a run has them."""
        values = {
            k: options[k]
            for k in ("targets", "layers", "variant", "reduction_factor", "non_linearity")
            if options.get(k) is not None
        }
        if values.get("targets") == "all-linear":
            values["targets"] = DEFAULT
        return cls(**values)

    @classmethod
    def run_refusal(cls, options: Mapping[str, Any]) -> str | None:
        return PENALTY_REFUSAL if any(options.get(k) for k in ("l2", "l1", "ewc")) else None

    # --- files

    def check_file(self, module_name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        key = f"{module_name}.{BottleneckLayer.file_prefix}down.weight"
        down = tensors.get(key)
        if down is None:
            raise AdapterFileError(
                f"adapter file lacks {key!r}, the bottleneck adapter its config puts after "
                f"{module_name}; the file and adapter_config.json do not belong together"
            )
        width = self.widths.get(module_name)
        if down.ndim != 2 or (width is not None and down.shape[0] != width):
            raise AdapterFileError(
                f"adapter tensor {key!r} has shape {tuple(down.shape)} but adapter_config.json "
                f"gives {module_name} width {width}; the file and the config do not belong together"
            )

    @classmethod
    def from_file_entries(
        cls, entries: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, torch.Tensor]
    ) -> BottleneckConfig:
        widths = {
            m: checks.rank(f"modules[{m!r}].width", e.get("width")) for m, e in entries.items()
        }
        acts = {e.get("non_linearity") for e in entries.values()}
        if len(acts) != 1 or next(iter(acts)) not in ACTIVATIONS:
            raise AdapterFileError(
                f"adapter config: bottleneck modules give non_linearity {sorted(map(str, acts))}; "
                f"leantune writes one of {list(ACTIVATIONS)} for all of them"
            )
        act = str(next(iter(acts)))
        return cls(targets=list(entries), widths=widths, non_linearity=act, modules_to_save=[])


class BottleneckAdapter(nn.Module):
    """One adapter: ``up(act(down(h)))``, down (width, d) Kaiming-uniform, up (d, width) zero."""

    def __init__(self, features: int, width: int, non_linearity: str):
        super().__init__()
        self.non_linearity = non_linearity
        self.down = nn.Linear(features, width)
        self.up = nn.Linear(width, features)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(ACTIVATIONS[self.non_linearity](self.down(h)))

    def extra_repr(self) -> str:
        return f"non_linearity={self.non_linearity}"


class BottleneckLayer(AdapterLayer):
    """A linear layer (nn.Linear, GPT-2 Conv1D) followed by named bottleneck adapters."""

    method: ClassVar[str] = "bottleneck"
    store: ClassVar[str] = "bottleneck"
    file_prefix: ClassVar[str] = "leantune_bottleneck."
    bottleneck: nn.ModuleDict

    def adapter(self, name: str) -> BottleneckAdapter:
        return cast(BottleneckAdapter, self.bottleneck[name])

    def add_adapter(self, name: str, features: int, width: int, non_linearity: str) -> None:
        if name in self.bottleneck:
            raise LeantuneError(f"adapter {name!r} is already on this layer")
        adapter = BottleneckAdapter(features, width, non_linearity)
        self.bottleneck[name] = adapter.to(device=self.weight.device, dtype=self.weight.dtype)

    # --- AdapterLayer hooks

    def apply_adapter(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + self.adapter(name)(out).to(out.dtype)  # autocast: keep out's dtype

    def merge_adapter(self, name: str) -> None:
        raise LeantuneError(MERGE_REFUSAL)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """``leantune_bottleneck.{down,up}.{weight,bias}`` (docs/FORMAT.md)."""
        return {k: t.detach() for k, t in self.file_targets(name).items()}

    def file_targets(self, name: str) -> dict[str, torch.Tensor]:
        return {self.file_prefix + k: p for k, p in self.adapter(name).named_parameters()}

    def file_entry(self, name: str) -> dict[str, Any]:
        adapter = self.adapter(name)
        return {
            **super().file_entry(name),
            "width": adapter.down.out_features,
            "non_linearity": adapter.non_linearity,
        }

    def change_entries(self, name: str) -> list[Change]:
        """None: the adapter changes no base parameter."""
        return []

    def l2_change(self, name: str) -> torch.Tensor:
        """Σ‖θ‖² of the adapter's own parameters (there is no change of a base weight)."""
        return torch.stack([p.pow(2).sum() for p in self.adapter(name).parameters()]).sum()
