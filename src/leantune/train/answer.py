"""A causal LM's loss with the output head applied only where there are labels.

An instruct batch trains on the assistant's tokens: a tenth of the positions or fewer. The
output head (vocabulary × hidden; 28M of SmolLM2's 135M parameters) applied to every position
makes logits that are thrown away, and their backward. ``answer_forward`` runs the model's
body (``base_model``), keeps the hidden states of the positions that predict a label (labels
shifted by one, as transformers shifts them) and applies the head to those alone; the loss is
the same mean cross-entropy over the labelled tokens.

A model whose head does more than a linear map (a logit soft-cap or scale, say) would give
another loss: :func:`answer_forward_for` compares both on a batch before it is used, and
returns None (use the model's own forward) when they differ.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Forward = Callable[[nn.Module, Mapping[str, torch.Tensor]], Any]
IGNORE = -100
_SKIP = ("labels", "rows")


def answer_forward(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> Any:
    """``SimpleNamespace(loss=...)``: mean cross-entropy over the labelled tokens."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in _SKIP}
    body: Any = model.base_model
    head: Any = model.get_output_embeddings()  # type: ignore[operator]
    hidden = body(**inputs, use_cache=False).last_hidden_state
    target = labels[:, 1:]
    keep = target != IGNORE
    logits = head(hidden[:, :-1][keep])
    loss = F.cross_entropy(logits.float(), target[keep])
    return SimpleNamespace(loss=loss)


@torch.no_grad()
def answer_forward_for(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> Forward | None:
    """``answer_forward`` when it gives ``model``'s own loss on ``batch`` (within 1e-4),
    else None. The model is put in eval mode for the check and back after."""
    if not hasattr(model, "base_model") or not hasattr(model, "get_output_embeddings"):
        return None
    if model.get_output_embeddings() is None:  # type: ignore[operator]
        return None
    if int((batch["labels"][:, 1:] != IGNORE).sum()) == 0:
        return None
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        on = {k: v.to(device) for k, v in batch.items() if k != "rows"}
        own = model(**on).loss
        ours = answer_forward(model, on).loss
    except (TypeError, AttributeError, RuntimeError):
        return None
    finally:
        model.train(was_training)
    if own is None or not torch.allclose(own.float(), ours, atol=1e-4, rtol=1e-4):
        return None
    return answer_forward
