"""The keep loss (--keep W): its gradients, its effect, its memory and its bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import FILLER, TOPICS, tiny_model_folder
from leantune.core.errors import LeantuneError
from leantune.train.keep import KeepLoss, cosine_keep, topk_keep
from leantune.tune import make_config, run_tune


def test_the_cosine_term_has_the_closed_form_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    e, e0 = torch.randn(4, 6, generator=g, requires_grad=True), torch.randn(4, 6, generator=g)
    cosine_keep(e, e0).backward()
    n, n0 = e.detach().norm(dim=-1, keepdim=True), e0.norm(dim=-1, keepdim=True)
    cos = (e.detach() * e0).sum(-1, keepdim=True) / (n * n0)
    closed = -(e0 / (n * n0) - cos * e.detach() / n**2) / len(e)
    assert torch.allclose(e.grad, closed, atol=1e-6)  # type: ignore[arg-type]


def test_the_top_k_term_has_the_closed_form_gradient() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 11, generator=g, requires_grad=True)
    top = torch.randn(5, 11, generator=g).topk(3, dim=-1).indices
    probs = torch.rand(5, 3, generator=g)
    probs = probs / probs.sum(-1, keepdim=True)
    topk_keep(logits, top, probs).backward()
    q = logits.detach().gather(-1, top).softmax(-1)  # the model's, renormalised over the top k
    closed = torch.zeros(5, 11).scatter(-1, top, (q - probs) / 5)  # zero off the top k
    assert torch.allclose(logits.grad, closed, atol=1e-6)  # type: ignore[arg-type]


def reference_file(path: Path, n: int = 60) -> Path:
    """General-ish text in the tiny tokenizer's words (never the task's rows)."""
    import random

    rng = random.Random(5)
    words = [w for ws in TOPICS.values() for w in ws] + FILLER
    path.write_text("\n%\n".join(" ".join(rng.choices(words, k=8)) for _ in range(n)))
    return path


def keep_config(tmp_path: Path, model: Path, data: Path, **kw: object) -> object:
    values = {
        "model": str(model),
        "data": str(data),
        "runs_dir": str(tmp_path / "runs"),
        "reference_text": str(reference_file(tmp_path / "ref.txt")),
        "reference_examples": 20,
        "keep_examples": 40,
        "epochs": 3,
        "lr": 2e-2,
        "batch_size": 8,
    }
    return make_config(values | kw)


def test_a_huge_weight_keeps_the_original_and_the_term_is_logged(
    tmp_path: Path, bert_dir: Path, data_file: Path
) -> None:
    free = run_tune(keep_config(tmp_path, bert_dir, data_file, name="free"))
    # On every batch: with --keep-every k > 1 the k - 1 steps between pulls move freely.
    kept = run_tune(keep_config(tmp_path, bert_dir, data_file, name="kept", keep=1e4, keep_every=1))
    assert kept["knowledge_cosine"] > 0.999
    assert kept["knowledge_cosine"] > free["knowledge_cosine"]
    rows = (tmp_path / "runs" / "kept" / "metrics.jsonl").read_text().splitlines()
    assert all("train_keep" in json.loads(r) for r in rows)


def test_the_causal_keep_term_trains_and_holds_no_second_model(
    tmp_path: Path, data_file: Path
) -> None:
    from leantune.tune.prepare import prepare
    from leantune.tune.strategy import make_keep

    llama = tiny_model_folder(tmp_path / "llama", "llama")
    config = keep_config(tmp_path, llama, data_file, task="causal-lm", keep=1.0, epochs=1)
    keep = make_keep(prepare(config).model, config, prepare(config))  # type: ignore[arg-type]
    assert isinstance(keep, KeepLoss)
    assert not any(isinstance(v, nn.Module) for v in vars(keep).values())
    held = sum(t.numel() for ts in keep.targets for t in ts)
    assert held < 40 * 64 * 16 * 2  # top-16 ids and probabilities per position, no weights
    summary = run_tune(config)
    rows = (Path(summary["run"]) / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["train_keep"] >= 0


def test_bad_keep_input_is_one_line(tmp_path: Path, bert_dir: Path, data_file: Path) -> None:
    with pytest.raises(LeantuneError, match=r"^--keep must be 0 \(off\) or a positive weight"):
        make_config({"keep": -1.0})
    short = reference_file(tmp_path / "short.txt", n=10)  # all of it measures knowledge kept
    config = keep_config(tmp_path, bert_dir, data_file, keep=1.0, reference_text=str(short))
    with pytest.raises(LeantuneError, match=r"^--keep needs reference text") as e:
        run_tune(config)  # type: ignore[arg-type]
    assert "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_keep_every_k_batches_pulls_as_hard_at_a_kth_of_the_cost() -> None:
    from helpers import tiny_bert

    model = tiny_bert()
    ids = [[2, 5 + i, 6 + i, 3] for i in range(8)]  # one reference batch
    every_batch = KeepLoss(model, ids, 0, 0.5, causal=False)
    third = KeepLoss(model, ids, 0, 0.5, causal=False, every=3)
    with torch.no_grad():
        for p in model.parameters():  # move away from the original so the term is not 0
            p.add_(0.05 * torch.randn_like(p))
    model.eval()  # no dropout: the same forward each time
    terms = [third(model) for _ in range(6)]
    assert [bool(t) for t in terms] == [True, False, False, True, False, False]
    expected = 3 * every_batch(model)["keep"]
    assert float(expected.detach()) > 0 and torch.allclose(terms[0]["keep"], expected)
    with pytest.raises(LeantuneError, match=r"^--keep-every must be a number of batches"):
        make_config({"keep_every": -1})


def test_keep_every_auto_keeps_the_keep_tokens_under_a_quarter_of_the_task() -> None:
    from leantune.analysis.evaluate import Encoded
    from leantune.tune.strategy import keep_every

    keep = [[1] * 40] * 10  # keep batches of 8 x 40 = 320 tokens
    short = Encoded([[1] * 14] * 50, [0] * 50)  # batches of 16 x 14 = 224 tokens
    long = Encoded([[1] * 128] * 50, [0] * 50)  # 16 x 128 = 2048
    k = keep_every(keep, short, 16)
    assert k == 6 and 320 / k <= 0.25 * 224 < 320 / (k - 1)
    assert keep_every(keep, long, 16) == 1 and keep_every([], short, 16) == 1
