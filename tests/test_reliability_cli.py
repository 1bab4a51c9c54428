"""Issue 13, output files, config types and sweeps: predict / merge / select never overwrite
what they should not, never write invalid files, and bad values are one line, not a traceback.

One finished tiny run per module, reused by every test; sweeps use a stand-in runner except
where a real refusal by ``run_tune`` is the point."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from helpers import snapshot, tiny_model_folder, topic_rows, write_rows
from leantune.cli import app
from leantune.core.errors import LeantuneError
from leantune.search.sweep import check_space, run_sweep
from leantune.tune import make_config, read_config

TEXTS = ["goal match the team", "bank profit shares today"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """In-process; an uncaught exception shows as exit code 1."""
    res = CliRunner().invoke(app, [str(a) for a in args])
    return subprocess.CompletedProcess(list(args), res.exit_code, res.stdout, res.stderr)


def refused(res: subprocess.CompletedProcess[str], *expected: str) -> None:
    """Exit 2, one line on stderr naming the problem, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert res.stderr.startswith("leantune: ") and res.stderr.count("\n") == 1, res.stderr
    assert "Traceback" not in res.stderr
    for text in expected:
        assert text in res.stderr, res.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model, its data and one finished run on them."""
    root = tmp_path_factory.mktemp("world")
    model = tiny_model_folder(root / "model")
    data = write_rows(root / "topics.jsonl", topic_rows(60))
    res = cli(
        "tune",
        *("--model", model, "--data", data, "--runs-dir", root / "runs", "--name", "r"),
        *("--epochs", "1", "--batch-size", "8", "--layers", "all", "--reference-examples", "0"),
        "--quiet",
    )
    assert res.returncode == 0, res.stderr
    return {"root": root, "model": model, "data": data, "run": root / "runs" / "r"}


def predictions(world: dict[str, Path]) -> list[dict[str, Any]]:
    res = cli("predict", world["run"], "--text", TEXTS[0], "--text", TEXTS[1])
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


# ---------------------------------------------------------------------------- merge


def test_item02_merge_overwrite_replaces_only_its_own_folder(
    world: dict[str, Path], tmp_path: Path
) -> None:
    # A folder with a config.json and the user's own files is not merge's to delete.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    (mine / "thesis.tex").write_text("years of work")
    before = snapshot(mine)
    refused(cli("merge", world["run"], "--out", mine, "--overwrite"), str(mine), "not written by")
    assert snapshot(mine) == before

    out = tmp_path / "merged"
    assert cli("merge", world["run"], "--out", out).returncode == 0
    marker = json.loads((out / ".leantune-merge.json").read_text())
    assert "config.json" in marker["files"] and sorted(marker["files"]) == sorted(
        p.name for p in out.iterdir() if p.name != ".leantune-merge.json"
    )
    refused(cli("merge", world["run"], "--out", out), "--overwrite")
    res = cli("merge", world["run"], "--out", out, "--overwrite")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "mine"]  # no leftovers
    (tmp_path / "link").symlink_to(out, target_is_directory=True)
    refused(cli("merge", world["run"], "--out", tmp_path / "link", "--overwrite"), "link")
    (tmp_path / "link").unlink()
    # A file of the user's put into a merged folder keeps the folder from being replaced.
    (out / "notes.md").write_text("mine")
    before = snapshot(out)
    refused(cli("merge", world["run"], "--out", out, "--overwrite"), "notes.md")
    assert snapshot(out) == before


def test_item03_merge_refuses_the_base_model_and_the_run(
    world: dict[str, Path], tmp_path: Path
) -> None:
    expected = predictions(world)
    before = snapshot(world["root"])
    run, model = world["run"], world["model"]
    for out in (
        model,  # the run's own base model: predict would apply the adapter twice
        model / "sub",
        run,
        run / "adapter",
        run.parent,  # holds the run
        world["root"] / "." / "model",  # the same folder spelled differently
    ):
        refused(cli("merge", run, "--out", out, "--overwrite"), "--out")
    link = tmp_path / "link"
    link.symlink_to(model, target_is_directory=True)
    refused(cli("merge", run, "--out", link, "--overwrite"), "base model")
    assert snapshot(world["root"]) == before
    assert predictions(world) == expected


# ---------------------------------------------------------------------------- predict


def test_item04_predict_out_needs_overwrite_and_never_replaces_its_input(
    world: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "p.jsonl"
    out.write_text("precious\n")
    refused(cli("predict", world["run"], "--text", TEXTS[0], "--out", out), "--overwrite")
    assert out.read_text() == "precious\n"
    res = cli("predict", world["run"], "--text", TEXTS[0], "--out", out, "--overwrite")
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text())["text"] == TEXTS[0]

    source = write_rows(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    before = source.read_bytes()
    for same in (source, tmp_path / "." / "in.jsonl"):
        res = cli("predict", world["run"], "--input", source, "--out", same, "--overwrite")
        refused(res, "--input")
    assert source.read_bytes() == before
    # Nor into the run folder, whose files are the run's.
    metrics = world["run"] / "metrics.jsonl"
    before = metrics.read_bytes()
    refused(cli("predict", world["run"], "--text", "x", "--out", metrics, "--overwrite"), "run")
    assert metrics.read_bytes() == before


def test_item06_predict_never_writes_nan(world: dict[str, Path], tmp_path: Path) -> None:
    # A copy of the run whose base model holds a NaN weight: its scores are NaN.
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    weights = load_file(str(model / "model.safetensors"))
    name = next(k for k in weights if k.endswith("embeddings.LayerNorm.weight"))
    weights[name][0] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(config | {"model": str(model)}))

    res = cli("predict", run, "--text", TEXTS[0])
    refused(res)
    assert "NaN" not in res.stdout
    out = tmp_path / "p.jsonl"
    refused(cli("predict", run, "--text", TEXTS[0], "--out", out))
    assert not out.exists()


def test_item13_predict_out_into_a_missing_folder_creates_it(
    world: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "new" / "deeper" / "p.jsonl"
    res = cli("predict", world["run"], "--text", TEXTS[0], "--out", out)
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text())["text"] == TEXTS[0]
    assert [p.name for p in out.parent.iterdir()] == ["p.jsonl"]  # no temporary files left


def test_item14_predict_out_format_follows_the_extension(
    world: dict[str, Path], tmp_path: Path
) -> None:
    expected = predictions(world)
    args = ["predict", world["run"], "--text", TEXTS[0], "--text", TEXTS[1]]
    res = cli(*args, "--out", tmp_path / "p.csv")
    assert res.returncode == 0, res.stderr
    with (tmp_path / "p.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["text"] for r in rows] == TEXTS
    assert [r["label"] for r in rows] == [p["label"] for p in expected]
    assert [float(r["score"]) for r in rows] == [p["score"] for p in expected]
    assert cli(*args, "--out", tmp_path / "p.jsonl").returncode == 0
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == expected
    for bad in ("p.txt", "p.json", "p"):
        refused(cli(*args, "--out", tmp_path / bad), ".csv", ".jsonl")
        assert not (tmp_path / bad).exists()


# ---------------------------------------------------------------------------- merge / select


def test_item13_merge_out_naming_a_file_is_one_line(world: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"mine")
    for overwrite in ([], ["--overwrite"]):
        refused(cli("merge", world["run"], "--out", target, *overwrite), "is a file")
    assert target.read_bytes() == b"mine"


def test_item13_select_out_into_a_missing_folder_creates_it(
    world: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "sel" / "plan.json"
    res = cli(
        "select", "--model", world["model"], "--data", world["data"], "--budget", "1%", "--out", out
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text()) and out.with_suffix(".png").is_file()


# ---------------------------------------------------------------------------- config types


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ('lr: "abc"\n', "lr: 'abc' is not a number"),
        ("lr: .nan\n", "lr"),
        ("alpha: .inf\n", "alpha"),
        ("l2: .nan\n", "l2"),
        ("epochs: 1.5\n", "epochs: 1.5 is not a whole number"),
        ("epochs: true\n", "epochs"),
        ("r: [8]\n", "r"),
        ("dora: maybe\n", "dora"),
        ("targets: {a: 1}\n", "targets"),
    ],
)
def test_item13_config_values_of_the_wrong_type_are_one_line(
    world: dict[str, Path], tmp_path: Path, yaml_text: str, expected: str
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    tiny = ["--model", world["model"], "--data", world["data"], "--max-steps", "1"]
    res = cli("tune", "--config", path, *tiny, "--runs-dir", tmp_path / "runs", "--quiet")
    refused(res, str(path), expected)
    assert not (tmp_path / "runs").exists()


def test_item13_config_types_in_python_and_friendly_conversions() -> None:
    with pytest.raises(LeantuneError, match="lr: 'abc' is not a number; give a number like"):
        make_config({"lr": "abc"})
    with pytest.raises(LeantuneError, match="r: True is not a whole number"):
        make_config({"r": True})
    with pytest.raises(LeantuneError, match="max_grad_norm: nan is not a finite number"):
        make_config({"max_grad_norm": float("nan")})
    cfg = make_config({"alpha": 16, "epochs": 3.0, "budget": 68000, "lr": None})
    assert cfg.alpha == 16.0 and isinstance(cfg.alpha, float)
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.budget == "68000" and cfg.lr is None


def test_item13_read_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("warmup_ratio: zero\n")
    with pytest.raises(LeantuneError, match=rf"{path}: warmup_ratio: 'zero' is not a number"):
        read_config(path)


# ---------------------------------------------------------------------------- sweep


def fake_runner(log: list[str], refuse: Any = lambda cfg: None) -> Any:
    def run(cfg: Any, resume: bool, overwrite: bool, on_validation: Any) -> dict[str, Any]:
        log.append(str(cfg.name))
        reason = refuse(cfg)
        if reason:
            raise LeantuneError(reason)
        value = 1.0 - abs(cfg.lr - 3e-3)
        on_validation({"step": 10.0, "epoch": 1.0, "val_accuracy": value})
        return {"best_val_accuracy": value, "test_accuracy": value}

    return run


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"patience": {"low": 0, "high": 3}}, "patience: 0"),
        ({"eval_every": {"choices": [0]}}, "eval_every: 0"),
        ({"lr": {"choices": ["abc"]}}, "lr: 'abc' is not a number"),
        ({"lr": {"low": 1e-3, "high": float("inf")}}, "lr"),
        ({"r": {"low": 2.0, "high": 8.5}}, "r: 8.5 is not a whole number"),
        ({"schedule": {"choices": ["linear", "wavy"]}}, "'wavy'"),
        ({"method": {"choices": ["lora", "adalora"]}}, "'adalora'"),
    ],
)
def test_item10_space_refuses_values_the_config_refuses(
    tmp_path: Path, space: dict[str, Any], expected: str
) -> None:
    with pytest.raises(LeantuneError, match=r"^space: ") as err:
        check_space(space)
    assert expected in str(err.value) and "\n" not in str(err.value)
    log: list[str] = []
    with pytest.raises(LeantuneError):
        run_sweep({}, space, tmp_path / "sw", 2, runner=fake_runner(log))
    assert log == [] and not (tmp_path / "sw").exists()
    # The same space from a file through the command: one line, nothing written.
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    res = cli("sweep", "--space", path, "--out", tmp_path / "sw", "--quiet")
    refused(res, str(path), expected)
    assert not (tmp_path / "sw").exists()


def test_item10_space_is_checked_with_the_common_options(tmp_path: Path) -> None:
    # L2 penalizes the LoRA update, which DoRA's is not: fine alone, refused with dora fixed.
    space = {"l2": {"choices": [0.0, 1e-3]}}
    check_space(space)
    with pytest.raises(LeantuneError, match=r"space: l2: 0.001 is refused: .*DoRA"):
        check_space(space, common={"dora": True})
    with pytest.raises(LeantuneError, match="l2"):
        run_sweep({"dora": True}, space, tmp_path / "sw", 2)
    assert not (tmp_path / "sw").exists()
    # The metric is the sweep's objective, set for all trials, not searched.
    with pytest.raises(LeantuneError, match="metric is what the sweep optimizes"):
        check_space({"metric": {"choices": ["accuracy", "loss"]}})


def test_item10_a_trial_refused_by_tune_fails_and_the_sweep_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    space = {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "r": {"choices": [2, 4]}}
    log: list[str] = []

    def refuse(cfg: Any) -> str | None:
        return "r 4 does not fit this model; use a smaller --r" if cfg.r == 4 else None

    result = run_sweep({}, space, out, 6, runner=fake_runner(log, refuse))
    assert len(log) == 6 and result["finished"] == 6
    states = {t["number"]: t["state"] for t in result["trials"]}
    assert "RUNNING" not in states.values()
    failed = [t for t in result["trials"] if t["state"] == "FAIL"]
    assert failed and all(t["params"]["r"] == 4 for t in failed)
    assert all(t["error"] == "r 4 does not fit this model; use a smaller --r" for t in failed)
    assert all(t["params"]["r"] == 2 for t in result["trials"] if t["state"] == "COMPLETE")
    # Run again: nothing is retried, nothing stuck.
    again = run_sweep({}, space, out, 6, runner=fake_runner(log, refuse))
    assert len(log) == 6 and again["trials"] == result["trials"]


def test_item10_real_refusal_by_tune_is_recorded_not_stuck(
    world: dict[str, Path], tmp_path: Path
) -> None:
    common = {
        "model": str(world["model"]),
        "data": str(world["data"]),
        "epochs": 1,
        "batch_size": 8,
    }
    out = tmp_path / "sw"
    space = tmp_path / "space.yaml"
    space.write_text("layers: {choices: ['7-9']}\n")  # the tiny model has layers 0-2
    config = tmp_path / "common.yaml"
    config.write_text(yaml.safe_dump(common))
    args = ["sweep", "--config", config, "--space", space, "--out", out, "--trials", "2", "--quiet"]
    res = cli(*args)
    refused(res, "no trial completed", "layers 0-2")
    trials = json.loads((out / "trials.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["FAIL", "FAIL"]
    assert all("layers 0-2" in t["error"] for t in trials)
    # The same command again does not retry them: the same one line, no new trial.
    refused(cli(*args), "no trial completed")
    assert len(json.loads((out / "trials.json").read_text())["trials"]) == 2


def test_item04_select_out_needs_overwrite_to_replace_a_plan(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """The same class as predict --out: a plan (maybe edited by hand) is not replaced silently."""
    out = tmp_path / "plan.json"
    out.write_text('{"edited": "by hand"}')
    args = [
        "select",
        "--model",
        str(world["model"]),
        "--data",
        str(world["data"]),
        "--out",
        str(out),
    ]
    res = CliRunner().invoke(app, [*args, "--budget", "1%"])
    assert res.exit_code == 2 and "exists; pass --overwrite" in res.stderr
    assert out.read_text() == '{"edited": "by hand"}'
    res = CliRunner().invoke(app, [*args, "--budget", "1%", "--overwrite"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(out.read_text())["entries"]
