"""The linear probe: a classification head fitted on the frozen model's features.

The features are what the head sits on (the model's own pooling, :mod:`leantune.models.pooling`),
computed once per model, pooling and data and cached (``<cache>/probe/``). The head is a
multinomial logistic regression with an L2 penalty (scikit-learn's ``C``: the mean
cross-entropy + ‖W‖² / (2·C·n)), fitted to convergence by L-BFGS in float64 — seconds for
thousands of examples. ``--method probe`` is that head and nothing else; ``--warm-head`` starts
an adapter run from it (LP-FT, Kumar et al. 2022: a fitted head distorts the features less).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leantune.analysis.evaluate import Encoded
from leantune.analysis.knowledge import body_rows
from leantune.core.distributed import current
from leantune.core.errors import LeantuneError
from leantune.core.files import read_tensors, save_tensors

PROBE_C = 10.0
"""Inverse L2 strength of the probe's logistic regression (scikit-learn's default is 1; 10
fits normalised sentence embeddings better: issue 17's probe)."""


@dataclass
class Probe:
    weight: torch.Tensor
    bias: torch.Tensor
    seconds: float
    """Features (when not cached) and the fit."""
    cached: bool
    train_accuracy: float
    val: dict[str, float] = field(default_factory=dict)
    """The validation metrics of the frozen model with this head (set by the run)."""


def head_module(model: nn.Module) -> nn.Linear:
    """The classification head a probe replaces: the model's last linear layer on the
    pooled features (``classifier``, or ``classifier.out_proj``)."""
    head = getattr(model, "classifier", None) or getattr(model, "score", None)
    if isinstance(head, nn.Linear):
        return head
    inner = getattr(head, "out_proj", None)
    if isinstance(inner, nn.Linear) and getattr(head, "dense", None) is None:
        return inner
    raise LeantuneError(
        "--method probe / --warm-head need a classifier that is one linear layer on the pooled "
        "features; this model's head is another shape (use --method head)"
    )


def probe_fits(model: nn.Module) -> bool:
    """Whether ``model`` has the one-linear-layer head a probe fits (``head_module``) on a
    pooled output (DistilBERT's classifier sits on a pre-classifier layer, not a pooler)."""
    try:
        head_module(model)
    except LeantuneError:
        return False
    return getattr(getattr(model, "base_model", None), "pooler", None) is not None


def features(model: nn.Module, enc: Encoded, pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """What the head sees, one float32 row per example (eval mode, in input order): the
    model's pooled output (its own pooler or the native pooling)."""
    body: Any = getattr(model, "base_model", None)
    if body is None or getattr(body, "pooler", None) is None:
        raise LeantuneError(
            "--method probe / --warm-head need an encoder with a pooled output (BERT-like)"
        )
    return body_rows(model, enc, pad_id, lambda out, batch: out.pooler_output, batch_size)


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, classes: int, c: float = PROBE_C
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: argmin mean CE(x·Wᵀ + b, y) + ‖W‖² / (2·c·n), by
    L-BFGS in float64 to a gradient below 1e-9. Returns (W, b) in float32."""
    x64, n = x.double(), len(y)
    w = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], max_iter=1000, tolerance_grad=1e-9, tolerance_change=1e-12,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x64 @ w.T + b, y) + w.pow(2).sum() / (2 * c * n)
        loss.backward()
        return loss

    for _ in range(5):  # LBFGS stops at max_iter; a few restarts finish hard cases
        opt.step(objective)
        if max(float(w.grad.abs().max()), float(b.grad.abs().max())) < 1e-7:  # type: ignore[union-attr]
            break
    return w.detach().float(), b.detach().float()


def _cache_file(folder_key: str, enc: Encoded) -> Path:
    from leantune.core.defaults import cache_root

    digest = hashlib.sha256(json.dumps([folder_key, enc.ids]).encode()).hexdigest()[:32]
    return cache_root() / "probe" / f"{digest}.safetensors"


def _read_cache(file: Path, rows: int) -> torch.Tensor | None:
    """The cached features of ``rows`` texts, or None when the file is unusable (recomputed)."""
    try:
        x = read_tensors(file).get("features")
    except LeantuneError:
        return None
    return x if x is not None and x.ndim == 2 and x.shape[0] == rows else None


def fit_probe(
    model: nn.Module,
    train: Encoded,
    pad_id: int,
    classes: int,
    cache_key: str | None = None,
) -> Probe:
    """Fit the head on ``train``'s features and put it into ``model``'s head (see the module
    doc). ``cache_key`` (the model folder's fingerprint and pooling) caches the features."""
    if not train.labels:
        raise LeantuneError("--method probe / --warm-head need labelled classification data")
    head = head_module(model)
    start = time.perf_counter()
    # Under several processes every rank computes the features: a rank that read another's
    # cache file would skip the forward passes (FSDP's collectives) the others are in.
    file = _cache_file(cache_key, train) if cache_key and not current().parallel else None
    x = _read_cache(file, len(train)) if file is not None and file.is_file() else None
    cached = x is not None
    if x is None:
        x = features(model, train, pad_id)
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            save_tensors({"features": x.contiguous()}, file)
    y = torch.tensor(train.labels)
    w, b = fit_logistic(x, y, classes)
    with torch.no_grad():
        head.weight.copy_(w.to(head.weight))
        if head.bias is not None:
            head.bias.copy_(b.to(head.bias))
    accuracy = float(((x @ w.T + b).argmax(-1) == y).float().mean())
    return Probe(w, b, time.perf_counter() - start, cached, accuracy)
