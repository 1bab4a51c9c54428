"""The HTML and file helpers of leantune's pages (the run report, the compare and sweep pages):
a page with inline CSS and no script, escaped text, human number formats, tables, and
writing files and figures atomically (a temporary name, then ``os.replace``). Figures are
drawn on :class:`matplotlib.figure.Figure` with the Agg canvas, never through ``pyplot``."""

from __future__ import annotations

import html
import io
import json
import math
import numbers
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110

CSS = """
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


def write_atomic(path: Path, data: bytes) -> None:
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


def save_figure(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    try:
        FigureCanvasAgg(fig).print_png(buf)
    finally:
        fig.clear()  # free the artists now rather than when the figure is collected
    write_atomic(path, buf.getvalue())


def finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def fmt_number(value: numbers.Real) -> str:
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    f = float(value)
    if not math.isfinite(f):
        return str(f)
    if abs(f) >= 1e4:
        return f"{f:,.0f}"
    return f"{f:.4g}"


def fmt_bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.4g} {unit}"
    return f"{value:.4g} B"


def format_value(key: str, value: Any) -> str:
    """``value`` as shown in the report (plain text, not yet HTML-escaped).

    Integers get thousands separators, floats 4 significant digits, ``*_bytes`` numbers also a
    KB/MB/GB size, mappings and lists are JSON.
    """
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, numbers.Real):
        text = fmt_number(value)
        size = float(value)
        if key.endswith("_bytes") and math.isfinite(size):
            text = f"{round(size):,} B ({fmt_bytes(size)})"
        return text
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


def escaped(text: object) -> str:
    return html.escape(str(text), quote=True)


def cell(key: str, value: Any) -> str:
    text = format_value(key, value)
    numeric = isinstance(value, numbers.Real) and not isinstance(value, bool)
    cls = ' class="num"' if numeric else ""
    if isinstance(value, Mapping | list | tuple):
        return f"<td><pre>{escaped(text)}</pre></td>"
    return f"<td{cls}>{escaped(text)}</td>"


def key_value_table(data: Mapping[str, Any]) -> str:
    rows = [f"<tr><th>{escaped(k)}</th>{cell(str(k), v)}</tr>" for k, v in data.items()]
    return '<table class="kv">\n' + "\n".join(rows) + "\n</table>"


def history_table(history: Sequence[Mapping[str, float]]) -> str:
    columns: list[str] = []
    for row in history:
        for key in row:
            if key not in columns:
                columns.append(key)
    head = "".join(f"<th>{escaped(c)}</th>" for c in columns)
    body = []
    for row in history:
        cells = "".join(cell(c, row[c]) if c in row else "<td></td>" for c in columns)
        body.append(f"<tr>{cells}</tr>")
    return (
        '<div class="scroll"><table class="history">\n'
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody></table></div>"
    )


def figure_html(name: str, alt: str) -> str:
    return f'<img src="{escaped(name)}" alt="{escaped(alt)}">'


def page(title: str, body: Sequence[str]) -> str:
    head = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escaped(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{escaped(title)}</h1>",
    ]
    return "\n".join([*head, *body, "</body>", "</html>", ""])
