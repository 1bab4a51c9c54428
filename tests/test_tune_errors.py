"""Bad input to ``leantune tune`` and friends: one line on stderr, exit 2, no traceback, and
nothing on disk destroyed or half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import snapshot, tiny_model_folder, topic_rows, write_rows
from leantune.cli import app


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """In-process (fast); an uncaught exception shows as exit code 1 and fails the test."""
    res = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(list(args), res.exit_code, res.stdout, res.stderr)


def test_bad_input_from_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "leantune.cli", "tune", "--data", str(tmp_path / "no.csv")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == f"leantune: data file {tmp_path / 'no.csv'} does not exist\n"
    assert list(tmp_path.iterdir()) == []  # no runs/ folder made


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world")
    tiny_model_folder(root / "model")
    rows = topic_rows(30)
    write_rows(root / "train.jsonl", rows)
    write_rows(root / "odd_label.csv", [{"text": "goal team", "label": "weather"}, *rows[:5]])
    (root / "empty.csv").write_text("text,label\n")
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "weights.bin").write_bytes(b"\x00" * 16)
    run = root / "runs" / "existing"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("epochs: 1\n")
    (run / "summary.json").write_text('{"test_accuracy": 0.97}\n')
    return root


CASES = {
    "missing data file": (["--data", "{root}/nope.csv"], "nope.csv does not exist"),
    "missing column": (["--text-column", "body"], "has no column 'body'"),
    "eval label never seen in training": (
        ["--eval-data", "{root}/odd_label.csv"],
        "label 'weather' never seen in training",
    ),
    "empty dataset": (["--data", "{root}/empty.csv"], "holds no rows"),
    "model folder that is not a transformers model": (
        ["--model", "{root}/not_a_model"],
        "is not a transformers model folder",
    ),
    "missing model folder": (["--model", "{root}/nowhere"], "does not exist"),
    "existing run folder": (["--name", "existing"], "exists; pass --overwrite"),
    "unknown method": (["--method", "adalora"], "--method 'adalora' is unknown"),
    "bad split": (["--split", "0.5,0.5"], "three fractions"),
    "bad layers": (["--layers", "7-9"], "the model has layers 0-2"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tune_bad_input(world: Path, case: str) -> None:
    args, expected = CASES[case]
    base = ["--model", f"{world}/model", "--data", f"{world}/train.jsonl"]
    base += ["--runs-dir", f"{world}/runs", "--name", "new", "--epochs", "1"]
    before = snapshot(world)
    res = cli("tune", *base, *[a.format(root=world) for a in args])
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith("leantune: ") and res.stderr.count("\n") == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert expected in res.stderr
    assert snapshot(world) == before  # nothing destroyed, nothing half-written
    assert not (world / "runs" / "new").exists()


def test_overwrite_refuses_a_folder_that_is_not_a_run(world: Path, tmp_path: Path) -> None:
    precious = tmp_path / "runs" / "mine"
    precious.mkdir(parents=True)
    (precious / "thesis.tex").write_text("years of work")
    args = ["--model", f"{world}/model", "--data", f"{world}/train.jsonl"]
    res = cli("tune", *args, "--runs-dir", str(tmp_path / "runs"), "--name", "mine", "--overwrite")
    assert res.returncode == 2 and "not a leantune run folder" in res.stderr
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_saved_run_commands_bad_input(world: Path, tmp_path: Path) -> None:
    for args, expected in (
        (["eval", str(tmp_path / "none")], "not a leantune run folder"),
        (["predict", str(world / "runs" / "existing")], "give texts with --text"),
        (["merge", str(world), "--out", str(tmp_path / "m")], "not a leantune run folder"),
        (["tune", "--config", str(tmp_path / "missing.yaml")], "cannot read config"),
        (["tune", "--runs-dir", str(world / "runs"), "--name", "existing", "--resume"], "finished"),
        (["tune", "--name", "x", "--resume", "--lr", "0.1"], "drop --lr"),
    ):
        res = cli(*args)
        assert res.returncode == 2, res.stderr
        assert res.stderr.count("\n") == 1 and expected in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


def test_config_file_with_unknown_option(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 1\nlearning_rate: 0.1\n")
    res = cli("tune", "--config", str(path))
    assert res.returncode == 2
    assert "unknown option 'learning_rate'" in res.stderr and res.stderr.count("\n") == 1
