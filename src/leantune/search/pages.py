"""The pages of many runs: ``leantune compare``'s (table, Pareto plots, recommendation) and
``leantune sweep``'s (trials plot, best trial), built with :mod:`leantune.tune.html`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from leantune.tune.figures import no_data, plain_text
from leantune.tune.html import (
    cell,
    escaped,
    figure_html,
    finite,
    key_value_table,
    page,
    save_figure,
    write_atomic,
)

REPORT_HTML = "report.html"


PARETO_PARAMS_PNG = "pareto_params.png"
PARETO_TIME_PNG = "pareto_time.png"
SWEEP_PNG = "trials.png"


def _pareto_figure(
    rows: Sequence[Mapping[str, Any]], cost: str, metric: str, front: Sequence[str], xlabel: str
) -> Figure:
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = [
        (float(r[cost]), float(r[metric]), str(r["strategy"]))
        for r in rows
        if finite(r.get(cost)) is not None and finite(r.get(metric)) is not None
    ]
    if not points:
        no_data(ax, "no finished strategy")
        return fig
    # Labels alternate above and below their points in metric order, so neighbours overlap less.
    ranked = sorted(range(len(points)), key=lambda i: points[i][1])
    for rank, i in enumerate(ranked):
        x, y, name = points[i]
        on = name in front
        ax.scatter([x], [y], s=40, color="C0" if on else "C7", zorder=3)
        offset = (5, 4) if rank % 2 == 0 else (5, -11)
        ax.annotate(plain_text(name), (x, y), textcoords="offset points", xytext=offset, fontsize=8)
    line = sorted((x, y) for x, y, name in points if name in front)
    if len(line) > 1:
        ax.plot([p[0] for p in line], [p[1] for p in line], color="C0", lw=1, zorder=2)
    if cost == "trainable_params" and min(p[0] for p in points) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(plain_text(metric.replace("_", " ")))
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
    save_figure(
        _pareto_figure(
            rows, "trainable_params", metric, fronts["trainable_params"], "trainable parameters"
        ),
        folder / PARETO_PARAMS_PNG,
    )
    save_figure(
        _pareto_figure(rows, "train_seconds", metric, fronts["train_seconds"], "training seconds"),
        folder / PARETO_TIME_PNG,
    )
    columns = ["strategy", metric, *[k for k in rows[0] if k not in ("strategy", metric)]]
    head = "".join(f"<th>{escaped(c)}</th>" for c in columns)
    body = []
    for r in rows:
        name = str(r["strategy"])
        link = (
            f'<td><a href="{escaped(name)}/{REPORT_HTML}">{escaped(name)}</a></td>'
            if (folder / name / REPORT_HTML).exists()
            else f"<td>{escaped(name)}</td>"
        )
        body.append("<tr>" + link + "".join(cell(c, r.get(c)) for c in columns[1:]) + "</tr>")
    table = (
        '<div class="scroll"><table class="compare">\n'
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody></table></div>"
    )
    text = page(
        "leantune comparison",
        [
            f'<p class="muted">folder: {escaped(folder.name)}; {len(rows)} strategies</p>',
            f'<p class="headline"><b>Recommendation:</b> {escaped(result["recommendation"])}</p>',
            "<h2>Strategies</h2>",
            table,
            "<h2>Metric against trainable parameters</h2>",
            figure_html(PARETO_PARAMS_PNG, "test metric against trainable parameters"),
            "<h2>Metric against training time</h2>",
            figure_html(PARETO_TIME_PNG, "test metric against training seconds"),
        ],
    )
    out = folder / REPORT_HTML
    write_atomic(out, text.encode("utf-8"))
    return out


def _trials_figure(trials: Sequence[Mapping[str, Any]], metric: str, higher: bool) -> Figure:
    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    done = [t for t in trials if finite(t.get("value")) is not None]
    if not done:
        no_data(ax, "no finished trial")
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
    ax.set_ylabel(plain_text(f"validation {metric} (pruned: last reported)"))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_sweep_report(folder: Path, result: Mapping[str, Any]) -> Path:
    """trials.png and report.html for a sweep folder."""
    folder = Path(folder)
    trials = result["trials"]
    save_figure(
        _trials_figure(trials, result["metric"], result["higher_is_better"]), folder / SWEEP_PNG
    )
    params = sorted({k for t in trials for k in t["params"]})
    columns = ["number", "state", "value", *params]
    head = "".join(f"<th>{escaped(c)}</th>" for c in columns)
    body = []
    for t in trials:
        cells = [
            cell("number", t["number"]),
            cell("state", t["state"]),
            cell("value", t["value"]),
        ]
        cells += [cell(p, t["params"].get(p)) for p in params]
        body.append("<tr>" + "".join(cells) + "</tr>")
    table = (
        '<div class="scroll"><table class="trials">\n'
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody></table></div>"
    )
    best = result.get("best")
    text = page(
        "leantune sweep",
        [
            f'<p class="muted">folder: {escaped(folder.name)}; {len(trials)} trials</p>',
            '<p class="headline"><b>Best:</b> '
            + (
                escaped(
                    f"trial {best['number']}, validation {result['metric']} {best['value']:.4f}"
                )
                + " (best.yaml)"
                if best
                else "no trial finished"
            )
            + "</p>",
            "<h2>Trials</h2>",
            figure_html(SWEEP_PNG, "validation metric per trial"),
            table,
        ]
        + (["<h2>Best configuration</h2>", key_value_table(best["config"])] if best else []),
    )
    out = folder / REPORT_HTML
    write_atomic(out, text.encode("utf-8"))
    return out
