"""Knowledge kept: 1.0 for an unchanged model, lower for a changed one; reference text input."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

import leantune as lt
from helpers import build, tiny_model_folder, topic_rows, write_rows
from leantune.analysis import knowledge
from leantune.analysis.evaluate import Encoded
from leantune.analysis.knowledge import (
    folder_fingerprint,
    knn_overlap,
    knowledge_kept,
    near_paraphrase,
    paraphrase_top1,
    pooled_embeddings,
    prepare_reference,
    reference_texts,
    split_entries,
)
from leantune.core.defaults import cache_root
from leantune.tune import TuneConfig, run_tune

TEXTS = [
    "the team said the new chip for the phone is on the market today",
    "a bank trade after the league match with the coach",
    "software and data for a robot with the shares",
    "profit on the market for the week said the bank",
    "the coach said a goal in the match after a week",
    "new robot data with software for the chip",
]


def perturb(model: torch.nn.Module, scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer.2" in name or "layers.1" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_kept_is_one_unchanged_and_falls_with_the_change(kind: str, tmp_path: Path) -> None:
    folder = tiny_model_folder(tmp_path / kind, kind)
    tok = AutoTokenizer.from_pretrained(folder)
    model = build(kind)
    ref = prepare_reference(model, tok, TEXTS, "test", causal=kind == "llama")
    same = knowledge_kept(model, ref)
    perturb(model, 0.05)
    small = knowledge_kept(model, ref)
    perturb(model, 0.5)
    large = knowledge_kept(model, ref)
    if kind == "bert":
        assert same["knowledge_cosine"] == pytest.approx(1.0, abs=1e-6)
        assert same["knowledge_knn_overlap"] == 1.0
        assert 1.0 > small["knowledge_cosine"] > large["knowledge_cosine"]
    else:
        assert same["reference_perplexity_ratio"] == pytest.approx(1.0, abs=1e-6)
        assert large["reference_perplexity_ratio"] != pytest.approx(1.0, abs=1e-3)
    assert same["reference_texts"] == len(TEXTS)


def test_near_paraphrases_are_seeded_edits_of_their_source() -> None:
    text = "the quick brown fox jumps over the lazy dog near the old river bank today"
    para = near_paraphrase(text, 7)
    assert para == near_paraphrase(text, 7) and para != text
    assert set(para.split()) <= set(text.split()) and len(para.split()) < len(text.split())
    assert near_paraphrase("two words", 1) == "two words"  # too short to edit


def test_paraphrase_top1_counts_paraphrases_nearest_their_source() -> None:
    texts = torch.eye(4)
    assert paraphrase_top1(texts, texts + 0.1) == 1.0
    swapped = texts[[1, 0, 2, 3]]  # paraphrases 0 and 1 now nearest the other's source
    assert paraphrase_top1(texts, swapped) == 0.5


def test_paraphrase_retrieval_is_kept_unchanged_and_falls_when_the_model_is_scrambled(
    tmp_path: Path,
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_folder(tmp_path / "bert"))
    model = build("bert")
    ref = prepare_reference(model, tok, TEXTS, "test", causal=False)
    same = knowledge_kept(model, ref)
    assert same["paraphrase_top1"] == same["paraphrase_top1_before"] > 0.5
    with torch.no_grad():  # every token the same embedding: no text is told from another
        model.bert.embeddings.word_embeddings.weight.fill_(0.1)
    assert knowledge_kept(model, ref)["paraphrase_top1"] < same["paraphrase_top1"]


def test_pooled_rows_come_back_in_input_order(tmp_path: Path) -> None:
    """Batches run sorted by length; each row must still be its own text's embedding."""
    folder = tiny_model_folder(tmp_path / "bert")
    tok = AutoTokenizer.from_pretrained(folder)
    model = build("bert").eval()
    ids = tok(TEXTS)["input_ids"]
    assert len({len(x) for x in ids}) > 2  # lengths differ, so sorting reorders
    together = pooled_embeddings(model, Encoded(ids), tok.pad_token_id, batch_size=4)
    alone = torch.cat([pooled_embeddings(model, Encoded([x]), tok.pad_token_id) for x in ids])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_knn_overlap_counts_shared_neighbours() -> None:
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    assert knn_overlap(x, x, k=3) == 1.0
    assert knn_overlap(x, x * 2.0, k=3) == 1.0  # cosine ignores scale
    shuffled = x[torch.randperm(12, generator=torch.Generator().manual_seed(1))]
    assert knn_overlap(x, shuffled, k=3) < 1.0


def test_reference_files_split_on_percent_blank_lines_or_lines(tmp_path: Path) -> None:
    assert split_entries("one fortune\nstill one\n%\ntwo\n%\n") == ["one fortune still one", "two"]
    assert split_entries("a b\nc\n\nd e\n") == ["a b c", "d e"]
    assert split_entries("x\ny\n") == ["x", "y"]
    path = tmp_path / "ref.txt"
    path.write_text("\n%\n".join(TEXTS))
    texts, source = reference_texts(str(path), limit=4)
    assert len(texts) == 4 and set(texts) <= set(TEXTS) and source == str(path)


def test_an_empty_or_unreadable_reference_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n%\n  \n")
    with pytest.raises(lt.LeantuneError, match="is empty"):
        reference_texts(str(tmp_path / "empty.txt"))
    with pytest.raises(lt.LeantuneError, match="cannot read it"):
        reference_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(lt.LeantuneError, match="cannot read it"):
        reference_texts(str(tmp_path))  # a folder


def test_tune_reports_task_gain_and_knowledge_kept(tmp_path: Path) -> None:
    model = tiny_model_folder(tmp_path / "tiny-bert")
    data = write_rows(tmp_path / "topics.jsonl", topic_rows(60))
    ref = tmp_path / "ref.txt"
    ref.write_text("\n".join(TEXTS))
    lines: list[str] = []
    summary = run_tune(
        TuneConfig(
            model=str(model),
            data=str(data),
            runs_dir=str(tmp_path / "runs"),
            name="k",
            epochs=1,
            batch_size=8,
            reference_text=str(ref),
        ),
        log=lines.append,
    )
    assert 0 < summary["knowledge_cosine"] <= 1.0 + 1e-6
    assert 0 <= summary["knowledge_knn_overlap"] <= 1.0
    assert summary["task_gain"] == pytest.approx(
        summary["test_accuracy"] - summary["test_accuracy_before"]
    )
    assert 0 < summary["knowledge_share_of_wall"] < 1
    assert any(
        line.startswith("task: test accuracy") and "knowledge kept" in line for line in lines
    )
    saved = json.loads((tmp_path / "runs" / "k" / "summary.json").read_text())
    assert saved["knowledge_cosine"] == summary["knowledge_cosine"]


def test_cli_refuses_an_empty_reference_file_and_writes_nothing(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from leantune.cli import app

    model = tiny_model_folder(tmp_path / "tiny-bert")
    data = write_rows(tmp_path / "topics.jsonl", topic_rows(60))
    (tmp_path / "empty.txt").write_text("")
    args = ["tune", "--model", str(model), "--data", str(data), "--runs-dir", str(tmp_path / "r")]
    res = CliRunner().invoke(app, [*args, "--reference-text", str(tmp_path / "empty.txt")])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "is empty" in res.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_the_original_side_is_cached_per_model_folder_and_texts(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tiny_model_folder(tmp_path / kind, kind)
    tok = AutoTokenizer.from_pretrained(folder)
    model = build(kind)
    causal = kind == "llama"
    first = prepare_reference(
        model, tok, TEXTS, "t", causal=causal, fingerprint=folder_fingerprint(folder)
    )
    assert not first.cached and list((cache_root() / "reference").glob("*.safetensors"))

    def counted(name: str) -> Callable[..., Any]:
        real = getattr(knowledge, name)

        def run(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return real(*args, **kwargs)

        return run

    calls: list[str] = []
    monkeypatch.setattr(knowledge, "pooled_embeddings", counted("pooled_embeddings"))
    monkeypatch.setattr(knowledge, "evaluate", counted("evaluate"))
    again = prepare_reference(
        model, tok, TEXTS, "t", causal=causal, fingerprint=folder_fingerprint(folder)
    )
    assert again.cached and calls == []  # the original model did not run again
    if causal:
        assert again.perplexity == first.perplexity
    else:
        assert again.embeddings is not None and first.embeddings is not None
        torch.testing.assert_close(again.embeddings, first.embeddings)
        assert knowledge_kept(model, again)["knowledge_cosine"] == pytest.approx(1.0, abs=1e-6)
    calls.clear()

    # Other texts, another length, a rewritten model file: the cache is not used.
    other = prepare_reference(
        model, tok, TEXTS[:4], "t", causal=causal, fingerprint=folder_fingerprint(folder)
    )
    shorter = prepare_reference(
        model, tok, TEXTS, "t", causal=causal, max_length=4, fingerprint=folder_fingerprint(folder)
    )
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    rewritten = prepare_reference(
        model, tok, TEXTS, "t", causal=causal, fingerprint=folder_fingerprint(folder)
    )
    assert not (other.cached or shorter.cached or rewritten.cached)
    assert len(calls) == 3 * (1 if causal else 2)  # encoders: the texts and their paraphrases


def test_a_damaged_cache_file_is_recomputed(tmp_path: Path) -> None:
    folder = tiny_model_folder(tmp_path / "bert")
    tok = AutoTokenizer.from_pretrained(folder)
    model = build("bert")
    first = prepare_reference(model, tok, TEXTS, "t", causal=False, fingerprint="f")
    (file,) = (cache_root() / "reference").glob("*.safetensors")
    file.write_bytes(b"not a safetensors file")
    again = prepare_reference(model, tok, TEXTS, "t", causal=False, fingerprint="f")
    assert not again.cached and again.embeddings is not None and first.embeddings is not None
    torch.testing.assert_close(again.embeddings, first.embeddings)
    assert prepare_reference(model, tok, TEXTS, "t", causal=False, fingerprint="f").cached


def test_a_second_tune_run_reads_the_original_side_from_the_cache(
    bert_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    ref = tmp_path / "ref.txt"
    ref.write_text("\n".join(TEXTS))
    summaries, logs = [], []
    for name in ("a", "b"):
        lines: list[str] = []
        summaries.append(
            run_tune(
                TuneConfig(
                    model=str(bert_dir),
                    data=str(data_file),
                    runs_dir=str(tmp_path / "runs"),
                    name=name,
                    epochs=1,
                    batch_size=8,
                    reference_text=str(ref),
                ),
                log=lines.append,
            )
        )
        logs.append(lines)
    assert not any("read from" in line for line in logs[0])
    assert any("original model's side read from" in line for line in logs[1])
    # Same seed, same data: the cached side gives the same answer as computing it.
    assert summaries[1]["knowledge_cosine"] == pytest.approx(summaries[0]["knowledge_cosine"])
