"""leantune sweep: Optuna study in SQLite, pruning, resume after kill -9, best.yaml, report,
and bad input. Most tests use a stand-in runner (the trial's summary from its parameters), one
runs real trials on a tiny saved BERT."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers import tiny_model_folder, topic_rows, write_rows
from leantune.cli import app
from leantune.core.errors import LeantuneError
from leantune.search.sweep import check_space, read_space, run_sweep
from leantune.tune import make_config, read_config, run_tune

SPACE = {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "r": {"choices": [2, 4, 8]}}


def fake_runner(log: list[str], values: list[float] | None = None) -> Any:
    """Reports one validation per epoch (2 epochs); the value is values[call] or from lr."""

    def run(cfg: Any, resume: bool, overwrite: bool, on_validation: Any) -> dict[str, Any]:
        i = len(log)
        log.append(str(cfg.name))
        value = values[i] if values else 1.0 - abs(cfg.lr - 3e-3)
        Path(cfg.runs_dir, str(cfg.name)).mkdir(parents=True, exist_ok=True)
        for epoch in (1, 2):
            on_validation({"step": epoch * 10.0, "epoch": float(epoch), "val_accuracy": value})
        return {"best_val_accuracy": value, "test_accuracy": value}

    return run


def test_trials_finish_best_is_written_and_report_shows_them(tmp_path: Path) -> None:
    log: list[str] = []
    out = tmp_path / "sw"
    result = run_sweep({"epochs": 2}, SPACE, out, 5, runner=fake_runner(log))
    assert log == [f"trial-{i:03d}" for i in range(5)]
    assert result["finished"] == 5 and len(result["trials"]) == 5
    best = result["best"]
    assert best["value"] == max(t["value"] for t in result["trials"] if t["state"] == "COMPLETE")
    cfg = make_config(read_config(out / "best.yaml"))  # leantune tune --config best.yaml
    assert cfg.lr == best["params"]["lr"] and cfg.r == best["params"]["r"] and cfg.epochs == 2
    html = (out / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    assert images == ["trials.png"]
    with Image.open(out / "trials.png") as im:
        im.load()
    assert json.loads((out / "trials.json").read_text())["finished"] == 5
    assert not (out / "sweep.lock").exists()
    # Asking for 5 again runs nothing; asking for 7 runs two more, numbered on.
    run_sweep({"epochs": 2}, SPACE, out, 5, runner=fake_runner(log))
    assert len(log) == 5
    run_sweep({"epochs": 2}, SPACE, out, 7, runner=fake_runner(log))
    assert log[5:] == ["trial-005", "trial-006"]


def test_a_trial_below_the_median_is_pruned(tmp_path: Path) -> None:
    log: list[str] = []
    values = [0.9, 0.8, 0.85, 0.1, 0.95]
    result = run_sweep({}, SPACE, tmp_path / "sw", 5, runner=fake_runner(log, values))
    states = [t["state"] for t in result["trials"]]
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    assert result["pruned"] == 1 and result["finished"] == 5
    assert result["trials"][3]["value"] == 0.1  # the last value it reported


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from leantune.tune.runfolder import RunFolder
    from leantune.search.sweep import run_sweep

    out = Path(sys.argv[1])
    calls = []

    def run(cfg, resume, overwrite, on_validation):
        calls.append(cfg.name)
        RunFolder(cfg.runs_dir, cfg.name).begin(resume=False)  # as a started run leaves
        on_validation({"step": 10.0, "epoch": 1.0, "val_accuracy": 1 - cfg.lr})
        if len(calls) == 3:  # mid-trial, the third one
            os.kill(os.getpid(), signal.SIGKILL)
        return {"best_val_accuracy": 1 - cfg.lr}

    run_sweep({}, {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}, out, 12, runner=run)
    """
)


def test_sweep_survives_kill_9_and_resumes_without_repeating(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(out)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert (out / "sweep.lock").exists()  # left behind by the killed process
    assert (out / ".trial-002.partial").exists()
    log: list[str] = []
    space = {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}
    result = run_sweep({}, space, out, 12, runner=fake_runner(log))
    trials = result["trials"]
    finished = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]
    assert len(finished) == 12 and result["finished"] == 12
    assert [t["state"] for t in trials if t["state"] not in ("COMPLETE", "PRUNED")] == ["FAIL"]
    # The two finished before the kill were not run again: ten new runs, the first retrying
    # the killed trial's parameters.
    assert len(log) == 10
    assert trials[3]["retry_of"] == 2 and trials[3]["params"] == trials[2]["params"]
    lrs = [t["params"]["lr"] for t in finished]
    assert len(set(lrs)) == len(lrs)  # no parameters drawn twice
    assert not (out / ".trial-002.partial").exists()  # the killed trial's partial run is gone


def test_real_trials_on_a_tiny_model(tmp_path: Path) -> None:
    model = tiny_model_folder(tmp_path / "bert")
    data = write_rows(tmp_path / "topics.jsonl", topic_rows(60))
    common = {
        "model": str(model),
        "data": str(data),
        "batch_size": 8,
        "epochs": 2,
        "layers": "all",
        "reference_examples": 0,
    }
    seen: list[dict[str, float]] = []

    def runner(cfg: Any, **kw: Any) -> dict[str, Any]:
        def spy(row: dict[str, float]) -> None:
            seen.append(row)
            kw["on_validation"](row)

        return run_tune(cfg, resume=kw["resume"], overwrite=kw["overwrite"], on_validation=spy)

    out = tmp_path / "sw"
    result = run_sweep(common, {"lr": {"choices": [5e-3, 1e-2]}}, out, 2, runner=runner)
    assert result["finished"] == 2
    assert [r["epoch"] for r in seen] == [1.0, 2.0, 1.0, 2.0]
    for t in result["trials"]:
        summary = json.loads((out / t["run"] / "summary.json").read_text())
        assert t["value"] == summary["best_val_accuracy"]
    # Resumed with a larger target: the two finished trials stay, one more runs.
    again = run_sweep(common, {"lr": {"choices": [5e-3, 1e-2]}}, out, 3, runner=runner)
    assert len(seen) == 6 and [t["number"] for t in again["trials"]] == [0, 1, 2]
    assert again["trials"][:2] == result["trials"]


def test_bad_spaces_and_folders(tmp_path: Path) -> None:
    with pytest.raises(LeantuneError, match=r"lr: the range \[0.01, 0.001\] is empty"):
        check_space({"lr": {"low": 1e-2, "high": 1e-3}})
    with pytest.raises(LeantuneError, match=r"r: the range \[4, 4\] is empty"):
        check_space({"r": {"low": 4, "high": 4}})
    with pytest.raises(LeantuneError, match="choices is empty"):
        check_space({"r": {"choices": []}})
    with pytest.raises(LeantuneError, match="'rank' is not a tune option"):
        check_space({"rank": {"choices": [2]}})
    with pytest.raises(LeantuneError, match="log range needs low > 0"):
        check_space({"l2": {"low": 0.0, "high": 1.0, "log": True}})
    log: list[str] = []
    data = write_rows(tmp_path / "a.jsonl", topic_rows(30))
    run_sweep({"data": str(data)}, SPACE, tmp_path / "sw", 1, runner=fake_runner(log))
    other = write_rows(tmp_path / "b.jsonl", topic_rows(30, seed=3))
    with pytest.raises(LeantuneError, match=r"made for another sweep .*data, data_sha256 differ"):
        run_sweep({"data": str(other)}, SPACE, tmp_path / "sw", 1, runner=fake_runner(log))
    with pytest.raises(LeantuneError, match=r"space differ"):
        run_sweep({"data": str(data)}, {"r": {"choices": [2]}}, tmp_path / "sw", 1)


def test_the_documented_space_parses() -> None:
    space = read_space(Path(__file__).parent.parent / "docs/examples/space.yaml")
    assert {"lr", "budget", "ewc"} <= set(space)


def test_cli_bad_space_is_one_line(tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("lr: {low: 0.01, high: 0.001}\n")
    res = CliRunner().invoke(app, ["sweep", "--space", str(space), "--out", str(tmp_path / "s")])
    assert res.exit_code == 2
    assert res.stderr.startswith("leantune: ") and "range [0.01, 0.001] is empty" in res.stderr
    assert res.stderr.count("\n") == 1
    assert not (tmp_path / "s").exists()
