"""What the planner (:mod:`leantune.analysis.plan`) and a method's planner hooks share: the
importance scores of a model's modules (made by :mod:`leantune.analysis.select`) and the plan
entry a method's units end up in. Data only: the protocol's hooks take and give these, so
they live beside the protocol, below the analysis that fills them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

SPARSE_CHUNK = 256
"""Entries per sparse-fine-tuning unit the Plan buys."""


@dataclass
class ModuleScore:
    name: str
    kind: str
    """The module's last name part (query, value, dense, ...): its type across layers."""
    layer: int | None
    shape: tuple[int, int]
    """(out, in) of the weight as a linear map."""
    fisher: float = 0.0
    taylor: float = 0.0
    grad_norm: float = 0.0
    spectrum: list[float] = field(default_factory=list)
    bias_size: int = 0
    bias_gain: float = 0.0
    """‖ḡ‖² of the layer's bias (0 without one)."""
    sparse_order: torch.Tensor | None = field(default=None, repr=False)
    """Flat (out, in) indices of the top entries by Fisher score, in chunks of SPARSE_CHUNK."""
    sparse_gains: list[float] = field(default_factory=list)
    """Σ ḡ² of each successive SPARSE_CHUNK entries of sparse_order (falling: chunks of the
    Fisher ranking, sorted by this gain)."""
    directions: torch.Tensor | None = field(default=None, repr=False)
    """(k, in): the top right singular vectors of the mean gradient, largest first; kept when
    scoring for ``--init grad`` (LoRA's A starts on them)."""

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def rank_cost(self) -> int:
        """Parameters one unit of LoRA rank costs here."""
        return self.shape[0] + self.shape[1]


@dataclass
class NormScore:
    name: str
    kind: str
    layer: int | None
    size: int
    """Trainable values LayerNorm tuning adds (scale and shift)."""
    gain: float
    """‖ḡ‖² of the norm's scale and shift."""


@dataclass
class Scores:
    modules: list[ModuleScore]
    examples: int
    seconds: float
    norms: list[NormScore] = field(default_factory=list)
    chunk: int = SPARSE_CHUNK
    """Entries per sparse unit (``ModuleScore.sparse_gains`` are per chunk of this many)."""

    @property
    def has_directions(self) -> bool:
        """Whether the scoring kept gradient directions (for --init grad)."""
        return any(m.directions is not None for m in self.modules)

    def module(self, name: str) -> ModuleScore:
        """The score of linear layer ``name`` (looked up by the planner per unit)."""
        return self._modules_by_name[name]

    def norm(self, name: str) -> NormScore:
        """The score of norm layer ``name``."""
        return self._norms_by_name[name]

    @cached_property
    def _modules_by_name(self) -> dict[str, ModuleScore]:
        return {m.name: m for m in self.modules}

    @cached_property
    def _norms_by_name(self) -> dict[str, NormScore]:
        return {n.name: n for n in self.norms}

    def by_layer_and_kind(self, metric: str = "fisher") -> dict[tuple[int | None, str], float]:
        out: dict[tuple[int | None, str], float] = {}
        for m in self.modules:
            key = (m.layer, m.kind)
            out[key] = out.get(key, 0.0) + float(getattr(m, metric))
        return out


@dataclass
class PlanEntry:
    module: str
    method: str
    """A registered method (lora: size = rank; bitfit, layernorm: size = parameters; sparse:
    size = entries, mask in the masks file) or head (trained in full; size = parameters)."""
    size: int
    params: int
    """Trainable parameters this entry costs."""
    gain: float = 0.0
    """Gradient energy the entry captures (lora: Σ σ² of its ranks)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The method's options for this module (lora: alpha_ratio = alpha / r, dropout, dora,
    rslora, init); empty means the method's defaults. Checked by ``plan_option_error``."""
