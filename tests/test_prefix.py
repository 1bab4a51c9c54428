"""The frozen-prefix cache: later epochs skip the frozen bottom layers, with the same losses."""

from __future__ import annotations

import random

import pytest
import torch

import leantune as lt
from helpers import build
from leantune.analysis.evaluate import Encoded, make_batch
from leantune.train.frozen_cache import FrozenLayerCache
from leantune.train.interface import TrainConfig, TrainHooks
from leantune.train.loop import train


def data(causal: bool) -> tuple[Encoded, list[list[dict[str, torch.Tensor]]]]:
    rng = random.Random(0)
    ids = [[rng.randrange(1, 64) for _ in range(rng.randint(3, 12))] for _ in range(24)]
    enc = Encoded(ids, [] if causal else [len(x) % 3 for x in ids])
    epochs = []
    for e in range(3):
        order = list(range(len(ids)))
        random.Random(e).shuffle(order)
        epochs.append([make_batch(enc, order[i : i + 6], 0, causal, True) for i in range(0, 24, 6)])
    return enc, epochs


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_cached_prefix_gives_the_same_losses_and_skips_the_prefix(kind: str) -> None:
    causal = kind == "llama"
    enc, epochs = data(causal)
    top = 2 if kind == "bert" else 1

    def run(cache: bool) -> tuple[list[tuple[int, float]], int]:
        model = build(kind)
        lt.inject(model, lt.LoraConfig(r=2, targets="all-linear", layers=[top], dropout=0.1))
        prefix = FrozenLayerCache(model, [len(x) for x in enc.ids])
        assert prefix.active and prefix.start == top
        calls = [0]
        prefix.frozen[-1].register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))

        def plain(m: torch.nn.Module, b: dict[str, torch.Tensor]) -> object:
            prefix.freeze_mode()  # the same dropout-free prefix, computed every time
            return m(**{k: v for k, v in b.items() if k != "rows"})

        res = train(
            model,
            lambda e: epochs[e],
            lambda m: {"accuracy": 0.0},
            TrainConfig(epochs=3, lr=1e-2, seed=0),
            TrainHooks(forward=prefix.forward if cache else plain),  # type: ignore[arg-type]
        )
        return res.curve, calls[0]

    cached, cached_calls = run(True)
    plain, plain_calls = run(False)
    assert plain_calls == 3 * 4 and cached_calls == 4  # only the first epoch runs the prefix
    assert [s for s, _ in cached] == [s for s, _ in plain]
    assert [v for _, v in cached] == pytest.approx([v for _, v in plain], abs=1e-5)
    assert plain[-1][1] != plain[0][1]  # it trained


def test_no_cache_when_the_bottom_is_trained() -> None:
    model = build("bert")
    lt.inject(model, lt.LoraConfig(r=2, targets="all-linear", layers=[0, 2]))
    assert not FrozenLayerCache(model, [5]).active
    model = build("bert")
    lt.inject(model, lt.LoraConfig(r=2, targets=["word_embeddings", "query"], layers=None))
    assert not FrozenLayerCache(model, [5]).active
    assert not FrozenLayerCache(build("mlp"), [5]).active  # no layer stack at all
