"""The figures of a run's report: loss, validation metric, confusion matrix, before/after,
and the selection's importance heat map (PNG, matplotlib's Agg canvas)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from leantune.tune.html import DPI, finite, save_figure

# Above this many classes the confusion plot drops the per-cell counts (they would not fit).
MAX_ANNOTATED_CLASSES = 30


def _series(history: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the evaluations that have a finite ``key``."""
    xs: list[float] = []
    ys: list[float] = []
    for i, row in enumerate(history):
        value = finite(row.get(key))
        if value is None:
            continue
        step = finite(row.get("step"))
        xs.append(float(i) if step is None else step)
        ys.append(value)
    return xs, ys


def _moving_average(ys: np.ndarray, window: int) -> np.ndarray:
    kernel = np.full(window, 1.0 / window)
    return np.convolve(ys, kernel, mode="valid")


def no_data(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def loss_figure(
    history: Sequence[Mapping[str, float]], train_curve: Sequence[tuple[int, float]]
) -> Figure:
    fig = Figure(figsize=(8, 4.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    points = [(float(s), float(v)) for s, v in train_curve if finite(v) is not None]
    val_x, val_y = _series(history, "val_loss")
    if not points and not val_x:
        no_data(ax, "No loss values were recorded")
        ax.set_title("Loss")
        return fig
    if points:
        xs = np.array([p[0] for p in points])
        ys = np.array([p[1] for p in points])
        window = max(1, len(ys) // 50)
        thin = 0.35 if window > 1 else 0.9
        ax.plot(xs, ys, lw=0.7, alpha=thin, color="tab:blue", label="train loss (per step)")
        if window > 1:
            ax.plot(
                xs[window - 1 :],
                _moving_average(ys, window),
                lw=1.8,
                color="tab:blue",
                label=f"train loss ({window}-step moving average)",
            )
    if val_x:
        ax.plot(val_x, val_y, "o-", color="tab:orange", lw=1.5, ms=5, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def metric_figure(history: Sequence[Mapping[str, float]]) -> Figure:
    fig = Figure(figsize=(8, 4.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    acc = _series(history, "val_accuracy")
    f1 = _series(history, "val_macro_f1")
    ppl = _series(history, "val_perplexity")
    if acc[0] or f1[0]:
        if acc[0]:
            ax.plot(*acc, "o-", color="tab:green", label="validation accuracy")
        if f1[0]:
            ax.plot(*f1, "s--", color="tab:purple", label="validation macro-F1")
        ax.set_ylabel("score")
        ax.set_title("Validation accuracy and macro-F1")
    elif ppl[0]:
        ax.plot(*ppl, "o-", color="tab:red", label="validation perplexity")
        lo, hi = min(ppl[1]), max(ppl[1])
        if lo > 0 and hi / lo > 50:
            ax.set_yscale("log")
        ax.set_ylabel("perplexity")
        ax.set_title("Validation perplexity")
    else:
        message = "No evaluation was run" if not history else "No validation metric was recorded"
        no_data(ax, message)
        ax.set_title("Validation metric")
        return fig
    ax.set_xlabel("optimizer step")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def as_matrix(confusion: Sequence[Sequence[int]]) -> np.ndarray:
    rows = [list(r) for r in confusion]
    n = len(rows)
    if n == 0 or any(len(r) != n for r in rows):
        raise ValueError("confusion matrix must be square with at least one class")
    return np.array(rows, dtype=np.int64)


def plain_text(label: str) -> str:
    """Stop matplotlib reading ``$...$`` in a label as math (a stray ``$`` would fail to draw)."""
    return label.replace("$", r"\$")


def confusion_figure(matrix: np.ndarray, names: Sequence[str]) -> Figure:
    n = matrix.shape[0]
    side = min(16.0, max(4.5, 0.45 * n + 2.5))
    fig = Figure(figsize=(side + 1.2, side), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", interpolation="nearest", vmin=0)
    fig.colorbar(image, ax=ax, shrink=0.8)
    tick_size = 10 if n <= 10 else 8 if n <= 20 else 6
    labels = [plain_text(s) for s in names]
    ax.set_xticks(range(n), labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels)
    ax.tick_params(labelsize=tick_size)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title("Confusion matrix")
    if n <= MAX_ANNOTATED_CLASSES:
        cell_size = 11 if n <= 8 else 8 if n <= 15 else 6 if n <= 22 else 5
        threshold = matrix.max() / 2 if matrix.max() > 0 else 1
        for i in range(n):
            for j in range(n):
                count = int(matrix[i, j])
                ax.text(
                    j,
                    i,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=cell_size,
                    color="white" if count > threshold else "black",
                )
    return fig


TASK_METRICS = (
    ("accuracy", "accuracy"),
    ("macro_f1", "macro-F1"),
    ("exact_match", "exact match"),
    ("rouge_l", "ROUGE-L"),
    ("perplexity", "perplexity"),
)


def summary_number(summary: Mapping[str, Any], key: str) -> float | None:
    return finite(summary.get(key))


def task_rows(summary: Mapping[str, Any]) -> list[tuple[str, float | None, float, str]]:
    """(label, before, after, what "before" is) for each task metric the run measured on test
    (a diverged run's NaN included)."""
    # With a warm head every "before" is the frozen model with the probe's head.
    probed = any(str(k).startswith("probe_test_") for k in summary)
    rows = []
    for metric, label in TASK_METRICS:
        value = summary.get(f"test_{metric}")
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            continue
        after = float(value)
        probe = summary_number(summary, f"probe_test_{metric}")
        before = probe if probe is not None else summary_number(summary, f"test_{metric}_before")
        rows.append((label, before, after, "the probe" if probed else "the base"))
    return rows


def before_after_figure(summary: Mapping[str, Any]) -> Figure | None:
    """Bars of each task metric and each knowledge measure, before and after (None when the
    run measured nothing before)."""
    pairs: list[tuple[str, float, float]] = [
        (f"test {label}\n({base})", before, after)
        for label, before, after, base in task_rows(summary)
        if before is not None and math.isfinite(after) and label != "perplexity"
    ]
    para, para0 = (
        summary_number(summary, "paraphrase_top1"),
        summary_number(summary, "paraphrase_top1_before"),
    )
    if para is not None and para0 is not None:
        pairs.append(("paraphrase\nretrieval", para0, para))
    if (cosine := summary_number(summary, "knowledge_cosine")) is not None:
        pairs.append(("embedding\ncosine", 1.0, cosine))
    ppl, ppl0 = (
        summary_number(summary, "reference_perplexity_after"),
        summary_number(summary, "reference_perplexity_before"),
    )
    if ppl is not None and ppl0 is not None:
        pairs.append(("reference text\nperplexity before / after", 1.0, ppl0 / ppl))
    general, general0 = (
        summary_number(summary, "general_after"),
        summary_number(summary, "general_before"),
    )
    if general is not None and general0 is not None:
        pairs.append(("general\nscore", general0, general))
    if not pairs:
        return None
    fig = Figure(figsize=(1.6 + 1.5 * len(pairs), 2.8), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(pairs))
    ax.bar(x - 0.19, [b for _, b, _ in pairs], 0.38, label="before", color="#b8c2d6")
    ax.bar(x + 0.19, [a for _, _, a in pairs], 0.38, label="after", color="#3b6fb6")
    for i, (_, b, a) in enumerate(pairs):
        ax.text(i - 0.19, b, f"{b:.3g}", ha="center", va="bottom", fontsize=7, color="#555")
        ax.text(i + 0.19, a, f"{a:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [name for name, _, _ in pairs], fontsize=8)
    top = max(max(b, a) for _, b, a in pairs)
    ax.set_ylim(0, top * 1.18 if top > 0 else 1)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("before and after tuning", fontsize=9)
    fig.tight_layout()
    return fig


def write_heatmap(
    path: Path, grid: Mapping[tuple[int | None, str], float], title: str = "importance"
) -> Path:
    """Layers × module types, colour = score (log scale), for ``leantune select``."""
    layers = sorted({k[0] for k in grid if k[0] is not None})
    kinds = sorted({k[1] for k in grid if k[0] is not None})
    values = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), v in grid.items():
        if layer is not None:
            values[layers.index(layer), kinds.index(kind)] = v
    fig = Figure(figsize=(1.2 + 0.9 * max(len(kinds), 2), 1.2 + 0.45 * max(len(layers), 2)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = np.log10(np.where(values > 0, values, np.nan))
    image = ax.imshow(shown, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), [plain_text(k) for k in kinds], rotation=35, ha="right")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_ylabel("layer")
    ax.set_title(plain_text(title))
    fig.colorbar(image, ax=ax, label="log10 score")
    fig.tight_layout()
    save_figure(fig, Path(path))
    return Path(path)
