"""Run folders written by leantune before the re-packaging of issue 27 (tests/legacy/, made by
tests/legacy/make_runs.py with the code of that time) still work: the finished run loads,
evaluates, predicts and reports; the interrupted one resumes to the uninterrupted result."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).with_name("legacy")))
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from leantune.cli import app
from leantune.tune import evaluate_run, load_run, make_config, run_tune, write_run_report

LEGACY = Path(__file__).with_name("legacy")


@pytest.fixture
def legacy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of tests/legacy (its paths are relative to it), the working directory."""
    copy = tmp_path / "legacy"
    shutil.copytree(LEGACY, copy)
    monkeypatch.chdir(copy)
    return copy


def test_a_finished_run_from_before_loads_evaluates_predicts_and_reports(legacy: Path) -> None:
    run = Path("runs/finished")
    summary = json.loads((run / "summary.json").read_text())
    saved = load_run(run)
    assert saved.config.model == "model"
    metrics = evaluate_run(run)
    assert metrics["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)
    out = CliRunner().invoke(app, ["predict", str(run), "--text", "goal match team today"])
    assert out.exit_code == 0, out.output
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["label"] in json.loads((run / "labels.json").read_text())
    (run / "report.html").unlink()
    page = write_run_report(run).read_text()
    assert "run folder: finished" in page and f"{summary['test_accuracy']:.4g}" in page


def test_an_interrupted_run_from_before_resumes_to_the_same_result(legacy: Path) -> None:
    import make_runs  # tests/legacy/make_runs.py: the options both runs were made with

    summary = run_tune(make_config(make_runs.OPTIONS | {"name": "stopped"}), resume=True)
    done, finished = Path("runs/stopped"), Path("runs/finished")
    expected = json.loads((finished / "summary.json").read_text())
    assert summary["steps"] == expected["steps"]
    assert summary["test_accuracy"] == expected["test_accuracy"]
    a = json.loads((finished / "history.json").read_text())["curve"]
    b = json.loads((done / "history.json").read_text())["curve"]
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * abs(x)
    ta = load_file(finished / "adapter" / "adapter_model.safetensors")
    tb = load_file(done / "adapter" / "adapter_model.safetensors")
    assert set(ta) == set(tb)
    for key in ta:
        assert torch.norm(ta[key] - tb[key]) <= 1e-5 * torch.norm(ta[key]), key
