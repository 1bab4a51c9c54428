"""Sparse fine-tuning with a fixed mask (FISH masks, Sung et al., 2021): W + M ⊙ Δ.

Only k chosen entries of a weight train. The mask is chosen before training, by the empirical
Fisher score of each entry (``leantune select --plan-methods sparse``, ``tune --method
sparse``, or ``plan.allocate(..., methods=["sparse"]).masks`` in Python), in chunks of
``Scores.chunk`` entries (the planner's unit), and
stored as flat indices into the weight seen as an (out, in) matrix. The unmerged forward adds
x · scatter(Δ)ᵀ to the base output; merging adds the k values into W, so merged equals
unmerged up to float rounding. Files hold the indices (int64) and the values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from leantune.adapters.base import LINEAR_TYPES, Change, Conv1D
from leantune.adapters.config import AdapterConfig, PlanSize
from leantune.adapters.methods.delta import DeltaLayer
from leantune.core.errors import AdapterFileError, LeantuneError, TargetError

if TYPE_CHECKING:
    from leantune.adapters.planning import PlanEntry, Scores


@dataclass
class SparseConfig(AdapterConfig):
    """Sparse fine-tuning of the masked entries of each targeted linear weight."""

    method: ClassVar[str] = "sparse"
    title: ClassVar[str] = "sparse fine-tuning"

    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    """Per module name, the flat (out, in) indices of the entries that train."""
    lr_scale: float = 0.05
    """The values train at this fraction of the run's learning rate: a single weight entry
    moved at a LoRA-sized rate overshoots (0.05 × 2e-3 = 1e-4, full fine-tuning's range)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lr_scale > 0:
            raise LeantuneError(f"sparse lr_scale must be positive, got {self.lr_scale!r}")

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return LINEAR_TYPES

    def adapt(self, module: nn.Module, adapter_name: str, module_name: str) -> nn.Module:
        mask = self.masks.get(module_name)
        if mask is None:
            raise TargetError(
                f"sparse fine-tuning has no mask for {module_name}; choose masks with a Plan "
                "(leantune select --plan-methods sparse, or plan.allocate(..., methods=['sparse']))"
            )
        layer = SparseLayer.wrap(module, module_name)
        assert isinstance(layer, SparseLayer)
        layer.pending_mask = mask
        layer.add_adapter(adapter_name, mask.numel(), module_name)
        layer.lr_scales[adapter_name] = self.lr_scale
        return layer

    # --- runs: a mask comes from a plan, so --method sparse is a plan of sparse units

    placed_by_plan: ClassVar[bool] = True
    ranks_entries: ClassVar[bool] = True

    # --- files: the masks are the index tensors

    @classmethod
    def from_file_entries(
        cls, entries: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, torch.Tensor]
    ) -> AdapterConfig:
        names = list(entries)
        return cls(targets=names, modules_to_save=[], masks=masks_from_file(names, tensors))

    # --- the planner: a unit is a chunk of the top-Fisher entries, gain Σ ḡ² over it

    plan_keeps_tensor: ClassVar[bool] = True

    @classmethod
    def plan_unit(
        cls, scores: Scores, module: str, i: int, max_rank: int
    ) -> tuple[float, int] | None:
        gains = scores.module(module).sparse_gains
        return (gains[i], scores.chunk) if i < len(gains) else None

    @classmethod
    def plan_size(cls, scores: Scores, module: str, n: int) -> PlanSize:
        order = scores.module(module).sparse_order
        assert order is not None
        mask = order[: n * scores.chunk].clone()
        return PlanSize(mask.numel(), mask.numel(), mask)

    @classmethod
    def from_plan(
        cls, entries: Sequence[PlanEntry], tensors: Mapping[str, torch.Tensor]
    ) -> AdapterConfig:
        names = [e.module for e in entries]
        return cls(targets=names, modules_to_save=[], masks={n: tensors[n] for n in names})


class MaskDelta(nn.Module):
    indices: torch.Tensor

    def __init__(self, indices: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("indices", indices)
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=dtype))


class SparseLayer(DeltaLayer):
    method: ClassVar[str] = "sparse"
    layer_state: ClassVar[tuple[str, ...]] = ("pending_mask", "lr_scales")
    pending_mask: torch.Tensor | None = None
    lr_scales: dict[str, float]
    """Each adapter's rate multiplier (SparseConfig.lr_scale)."""

    def init_state(self) -> None:
        self.lr_scales = {}

    def lr_multipliers(self, name: str, options: Mapping[str, Any]) -> dict[str, float]:
        return {f"{self.store}.{name}.values": self.lr_scales.get(name, 1.0)}

    def change_entries(self, name: str) -> list[Change]:
        """The values, at their flat indices into ``weight`` as stored (Conv1D's is (in, out))."""
        d = cast(MaskDelta, self.delta[name])
        out, inp = self.shape_oi()
        at = d.indices
        if self.weight_oi() is not self.weight:
            at = (at % inp) * out + at // inp
        return [Change("weight", d.values, at)]

    def drop_adapter(self, name: str) -> None:
        self.lr_scales.pop(name, None)
        super().drop_adapter(name)

    def shape_oi(self) -> tuple[int, int]:
        out, inp = self.weight.shape
        return (inp, out) if Conv1D is not None and isinstance(self, Conv1D) else (out, inp)

    def weight_oi(self) -> torch.Tensor:
        return self.weight.T if Conv1D is not None and isinstance(self, Conv1D) else self.weight

    def new_delta(self, size: int, module_name: str) -> nn.Module:
        mask = self.pending_mask
        self.pending_mask = None
        assert mask is not None
        out, inp = self.shape_oi()
        mask = mask.to(torch.int64).flatten()
        if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) >= out * inp):
            raise TargetError(
                f"sparse mask of {module_name} indexes outside its {out}x{inp} weight"
            )
        if mask.unique().numel() != mask.numel():
            raise TargetError(f"sparse mask of {module_name} repeats an index")
        return MaskDelta(mask.clone(), self.weight.dtype)

    def dense(self, delta: nn.Module) -> torch.Tensor:
        """M ⊙ Δ as an (out, in) matrix."""
        d = cast(MaskDelta, delta)
        out, inp = self.shape_oi()
        return d.values.new_zeros(out * inp).index_add(0, d.indices, d.values).view(out, inp)

    def contribution(self, delta: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + F.linear(x, self.dense(delta).to(x.dtype))

    def fold(self, delta: nn.Module, sign: float) -> None:
        d = cast(MaskDelta, delta)
        _, inp = self.shape_oi()
        rows, cols = d.indices // inp, d.indices % inp
        values = d.values.to(self.weight.dtype) * sign
        self.weight_oi().index_put_((rows, cols), values, accumulate=True)


INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def masks_from_file(
    names: list[str], tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The index masks of the sparse modules ``names`` from an adapter file's tensors (keys
    without the ``base_model.model.`` prefix), each checked to be a 1-D integer tensor."""
    masks = {}
    for m in names:
        mask = tensors.get(f"{m}.leantune_sparse.indices")
        if mask is None:
            raise AdapterFileError(f"adapter file lacks the sparse mask of {m}")
        if mask.dtype not in INTEGER_DTYPES or mask.ndim != 1:
            raise AdapterFileError(
                f"adapter tensor {m}.leantune_sparse.indices must be a 1-D integer "
                f"tensor, not {mask.dtype} of shape {tuple(mask.shape)}"
            )
        masks[m] = mask
    return masks
