"""The classification head on the features the model was trained to give.

A sentence-transformers folder says how its sentence embedding is made: ``modules.json`` lists
a ``Pooling`` module (``1_Pooling/config.json``: mean of the token states, the CLS state or
their max) and often a ``Normalize`` one (unit length). MiniLM-L6 is such a model: trained as
mean-pooled, normalised embeddings, it never trained BERT's CLS pooler (dense + tanh), on
which transformers' ``BertForSequenceClassification`` puts its head. A logistic regression on
the mean-pooled embeddings beats one on the pooler output by about 3 points on BBC News.

:func:`use_pooling` swaps the model's pooler for :class:`Pooler` (no parameters), which pools
as the folder says; a forward pre-hook on the body hands it the attention mask. Models without
such a folder keep their own pooler under ``--pooling auto`` (the default since issue 17's
benchmarks); ``--pooling mean`` forces the masked mean, ``--pooling pooler`` the model's own,
which is what transformers and peft use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leantune.core.errors import LeantuneError

POOLINGS = ("auto", "pooler", "mean", "cls")


@dataclass(frozen=True)
class Pooling:
    mode: str
    """mean, cls or max over the token states."""
    normalize: bool = False
    """Scale each embedding to unit length (sentence-transformers' Normalize)."""


def native_pooling(folder: Path) -> Pooling | None:
    """The pooling a sentence-transformers folder declares, or None (not such a folder)."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return None
    try:
        entries = json.loads(modules.read_text())
        pool = next(e for e in entries if str(e.get("type", "")).endswith(".Pooling"))
        config = json.loads((folder / pool["path"] / "config.json").read_text())
    except (OSError, ValueError, StopIteration, KeyError, TypeError, AttributeError):
        return None
    normalize = any(str(e.get("type", "")).endswith(".Normalize") for e in entries)
    for key, mode in (
        ("pooling_mode_mean_tokens", "mean"),
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_max_tokens", "max"),
    ):
        if config.get(key):
            return Pooling(mode, normalize)
    return None


class Pooler(nn.Module):
    """In place of a transformer's pooler: the token states pooled as ``pooling`` says, under
    the attention mask the body's pre-hook left in ``mask``."""

    def __init__(self, pooling: Pooling) -> None:
        super().__init__()
        self.pooling = pooling
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask is None or mask.shape != hidden_states.shape[:2]:
            mask = torch.ones(hidden_states.shape[:2], device=hidden_states.device)
        weights = mask.unsqueeze(-1).to(hidden_states.dtype)
        if self.pooling.mode == "cls":
            pooled = hidden_states[:, 0]
        elif self.pooling.mode == "max":
            pooled = hidden_states.masked_fill(weights == 0, float("-inf")).amax(1)
        else:
            pooled = (hidden_states * weights).sum(1) / weights.sum(1).clamp_min(1)
        return F.normalize(pooled, dim=-1) if self.pooling.normalize else pooled

    def extra_repr(self) -> str:
        return f"{self.pooling.mode}, normalize={self.pooling.normalize}"


def _keep_mask(pooler: Pooler) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        pooler.mask = mask if mask is not None else (args[1] if len(args) > 1 else None)

    return hook


def use_pooling(model: nn.Module, folder: Path, choice: str = "pooler") -> Pooling | None:
    """Put the head of a classification ``model`` (loaded from ``folder``) on the pooling
    ``choice`` names (see the module doc); returns the pooling used, None for the model's own."""
    if choice not in POOLINGS:
        raise LeantuneError(f"--pooling {choice!r} is unknown; use one of {POOLINGS}")
    if choice == "pooler":
        return None
    pooling = native_pooling(folder) if choice == "auto" else Pooling(choice)
    if pooling is None:
        return None
    body = getattr(model, "base_model", None)
    if body is None or getattr(body, "pooler", None) is None:
        if choice == "auto":
            return None  # the head takes what the model gives it (a decoder's last token)
        raise LeantuneError(
            f"--pooling {choice}: this model has no pooler to replace; use --pooling auto"
        )
    pooler = Pooler(pooling)
    body.pooler = pooler
    body.register_forward_pre_hook(_keep_mask(pooler), with_kwargs=True)
    return pooling


def copy_pooling_files(source: Path, dest: Path) -> None:
    """The sentence-transformers files that declare ``source``'s pooling, into ``dest`` (a
    merged model: loaded again by leantune or sentence-transformers it pools the same way;
    plain transformers would use a fresh pooler instead)."""
    import shutil

    entries = json.loads((source / "modules.json").read_text())
    shutil.copy2(source / "modules.json", dest / "modules.json")
    for entry in entries:
        path = str(entry.get("path", ""))
        if path and (source / path).is_dir() and Path(path).name == path:
            shutil.copytree(source / path, dest / path, dirs_exist_ok=True)
