"""The loss with the output head on the labelled positions only equals the model's own, with
the same gradients; a head that is more than a linear map falls back to the model's forward."""

from __future__ import annotations

import pytest
import torch

import leantune as lt
from helpers import build
from leantune.train.answer import answer_forward, answer_forward_for


def batch(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (3, 12), generator=g)
    labels = torch.full_like(ids, -100)
    labels[0, 7:10] = ids[0, 7:10]  # an answer in the middle
    labels[1, 9:] = ids[1, 9:]  # one at the end
    labels[2, 3:5] = ids[2, 3:5]
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0  # padding
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_answer_loss_and_gradients_equal_the_models_own(kind: str) -> None:
    model = build(kind)
    lt.inject(model, lt.LoraConfig(r=2, targets="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.normal_(std=0.05)
    b = batch(kind)
    own = model(**b).loss
    own.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ours = answer_forward(model, b).loss
    ours.backward()
    torch.testing.assert_close(ours, own.float(), atol=1e-5, rtol=1e-5)
    assert want
    for n, g in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, atol=1e-5, rtol=1e-4)
    assert answer_forward_for(model, b) is answer_forward


def test_a_head_that_is_not_linear_falls_back() -> None:
    model = build("llama")
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda m, i, o: 30 * torch.tanh(o / 30))  # a soft cap
    assert answer_forward_for(model, batch("llama")) is not None  # same on both paths ...
    model.register_forward_hook(
        lambda m, i, o: o.__class__(**{**o, "loss": o.loss * 2}) if o.loss is not None else o
    )
    assert answer_forward_for(model, batch("llama")) is None  # ... until the model's differs
    unlabelled = batch("llama") | {"labels": torch.full((3, 12), -100)}
    assert answer_forward_for(build("llama"), unlabelled) is None
