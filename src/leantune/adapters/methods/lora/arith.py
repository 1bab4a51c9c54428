"""LoRA's adapter arithmetic: the hooks ``leantune.adapters.combine`` and ``leantune.adapters.hotswap`` call.

Combining follows peft's ``add_weighted_adapter`` (``tuners/lora/model.py``) term for term:

- ``cat``: A = [w₁s₁A₁; w₂s₂A₂ ...], B = [B₁, B₂ ...]; the rank is the sum of the ranks.
- ``linear``, ``ties``, ``dare_*``, ``magnitude_prune``: A and B are merged factor by factor
  with weights ±√|wᵢsᵢ| on A and √|wᵢsᵢ| on B, so the ranks must be equal. Only ``linear`` of
  two factors equals the weighted sum of the updates when the factors share a basis; the others
  are peft's approximations.
- ``svd`` and ``*_svd``: the updates sᵢBᵢAᵢ (in the base weight's orientation, as peft's
  ``get_delta_weight`` gives them) are merged, then cut to the top singular vectors:
  B = U·diag(S), A = Vh, at the target rank (default: the largest rank of the sources).

The combined adapter has scaling 1 (alpha = r), as peft's has without rsLoRA. Hotswap pads a
loaded adapter's factors with zero ranks up to a maximum, then copies another adapter's factors
into them in place; the scaling of the new adapter is folded into B (B · s_new / s_old), so the
layer's own scaling, a Python number a compiled graph holds as a constant, never changes.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from leantune.adapters.base import AdapterModule
from leantune.adapters.config import AdapterConfig
from leantune.adapters.methods.lora.config import LoraConfig
from leantune.adapters.methods.lora.layers import DORA, LoraAdapter, LoraLayer, lora_scaling
from leantune.core.errors import LeantuneError

if TYPE_CHECKING:
    from leantune.adapters.combine import Combination

Sources = list[tuple[str, float]]
"""The source adapters on one layer, with their weights, in the order given."""


def _plain(layer: AdapterModule, module: str, name: str, what: str) -> LoraAdapter:
    """Adapter ``name`` of a LoRA layer, refused when it is DoRA or PiSSA (its factors are not
    its whole change of the weight)."""
    if not isinstance(layer, LoraLayer):
        raise LeantuneError(f"{module} holds no LoRA layer; {what} works on LoRA adapters")
    adapter = layer.adapter(name)
    if adapter.variant is DORA or adapter.init == "pissa":
        kind = "DoRA" if adapter.variant is DORA else "PiSSA"
        raise LeantuneError(
            f"adapter {name!r} is {kind}; {what} works on plain LoRA adapters (save and reload "
            "a PiSSA adapter to get its plain LoRA form)"
        )
    return adapter


class LoraArithmetic:
    """LoRA's ``Combiner`` (``leantune.adapters.combine``) and ``Swapper`` (``leantune.adapters.hotswap``)."""

    # ------------------------------------------------------------------------ combine

    def combine(
        self,
        layers: Sequence[tuple[str, AdapterModule, Sources]],
        how: Combination,
        configs: Sequence[AdapterConfig],
        to_save: list[str],
        task_type: str | None,
    ) -> tuple[AdapterConfig, dict[str, dict[str, torch.Tensor]]]:
        """The combined adapter's config and its tensors by module and file key."""
        adapters = {
            (m, n): _plain(layer, m, n, "combine")
            for m, layer, sources in layers
            for n, _ in sources
        }
        if not how.svd and how.method != "cat":
            for m, _, sources in layers:
                ranks = {n: adapters[m, n].r for n, _ in sources}
                if len(set(ranks.values())) > 1:
                    shown = ", ".join(f"{n} r={r}" for n, r in ranks.items())
                    raise LeantuneError(
                        f"{how.method} merges A and B factor by factor, which needs equal ranks, "
                        f"but {m} has {shown}; use cat or svd"
                    )
        top = max(a.r for a in adapters.values())
        out: dict[str, dict[str, torch.Tensor]] = {}
        for m, layer, sources in layers:
            assert isinstance(layer, LoraLayer)
            own = [(adapters[m, n], w) for n, w in sources]
            if how.method == "cat":
                A, B = _cat(own)
            elif how.svd:
                A, B = _svd(layer, sources, how, how.svd_rank or top)
            else:
                A, B = _factorwise(own, how)
            out[m] = {layer.peft_keys["A"]: A, layer.peft_keys["B"]: B}
        ranks = {m: t[next(iter(t))].shape[0] for m, t in out.items()}
        first = configs[0]
        assert isinstance(first, LoraConfig)
        return _config(ranks, first.dropout, to_save, task_type), out

    # ------------------------------------------------------------------------ hotswap

    def pad(self, layer: AdapterModule, module: str, name: str, max_rank: int) -> None:
        """Pad adapter ``name``'s factors with zero ranks up to ``max_rank``; same update."""
        a = _plain(layer, module, name, "hotswap")
        if a.r > max_rank:
            raise LeantuneError(
                f"{module}: adapter {name!r} has rank {a.r}, above max_rank {max_rank}; "
                f"prepare for rank {a.r} or more"
            )
        A, B = a.A.detach(), a.B.detach()
        extra = max_rank - a.r
        a.A = nn.Parameter(torch.cat([A, A.new_zeros(extra, A.shape[1])]), a.A.requires_grad)
        a.B = nn.Parameter(torch.cat([B, B.new_zeros(B.shape[0], extra)], 1), a.B.requires_grad)
        a.set_rank(max_rank)

    def swap_refusal(
        self,
        layer: AdapterModule,
        module: str,
        name: str,
        config: AdapterConfig,
        tensors: Mapping[str, torch.Tensor],
    ) -> str | None:
        """Why the file's ``tensors`` (by file key) of ``module`` cannot replace adapter
        ``name``'s factors in place, or None."""
        a = _plain(layer, module, name, "hotswap")
        assert isinstance(layer, LoraLayer) and isinstance(config, LoraConfig)
        if config.dora:
            return "the new adapter is DoRA; hotswap replaces plain LoRA adapters"
        A, B = tensors[layer.peft_keys["A"]], tensors[layer.peft_keys["B"]]
        r = A.shape[0]
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != a.A.shape[1] or B.shape != (a.B.shape[0], r):
            return (
                f"{module}: the new adapter's factors have shapes {tuple(A.shape)} and "
                f"{tuple(B.shape)}, which do not fit this layer; was it made for another model?"
            )
        if r > a.r:
            return (
                f"{module}: the new adapter has rank {r}, above the {a.r} adapter {name!r} was "
                f"padded to; call prepare_hotswap(model, max_rank={r}) before compiling"
            )
        if config.rank_for(module) != r:
            return (
                f"{module}: the new adapter's factors have rank {r} but its config gives "
                f"{config.rank_for(module)}; the tensors and the config do not belong together"
            )
        return None

    def swap(
        self,
        layer: AdapterModule,
        module: str,
        name: str,
        config: AdapterConfig,
        tensors: Mapping[str, torch.Tensor],
    ) -> None:
        """Copy the new factors into adapter ``name``'s, in place (checked by swap_refusal)."""
        assert isinstance(layer, LoraLayer) and isinstance(config, LoraConfig)
        a = layer.adapter(name)
        A, B = tensors[layer.peft_keys["A"]], tensors[layer.peft_keys["B"]]
        r = A.shape[0]
        scaling = lora_scaling(r, config.alpha_for(module), config.rslora)
        with torch.no_grad():
            a.A.zero_()
            a.B.zero_()
            a.A[:r].copy_(A)
            a.B[:, :r].copy_(B.to(torch.float64) * (scaling / a.scaling))


LORA_ARITHMETIC = LoraArithmetic()


def _cat(own: list[tuple[LoraAdapter, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    A = torch.cat([a.A.detach() * w * a.scaling for a, w in own], 0)
    B = torch.cat([a.B.detach() for a, _ in own], 1)
    return A, B


def _factorwise(
    own: list[tuple[LoraAdapter, float]], how: Combination
) -> tuple[torch.Tensor, torch.Tensor]:
    # peft: the sign of w·s rides on A only, so a negative weight subtracts the update.
    ws = [w * a.scaling for a, w in own]
    on_A = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in ws])
    on_B = torch.tensor([math.sqrt(abs(x)) for x in ws])
    As = [a.A.detach() for a, _ in own]
    Bs = [a.B.detach() for a, _ in own]
    dtype = As[0].dtype
    A = how.tasks(As, on_A.to(As[0].device))
    B = how.tasks(Bs, on_B.to(Bs[0].device))
    return A.to(dtype), B.to(dtype)


def _svd(
    layer: LoraLayer, sources: Sources, how: Combination, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    # The updates in the base weight's own orientation (Conv1D and embeddings store (in, out)),
    # as peft prunes and draws DARE's masks on them; the SVD is of the (out, in) update.
    deltas = [layer.change_entries(n)[0].values.detach() for n, _ in sources]
    weights = torch.tensor([w for _, w in sources]).to(deltas[0].device)
    delta = how.tasks(deltas, weights)
    if layer.weight_oi() is not layer.weight:
        delta = delta.T
    U, S, Vh = torch.linalg.svd(delta, full_matrices=how.svd_full_matrices)
    k = min(rank, S.shape[0])
    U = U[:, :k] @ torch.diag(S[:k])
    Vh = Vh[:k, :]
    if how.svd_clamp is not None:
        hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), how.svd_clamp)
        U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
    return Vh, U


def _config(
    ranks: Mapping[str, int], dropout: float, to_save: list[str], task_type: str | None
) -> LoraConfig:
    """Exactly the combined modules, each at its rank with scaling 1 (alpha = r)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    return LoraConfig(
        targets=sorted(ranks),
        r=r,
        alpha=float(r),
        dropout=dropout,
        rank_pattern={re.escape(m): k for m, k in ranks.items() if k != r},
        alpha_pattern={re.escape(m): float(k) for m, k in ranks.items() if k != r},
        modules_to_save=list(to_save),
        task_type=task_type,
    )
