"""Preference losses on the sequence log-probabilities of completion tokens: DPO, IPO, ORPO,
SimPO and KTO, as TRL 1.16 reduces them (docs/PREFERENCE.md says where TRL departs from the
papers), with the reference model being the same model with its adapters switched off.

**Batches.** A paired batch (dpo, ipo, orpo, simpo) holds ``2B`` rows: the B chosen sequences,
then the B rejected ones (prompt + completion, right-padded), ``labels`` the ids on the
completion tokens and -100 elsewhere, as the instruct task's. A KTO batch holds B rows,
``desirable`` (1/0) per row, and ``kl_input_ids`` / ``kl_attention_mask`` / ``kl_labels``: each
prompt with the previous row's completion (TRL's mismatched pairs, for the KL estimate).
``ref_logps`` (and for KTO ``ref_kl_logps``), when present, are the reference's sequence
log-probs computed once before training (``--precompute-reference``).

**Log-probs.** ``sequence_logps`` runs the model's body and applies the output head only at the
positions that predict a completion token (the answer-only head of ``train/answer.py``); a
sequence's log-prob is the sum of its completion tokens' log-probs, and the count of those
tokens comes with it (IPO, ORPO and SimPO average per token). ORPO's NLL term, as TRL computes
it, covers the chosen sequence's every token (prompt too), so its head runs there as well.

**Losses** (c: chosen, r: rejected, π: policy, ref: reference, n: completion tokens):

- dpo: ``-log σ(β[(π_c - ref_c) - (π_r - ref_r)])``
- ipo: ``((π_c - ref_c)/n_c - (π_r - ref_r)/n_r - 1/(2β))²``
- simpo: ``-log σ(β(π_c/n_c - π_r/n_r) - γ)`` (no reference)
- orpo: ``NLL(chosen) - β log σ(log odds(π_c/n_c) - log odds(π_r/n_r))``, odds(p) = p/(1-p)
  (no reference)
- kto: desirable rows ``w_d (1 - σ(β(π - ref - z)))``, undesirable rows
  ``w_u (1 - σ(β(z - (π - ref))))``, z = max(0, mean of π - ref over the mismatched pairs),
  not differentiated

each averaged over the batch's pairs (KTO: rows). **Rewards** for the metrics are TRL's:
``β(π - ref)`` with a reference, ``β π/n`` without one (orpo, simpo).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leantune.adapters.base import records
from leantune.adapters.inject import adapter_layers, disable
from leantune.core.errors import LeantuneError

OBJECTIVES = ("dpo", "ipo", "orpo", "simpo", "kto")
REFERENCE_OBJECTIVES = ("dpo", "ipo", "kto")
IGNORE = -100
Batch = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Objective:
    """A preference objective and its constants (TRL's defaults)."""

    name: str = "dpo"
    beta: float = 0.1
    """DPO/IPO/KTO: the strength of the pull toward the reference (IPO's τ); ORPO: the weight
    of the odds-ratio term (the paper's λ); SimPO: the reward scale."""
    gamma: float = 0.5
    """SimPO: the target margin γ (TRL's simpo_gamma)."""
    desirable_weight: float = 1.0
    """KTO: the weight of the desirable rows' losses."""
    undesirable_weight: float = 1.0
    """KTO: the weight of the undesirable rows' losses."""

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise LeantuneError(f"--objective {self.name!r} is unknown; use one of {OBJECTIVES}")
        if not self.beta > 0:
            raise LeantuneError(f"--beta must be positive, got {self.beta}")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise LeantuneError("the KTO weights must be 0 or more")

    @property
    def uses_reference(self) -> bool:
        return self.name in REFERENCE_OBJECTIVES

    @property
    def paired(self) -> bool:
        return self.name != "kto"


@dataclass
class Logps:
    """Per-row sums of completion-token log-probs, their token counts, and (ORPO) the mean
    NLL over the chosen rows' tokens."""

    sums: torch.Tensor
    counts: torch.Tensor
    nll: torch.Tensor | None = None


def _softcapped(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "final_logit_softcapping", None) is not None


def sequence_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    nll_rows: int = 0,
) -> Logps:
    """Sums of log p(token | before) over each row's labelled tokens; with ``nll_rows`` > 0 the
    mean NLL over every real token (after the first) of the first ``nll_rows`` rows too."""
    target = input_ids[:, 1:]
    keep = labels[:, 1:] != IGNORE
    need = keep.clone()
    whole = torch.zeros_like(keep)
    if nll_rows:
        whole[:nll_rows] = attention_mask[:nll_rows, 1:].bool()
        need |= whole
    head: Any = getattr(model, "get_output_embeddings", lambda: None)()
    if head is None or not hasattr(model, "base_model") or _softcapped(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = out.logits[:, :-1][need]
    else:  # the head at the needed positions only (train/answer.py)
        body: Any = model.base_model
        hidden = body(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        logits = head(hidden[:, :-1][need])
    token = logits.float().log_softmax(-1).gather(-1, target[need][:, None]).squeeze(-1)
    rows = need.nonzero()[:, 0]
    counted = keep[need]
    sums = torch.zeros(len(input_ids), device=token.device, dtype=token.dtype)
    sums = sums.index_add(0, rows[counted], token[counted])
    counts = keep.sum(-1).to(sums.dtype)
    nll = -token[whole[need]].mean() if nll_rows else None
    return Logps(sums, counts, nll)


@contextmanager
def reference_of(model: nn.Module) -> Iterator[nn.Module]:
    """The reference: the same model with its adapters switched off (never a copy)."""
    if not list(adapter_layers(model)):
        raise LeantuneError(
            "this objective needs a reference model, which is the model with its adapter "
            "switched off; train an adapter (--method lora, ...), or use --objective orpo or "
            "simpo, which need none"
        )
    if any(rec.config.rewrites_base_weight() for rec in records(model).values()):
        raise LeantuneError(
            "the adapter rewrote the base weights when it was injected (e.g. PiSSA's start), "
            "so switching it off does not give the starting model; use a LoRA with the "
            "standard start, or --objective orpo or simpo, which need no reference"
        )
    with torch.no_grad(), disable(model):
        yield model


def reference_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference's sequence log-probs of ``batch`` (and of its KL rows, for KTO)."""
    with reference_of(model):
        main = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        kl = None
        if "kl_input_ids" in batch:
            kl = sequence_logps(
                model, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"]
            ).sums
    return main.sums, kl


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2."""
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


@dataclass
class Outcome:
    """A batch's loss and what the metrics need: per-pair (KTO: per-row) rewards."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    correct: torch.Tensor
    """1.0 where the reward ranks the pair right (KTO: where the reward's sign is the row's
    label's), per pair or row."""


def paired_loss(objective: Objective, policy: Logps, ref: torch.Tensor | None) -> Outcome:
    """dpo, ipo, orpo or simpo on a batch of B chosen rows followed by B rejected rows."""
    b, name = objective.beta, objective.name
    pc, pr = policy.sums.chunk(2)
    nc, nr = policy.counts.clamp(min=1).chunk(2)
    if name in ("dpo", "ipo"):
        if ref is None:
            raise LeantuneError(f"{name} needs the reference's log-probs")
        rc, rr = ref.chunk(2)
        chosen, rejected = pc - rc, pr - rr
        if name == "dpo":
            losses = -F.logsigmoid(b * (chosen - rejected))
        else:
            losses = (chosen / nc - rejected / nr - 1 / (2 * b)) ** 2
        cr, rr_ = b * chosen.detach(), b * rejected.detach()
    else:
        ac, ar = pc / nc, pr / nr
        if name == "simpo":
            losses = -F.logsigmoid(b * (ac - ar) - objective.gamma)
        else:
            log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
            assert policy.nll is not None
            losses = policy.nll - b * F.logsigmoid(log_odds)
        cr, rr_ = b * ac.detach(), b * ar.detach()
    return Outcome(losses.mean(), cr, rr_, pc.detach(), pr.detach(), (cr > rr_).float())


def kto_loss(
    objective: Objective,
    policy: Logps,
    ref: torch.Tensor,
    kl_policy: torch.Tensor,
    kl_ref: torch.Tensor,
    desirable: torch.Tensor,
) -> Outcome:
    """KTO on B rows, each desirable or not; the KL estimate is detached (as TRL's)."""
    b = objective.beta
    z = (kl_policy - kl_ref).mean().detach().clamp(min=0)
    ratio = policy.sums - ref
    good = desirable.bool()
    losses = torch.where(
        good,
        objective.desirable_weight * (1 - torch.sigmoid(b * (ratio - z))),
        objective.undesirable_weight * (1 - torch.sigmoid(b * (z - ratio))),
    )
    rewards = b * ratio.detach()
    correct = ((rewards > 0) == good).float()
    sums = policy.sums.detach()
    return Outcome(losses.mean(), rewards[good], rewards[~good], sums[good], sums[~good], correct)


def preference_outcome(
    objective: Objective, model: nn.Module, batch: Batch, reference: bool = True
) -> Outcome:
    """The objective on ``batch``: policy forward (with gradients when enabled), and the
    reference from ``batch["ref_logps"]`` or, when absent, the model with adapters off."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    nll_rows = len(ids) // 2 if objective.name == "orpo" else 0
    policy = sequence_logps(model, ids, mask, labels, nll_rows)
    ref: torch.Tensor | None = batch.get("ref_logps")
    kl_ref: torch.Tensor | None = batch.get("ref_kl_logps")
    if objective.uses_reference and ref is None:
        ref, kl_ref = reference_logps(model, batch)
    if objective.paired:
        return paired_loss(objective, policy, ref)
    assert ref is not None and kl_ref is not None
    with torch.no_grad():  # TRL: the policy's KL rows carry no gradient
        kl_policy = sequence_logps(
            model, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"]
        ).sums
    return kto_loss(objective, policy, ref, kl_policy, kl_ref, batch["desirable"])


def preference_forward(objective: Objective) -> Callable[[nn.Module, Batch], Any]:
    """The loop's forward (``TrainHooks.forward``): ``SimpleNamespace(loss=...)``."""

    def forward(model: nn.Module, batch: Batch) -> Any:
        return SimpleNamespace(loss=preference_outcome(objective, model, batch).loss)

    return forward


@torch.no_grad()
def preference_metrics(
    objective: Objective,
    model: nn.Module,
    batches: Sequence[Batch],
    device: torch.device,
    autocast: Callable[[], Any] = nullcontext,
) -> dict[str, float]:
    """Over ``batches``: reward_accuracy (pairs ranked right; KTO: rows whose reward has their
    label's sign), margin (mean chosen reward - mean rejected reward), logp_chosen,
    logp_rejected (mean sequence log-probs) and loss (the objective, mean per batch)."""
    was = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("cr", "rr", "cl", "rl", "ok")}
    losses = []
    try:
        for cpu in batches:
            batch = {k: v.to(device) for k, v in cpu.items()}
            with autocast():
                out = preference_outcome(objective, model, batch)
            losses.append(float(out.loss))
            for key, t in zip(
                parts,
                (out.chosen_rewards, out.rejected_rewards, out.chosen_logps, out.rejected_logps,
                 out.correct),
                strict=True,
            ):  # fmt: skip
                parts[key].append(t.float().cpu())
    finally:
        model.train(was)
    cat = {k: torch.cat(v) if v else torch.zeros(0) for k, v in parts.items()}

    def mean(t: torch.Tensor) -> float:
        return float(t.mean()) if len(t) else 0.0

    return {
        "reward_accuracy": mean(cat["ok"]),
        "margin": mean(cat["cr"]) - mean(cat["rr"]),
        "logp_chosen": mean(cat["cl"]),
        "logp_rejected": mean(cat["rl"]),
        "loss": sum(losses) / max(1, len(losses)),
    }
