"""Issue 13, run folders and checkpoints: nothing a user wrote is lost, no torn state is resumed,
no run ends silently wrong. Test names carry the issue's item numbers (docs/RELIABILITY.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from helpers import snapshot, topic_rows, write_rows
from leantune.cli import app
from leantune.core.errors import LeantuneError
from leantune.train import checkpoint, loop
from leantune.tune import TuneConfig, run_tune
from leantune.tune.runfolder import MARKER, RunFolder

KEYS = ("test_accuracy", "test_loss", "steps", "best_step")


def config(tmp_path: Path, bert_dir: Path, data_file: Path, **over: Any) -> TuneConfig:
    values: dict[str, Any] = dict(
        model=str(bert_dir),
        data=str(data_file),
        runs_dir=str(tmp_path / "runs"),
        name="r1",
        epochs=1,
        batch_size=8,
        eval_every=3,
        reference_examples=0,
        seed=3,
    )
    return TuneConfig(**(values | over))


def cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stderr


class Killed(BaseException):
    """What kill -9 does to the process at that instant (no except clause catches it)."""


def kill_at(
    monkeypatch: pytest.MonkeyPatch, n: int, only_in_checkpoints: bool, checkpoints: int = 99
) -> list[str]:
    """Raise Killed at the n-th file operation (os.replace, os.link, the tensor writes and
    rmtree) within the first ``checkpoints`` checkpoint writes; with ``only_in_checkpoints``
    False, at the n-th os.replace / link outside checkpoint writes (making the run folder,
    writing its files, finishing and switching it in). Returns the log of operations seen."""
    seen: list[str] = []
    inside = [0]
    written = [0]

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*a: Any, **k: Any) -> Any:
            if (
                (inside[0] and written[0] <= checkpoints)
                if only_in_checkpoints
                else not inside[0] and name in ("replace", "link")
            ):
                seen.append(f"{name} {Path(str(a[0])).name if a else ''}")
                if len(seen) == n:
                    raise Killed(seen[-1])
            return fn(*a, **k)

        return wrapped

    save = loop.save_checkpoint

    def in_checkpoint(*a: Any, **k: Any) -> Any:
        inside[0] += 1
        written[0] += 1
        try:
            return save(*a, **k)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(loop, "save_checkpoint", in_checkpoint)
    monkeypatch.setattr(os, "replace", wrap("replace", os.replace))
    monkeypatch.setattr(os, "link", wrap("link", os.link))
    monkeypatch.setattr(checkpoint, "save_file", wrap("save_file", checkpoint.save_file))
    monkeypatch.setattr(checkpoint.shutil, "rmtree", wrap("rmtree", checkpoint.shutil.rmtree))
    return seen


@pytest.fixture(scope="module")
def expected(tmp_path_factory: pytest.TempPathFactory, bert_dir: Path, data_file: Path) -> dict:
    root = tmp_path_factory.mktemp("straight")
    return run_tune(config(root, bert_dir, data_file))


def finish(cfg: TuneConfig, overwrite: bool = False) -> dict[str, Any]:
    """What the user does after a kill: --resume when a checkpoint is there, else run again."""
    folder = RunFolder(cfg.runs_dir, str(cfg.name))
    try:
        return run_tune(cfg, resume=True)
    except LeantuneError as e:
        assert "no checkpoint to resume" in str(e) or "has finished" in str(e), e
    if folder.finished() and not overwrite:
        return json.loads((folder.final / "summary.json").read_text())
    return run_tune(cfg, overwrite=overwrite)


# ---------------------------------------------------------------------------- item 5


def test_item05_kill_at_every_checkpoint_file_operation_then_resume(
    tmp_path: Path, bert_dir: Path, data_file: Path, expected: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill at each file operation of every checkpoint write (the first one, and later ones
    that carry the best weights over and delete their predecessor), in turn: --resume ends
    exactly where the uninterrupted run ends, or refuses (no checkpoint yet) and a plain rerun
    does."""
    n, total = 1, None
    while total is None or n <= total:
        root = tmp_path / f"k{n}"
        cfg = config(root, bert_dir, data_file)
        with monkeypatch.context() as m:
            seen = kill_at(m, n, only_in_checkpoints=True)
            try:
                run_tune(cfg)
                total = len(seen)  # no kill: n went past the last operation
                break
            except Killed:
                pass
        got = finish(cfg)
        assert {k: got[k] for k in KEYS} == {k: expected[k] for k in KEYS}, (n, seen[-1])
        n += 1
    assert total is not None and total >= 7  # two checkpoints, each several operations


# ---------------------------------------------------------------------------- item 1


BAD = {
    "patience 0": {"patience": 0},
    "lr 0": {"lr": 0.0},
    "lr negative": {"lr": -1.0},
    "eval-every 0": {"eval_every": 0},
    "max-steps 0": {"max_steps": 0},
    "warmup-ratio 2": {"warmup_ratio": 2.0},
    "metric bleu": {"metric": "bleu"},
}


@pytest.fixture(scope="module")
def old_run(tmp_path_factory: pytest.TempPathFactory, bert_dir: Path, data_file: Path) -> Path:
    root = tmp_path_factory.mktemp("old")
    run_tune(config(root, bert_dir, data_file, epochs=1))
    return root


@pytest.mark.parametrize("case", sorted(BAD))
def test_item01_overwrite_with_bad_options_leaves_the_old_run_whole(
    old_run: Path, bert_dir: Path, data_file: Path, case: str
) -> None:
    before = snapshot(old_run)
    args = ["tune", "--model", str(bert_dir), "--data", str(data_file), "--name", "r1"]
    args += ["--runs-dir", str(old_run / "runs"), "--epochs", "1", "--overwrite"]
    for key, value in BAD[case].items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    code, err = cli(*args)
    assert code == 2 and err.startswith("leantune: ") and err.count("\n") == 1, err
    assert snapshot(old_run) == before


def test_item01_yaml_value_of_the_wrong_type_leaves_the_old_run_whole(
    old_run: Path, bert_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    before = snapshot(old_run)
    (tmp_path / "bad.yaml").write_text('lr: "abc"\n')
    args = ["tune", "--config", str(tmp_path / "bad.yaml"), "--model", str(bert_dir)]
    args += ["--data", str(data_file), "--name", "r1", "--runs-dir", str(old_run / "runs")]
    code, err = cli(*args, "--overwrite")
    assert code == 2 and "lr" in err and "Traceback" not in err, err
    assert snapshot(old_run) == before


def test_item01_killed_overwrite_leaves_the_old_run_whole(
    tmp_path: Path, bert_dir: Path, data_file: Path, expected: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replace a finished run and kill the new one at every os.replace / link outside its
    checkpoint writes (item 5 covers those), in turn: runs/r1 is always either the old run,
    byte for byte, or the finished new one; what the user does next ends at the right result."""
    root = tmp_path / "w"
    cfg = config(root, bert_dir, data_file)
    old_cfg = config(root, bert_dir, data_file, max_steps=2)
    run_tune(old_cfg)
    old = snapshot(root / "runs" / "r1")
    saved = tmp_path / "saved"
    shutil.copytree(root / "runs", saved)
    n = 1
    while True:
        with monkeypatch.context() as m:
            seen = kill_at(m, n, only_in_checkpoints=False)
            try:
                run_tune(cfg, overwrite=True)
            except Killed:
                pass
            else:
                break
        now = root / "runs" / "r1"
        whole = now.exists() and snapshot(now) == old
        switched = (root / "runs" / ".r1.replaced").exists() or (
            now.exists()
            and json.loads((now / "summary.json").read_text())["steps"] == expected["steps"]
        )
        assert whole or switched, (n, seen[-1])
        got = finish(cfg, overwrite=True)
        assert {k: got[k] for k in KEYS} == {k: expected[k] for k in KEYS}, (n, seen[-1])
        # Back to the old run for the next kill.
        shutil.rmtree(root / "runs")
        shutil.copytree(saved, root / "runs")
        n += 1
    assert n > 10


# ---------------------------------------------------------------------------- item 2


def test_item02_overwrite_deletes_only_what_leantune_wrote(
    tmp_path: Path, bert_dir: Path, data_file: Path
) -> None:
    cfg = config(tmp_path, bert_dir, data_file, epochs=1)
    # A folder with a config.yaml that leantune did not write.
    mine = tmp_path / "runs" / "mine"
    mine.mkdir(parents=True)
    (mine / "config.yaml").write_text("epochs: 1\n")
    (mine / "important.txt").write_text("years of work")
    with pytest.raises(LeantuneError, match="not a leantune run folder"):
        run_tune(config(tmp_path, bert_dir, data_file, name="mine"), overwrite=True)
    assert (mine / "important.txt").read_text() == "years of work"
    # A user file put inside a finished run folder, at the top and deeper.
    run_tune(cfg)
    run = tmp_path / "runs" / "r1"
    assert json.loads((run / MARKER).read_text())["files"]
    (run / "adapter" / "notes.txt").write_text("mine")
    with pytest.raises(LeantuneError, match=r"adapter/notes.txt.*which leantune did not write"):
        run_tune(cfg, overwrite=True)
    assert (run / "adapter" / "notes.txt").read_text() == "mine"
    (run / "adapter" / "notes.txt").unlink()
    assert run_tune(cfg, overwrite=True)["steps"] > 0  # its own files alone: replaced


# ---------------------------------------------------------------------------- item 6


def test_item06_divergence_stops_the_run_with_no_result(
    tmp_path: Path, bert_dir: Path, data_file: Path
) -> None:
    cfg = config(tmp_path, bert_dir, data_file, lr=1e30, max_grad_norm=0.0)
    with pytest.raises(LeantuneError, match=r"training diverged at step \d+.*lower --lr"):
        run_tune(cfg)
    assert not (tmp_path / "runs" / "r1").exists()  # no adapter, no summary: no result
    folder = RunFolder(tmp_path / "runs", "r1")
    # Starting over with a sane rate works; the failed partial folder is not in the way.
    good = run_tune(config(tmp_path, bert_dir, data_file, lr=2e-3), overwrite=folder.resumable())
    assert good["steps"] > 0


def test_item06_diverged_cli_exits_non_zero(
    tmp_path: Path, bert_dir: Path, data_file: Path
) -> None:
    args = ["tune", "--model", str(bert_dir), "--data", str(data_file), "--name", "nan"]
    args += ["--runs-dir", str(tmp_path / "runs"), "--epochs", "1", "--lr", "1e30"]
    code, err = cli(*args, "--max-grad-norm", "0", "--reference-examples", "0")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("leantune: training diverged") and "Traceback" not in err


# ---------------------------------------------------------------------------- item 9


def test_item09_resume_refuses_changed_data(tmp_path: Path, bert_dir: Path) -> None:
    data = write_rows(tmp_path / "d.csv", topic_rows(60))
    cfg = config(tmp_path, bert_dir, data)
    with pytest.MonkeyPatch.context() as m:
        kill_at(m, 5, only_in_checkpoints=True)  # a kill after the first checkpoint
        with pytest.raises(Killed):
            run_tune(cfg)
    assert RunFolder(tmp_path / "runs", "r1").resumable()
    rows = topic_rows(60)
    labels = [r["label"] for r in rows]
    write_rows(data, [r | {"label": y} for r, y in zip(rows, labels[1:] + labels[:1], strict=True)])
    with pytest.raises(LeantuneError, match=r"the data changed since .* resume with the same data"):
        run_tune(cfg, resume=True)


# ---------------------------------------------------------------------------- item 11


@pytest.mark.parametrize("case", ["patience 0", "eval-every 0", "metric bleu", "warmup-ratio 2"])
def test_item11_refused_options_leave_no_folder_in_the_way(
    tmp_path: Path, bert_dir: Path, data_file: Path, case: str
) -> None:
    with pytest.raises(LeantuneError):
        run_tune(config(tmp_path, bert_dir, data_file, **BAD[case]))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert run_tune(config(tmp_path, bert_dir, data_file, epochs=1))["steps"] > 0


def test_item11_kill_before_the_first_checkpoint_then_a_plain_rerun(
    tmp_path: Path, bert_dir: Path, data_file: Path
) -> None:
    cfg = config(tmp_path, bert_dir, data_file, epochs=1)
    with pytest.MonkeyPatch.context() as m:
        kill_at(m, 1, only_in_checkpoints=True)
        with pytest.raises(Killed):
            run_tune(cfg)
    with pytest.raises(LeantuneError, match="no checkpoint to resume"):
        run_tune(cfg, resume=True)
    assert run_tune(cfg)["steps"] > 0  # neither "exists, pass --overwrite" nor stuck


# ---------------------------------------------------------------------------- item 12


@pytest.fixture
def other_process() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_item12_a_second_run_with_the_same_name_is_refused(
    tmp_path: Path, bert_dir: Path, data_file: Path, other_process: int
) -> None:
    cfg = config(tmp_path, bert_dir, data_file, epochs=1)
    lock = RunFolder(tmp_path / "runs", "r1").lock_path
    lock.parent.mkdir(parents=True)
    lock.write_text(str(other_process))
    with pytest.raises(LeantuneError, match=rf"another leantune process \(pid {other_process}\)"):
        run_tune(cfg)
    assert sorted(p.name for p in lock.parent.iterdir()) == [lock.name]  # nothing else written
    # The holder dies (kill -9): its lock is taken over.
    os.kill(other_process, 9)
    os.waitpid(other_process, 0)
    assert run_tune(cfg)["steps"] > 0
    assert not lock.exists()


# ---------------------------------------------------------------------------- item 15


def test_item15_report_is_written_before_the_summary_and_rebuilt_on_demand(
    tmp_path: Path, bert_dir: Path, data_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path, bert_dir, data_file, epochs=1)
    order: list[str] = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append(Path(b).name), real(a, b))[1])
    run_tune(cfg)
    monkeypatch.undo()
    assert order.index("summary.json") > order.index("metrics.jsonl")
    run = tmp_path / "runs" / "r1"
    assert {"report.html", "loss.png", "summary.json"} <= {p.name for p in run.iterdir()}
    assert not (run / "checkpoint").exists()
    (run / "report.html").unlink()
    (run / "loss.png").unlink()
    code, err = cli("report", str(run))
    assert code == 0, err
    assert "test accuracy" in (run / "report.html").read_text().lower()
    assert (run / "loss.png").is_file()
    code, err = cli("report", str(tmp_path / "runs" / "nope"))
    assert code == 2 and "not a finished leantune run" in err


def test_item02_a_run_from_before_markers_is_replaced_only_when_every_file_is_a_run_file(
    tmp_path: Path, bert_dir: Path, data_file: Path
) -> None:
    legacy = tmp_path / "runs" / "r1"
    (legacy / "adapter").mkdir(parents=True)
    for name in ("config.yaml", "summary.json", "report.html", "adapter/adapter_config.json"):
        (legacy / name).write_text("{}")
    (legacy / "important.txt").write_text("mine")
    cfg = config(tmp_path, bert_dir, data_file, max_steps=2)
    with pytest.raises(LeantuneError, match="not a leantune run folder"):
        run_tune(cfg, overwrite=True)
    assert (legacy / "important.txt").read_text() == "mine"
    (legacy / "important.txt").unlink()
    assert run_tune(cfg, overwrite=True)["steps"] == 2
    assert (legacy / MARKER).is_file() and (
        legacy / "adapter" / "adapter_config.json"
    ).read_text() != "{}"


def test_item02_save_adapter_replaces_only_a_folder_of_adapter_files(tmp_path: Path) -> None:
    """The same class of bug in the library: a folder with adapter_config.json and the user's
    own files is not replaced whole."""
    import torch

    from helpers import build
    from leantune import LoraConfig, inject, save_adapter

    model = build("bert")
    inject(model, LoraConfig(r=2, targets=["query"]))
    folder = save_adapter(model, tmp_path / "a")
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(LeantuneError, match=r"holds 'notes\.txt' besides the adapter"):
        save_adapter(model, folder)
    assert (folder / "notes.txt").read_text() == "mine"
    (folder / "notes.txt").unlink()
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    before = (folder / "adapter_model.safetensors").read_bytes()
    save_adapter(model, folder)
    assert (folder / "adapter_model.safetensors").read_bytes() != before
