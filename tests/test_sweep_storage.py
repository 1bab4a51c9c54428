"""Shared Optuna studies (--storage): sweep and compare workers on one study in PostgreSQL.

A module fixture starts a real PostgreSQL server in a temporary folder (skipped only when its
binaries are missing); the URL carries a password, so the tests also check that it is never
printed or written. URL handling and a refused joining worker need no server (SQLite)."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import tiny_model_folder, topic_rows, write_rows
from leantune.core.errors import LeantuneError
from leantune.search.study import driver_url, mask_url, open_study

PASSWORD = "s3cret"
SPACE = {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "r": {"choices": [2, 4, 8]}}


def _pg_bin() -> Path | None:
    """The folder holding initdb, pg_ctl and createdb: initdb's own (links on PATH followed),
    or Debian's /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += [Path(d) for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in candidates:
        if all((folder / tool).exists() for tool in ("initdb", "pg_ctl", "createdb")):
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL server of its own on 127.0.0.1; yields a URL with user and password."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("postgresql binaries not found: install postgresql")
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="leantune-pg-"))
    root.chmod(0o755)
    (root / "pw").write_text(PASSWORD + "\n")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: the server runs as the postgres user
        user = pwd.getpwnam("postgres")
        for path in (root, root / "pw"):
            os.chown(path, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]

    def pg(tool: str, *args: str) -> None:
        proc = subprocess.run(
            [*as_user, str(bindir / tool), *args], capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr[-2000:]}")

    data, port = root / "data", _free_port()
    pg("initdb", "-D", str(data), "-U", "leantune", f"--pwfile={root / 'pw'}", "-E", "UTF8")
    hba = data / "pg_hba.conf"  # the socket for setting up, a password over TCP
    hba.write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
    settings = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg("pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-o", settings, "start")
    try:
        pg("createdb", "-h", str(root), "-p", str(port), "-U", "leantune", "studies")
        yield f"postgresql://leantune:{PASSWORD}@127.0.0.1:{port}/studies"
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Options for a fast real run: the tiny BERT, 60 topic rows, one epoch."""
    root = tmp_path_factory.mktemp("task")
    model = tiny_model_folder(root / "bert")
    data = write_rows(root / "topics.jsonl", topic_rows(60))
    return ["--model", str(model), "--data", str(data), "--batch-size", "8", "--epochs", "1"]


def leantune(*args: str, heartbeat: str = "2,20") -> subprocess.Popen[str]:
    """``leantune <args>`` in a process of its own."""
    env = os.environ | {"LEANTUNE_HEARTBEAT": heartbeat, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "leantune.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def trials_of(url: str, name: str) -> list[Any]:
    import optuna

    return optuna.load_study(study_name=name, storage=driver_url(url)).get_trials()


def no_password_under(*folders: Path) -> None:
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                assert PASSWORD.encode() not in path.read_bytes(), path


def ran(trials: list[Any]) -> list[Any]:
    """Trials that were not given back without running."""
    return [t for t in trials if not {"surplus", "duplicate_of"} & set(t.user_attrs)]


# ---------------------------------------------------------------------------- no server


def test_urls_are_masked_and_postgresql_means_psycopg_3(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    url = f"postgresql://leantune:{PASSWORD}@db.example:5432/studies"
    assert driver_url(url) == f"postgresql+psycopg://leantune:{PASSWORD}@db.example:5432/studies"
    assert driver_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert driver_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert driver_url("sqlite:///x.db") == "sqlite:///x.db"
    assert mask_url(url) == "postgresql://leantune:***@db.example:5432/studies"
    assert mask_url("not a url://u:pw@h") == "not a url://u:***@h"
    with pytest.raises(LeantuneError) as e:  # nothing listens on port 1
        open_study(f"postgresql://leantune:{PASSWORD}@127.0.0.1:1/studies", "x", True, (1, 3))
    message = str(e.value)
    assert message.startswith("--storage postgresql://leantune:***@127.0.0.1:1/studies: cannot")
    assert "check the URL and that the server is running" in message and PASSWORD not in message
    assert "\n" not in message
    from typer.testing import CliRunner

    from leantune.cli import app

    res = CliRunner().invoke(
        app, ["sweep", "--storage", "postgresql://u:s3cret@127.0.0.1:1/db", "--out", str(out)]
    )
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and PASSWORD not in res.stderr
    assert res.stderr.startswith("leantune: --storage postgresql://u:***@127.0.0.1:1/db: cannot")
    assert not out.exists()


def fake_runner(cfg: Any, resume: bool, overwrite: bool, on_validation: Any) -> dict[str, Any]:
    """A trial's summary from its learning rate, one validation per epoch."""
    Path(cfg.runs_dir, str(cfg.name)).mkdir(parents=True, exist_ok=True)
    value = 1.0 - abs(cfg.lr - 3e-3)
    on_validation({"step": 10.0, "epoch": 1.0, "val_accuracy": value})
    return {"best_val_accuracy": value, "test_accuracy": value}


def test_a_worker_with_other_options_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from leantune.search.sweep import run_sweep

    monkeypatch.setenv("LEANTUNE_HEARTBEAT", "1,3")
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    result = run_sweep({"epochs": 2}, SPACE, tmp_path / "a", 3, runner=fake_runner, storage=url)
    assert result["finished"] == 3
    assert all(
        t["worker"].endswith(f":{os.getpid()}") and t["run_folder"] for t in result["trials"]
    )
    assert json.loads((tmp_path / "a" / "setup.json").read_text())["storage"] == url
    with pytest.raises(
        LeantuneError, match=r"study 'leantune' was made for another sweep .*epochs"
    ):
        run_sweep({"epochs": 3}, SPACE, tmp_path / "b", 3, runner=fake_runner, storage=url)
    with pytest.raises(LeantuneError, match=r"another sweep .*space differ"):
        run_sweep({"epochs": 2}, {"lr": SPACE["lr"]}, tmp_path / "c", 3, storage=url)
    # Another study name in the same database is a new study; more trials go on numbering.
    other = run_sweep(
        {"epochs": 3}, SPACE, tmp_path / "d", 2, runner=fake_runner, storage=url, study_name="other"
    )
    assert other["finished"] == 2
    more = run_sweep({"epochs": 2}, SPACE, tmp_path / "a", 4, runner=fake_runner, storage=url)
    assert more["finished"] == 4 and len(more["trials"]) == 4


# ---------------------------------------------------------------------------- PostgreSQL


@pytest.mark.slow  # about a minute on 2 busy cores: each worker loads torch and the model
def test_two_sweep_workers_share_one_study(
    tmp_path: Path, postgres: str, tiny_task: list[str]
) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("lr: {low: 1.0e-3, high: 3.0e-2, log: true}\nr: {choices: [2, 4, 8]}\n")
    outs = [tmp_path / "w1", tmp_path / "w2"]
    common = ["--storage", postgres, "--study", "two", "--trials", "4", "--space", str(space)]
    procs = [leantune("sweep", *common, "--out", str(o), "--quiet", *tiny_task) for o in outs]
    results = [finish(p) for p in procs]
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
        assert PASSWORD not in out + err
    trials = trials_of(postgres, "two")
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4
    params = [tuple(sorted(t.params.items())) for t in ran(trials)]
    assert len(set(params)) == len(params)  # no parameters ran twice
    for t in finished:
        folder = Path(t.user_attrs["run_folder"])
        assert folder.parent in outs and t.user_attrs["worker"]
        if t.state.name == "COMPLETE":  # a pruned trial keeps no run
            homes = [o for o in outs if (o / folder.name / "summary.json").exists()]
            assert homes == [folder.parent]
    written = [json.loads((o / "trials.json").read_text()) for o in outs]
    assert all(w["finished"] == 4 and len(w["trials"]) == len(ran(trials)) for w in written)
    assert json.loads((outs[0] / "setup.json").read_text())["storage"] == mask_url(postgres)
    # --report writes the results anywhere without running a trial.
    from typer.testing import CliRunner

    from leantune.cli import app

    res = CliRunner().invoke(app, ["sweep", "--report", *common[:4], "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.stderr
    assert "4 trials finished" in res.stdout and (tmp_path / "r" / "best.yaml").exists()
    no_password_under(tmp_path)


KILLED = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from leantune.tune.runfolder import RunFolder
    from leantune.search.sweep import run_sweep

    url, out, hang = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "hang"
    calls = []

    def run(cfg, resume, overwrite, on_validation):
        calls.append(cfg.name)
        RunFolder(cfg.runs_dir, cfg.name).begin(resume=False)  # as a started run leaves
        on_validation({"step": 10.0, "epoch": 1.0, "val_accuracy": 1 - cfg.lr})
        time.sleep(600 if hang and len(calls) == 2 else 0.5)  # the test kills it here
        return {"best_val_accuracy": 1 - cfg.lr}

    space = {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}
    run_sweep({}, space, out, 4, runner=run, storage=url, study_name="killed")
    """
)


def test_a_killed_worker_trial_is_retried(tmp_path: Path, postgres: str) -> None:
    env = os.environ | {"LEANTUNE_HEARTBEAT": "1,4"}
    victim = subprocess.Popen(
        [sys.executable, "-c", KILLED, postgres, str(tmp_path / "w1"), "hang"], env=env
    )
    me = f"{socket.gethostname()}:{victim.pid}"
    deadline = time.monotonic() + 120
    while True:  # its second trial, running
        assert victim.poll() is None and time.monotonic() < deadline
        listed = trials_of(postgres, "killed") if _has_study(postgres, "killed") else []
        mine = [t for t in listed if t.user_attrs.get("worker") == me]
        if len(mine) == 2 and mine[1].state.name == "RUNNING":
            break
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    again = subprocess.run(
        [sys.executable, "-c", KILLED, postgres, str(tmp_path / "w1"), "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    trials = trials_of(postgres, "killed")
    states = [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 4, states
    killed = next(t for t in trials if t.number == mine[1].number)
    assert killed.state.name == "FAIL"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert [t.state.name in ("COMPLETE", "PRUNED") for t in retries] == [True], states
    assert retries[0].params == killed.params
    assert not (tmp_path / "w1" / f".trial-{killed.number:03d}.partial").exists()
    assert json.loads((tmp_path / "w1" / "trials.json").read_text())["finished"] == 4


def _has_study(url: str, name: str) -> bool:
    import optuna

    try:
        names = optuna.get_all_study_names(storage=driver_url(url))
    except Exception:
        return False
    return name in names


@pytest.mark.slow  # three processes load torch
def test_compare_workers_run_each_strategy_once(
    tmp_path: Path, postgres: str, tiny_task: list[str]
) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text("[head, bitfit, lora-qv]\n")
    out = tmp_path / "cmp"
    args = ["--storage", postgres, "--study", "cmp", "--workers", "2", "--strategies", str(spec)]
    rc, stdout, stderr = finish(
        leantune(
            "compare", *args, "--out", str(out), "--quiet", "--reference-examples", "0", *tiny_task
        )
    )
    assert rc == 0, stderr[-3000:]
    assert PASSWORD not in stdout + stderr
    trials = ran(trials_of(postgres, "cmp"))
    assert sorted(t.params["strategy"] for t in trials) == ["bitfit", "head", "lora-qv"]
    assert all(t.state.name == "COMPLETE" for t in trials)
    table = json.loads((out / "comparison.json").read_text())
    assert [r["strategy"] for r in table["rows"]] == ["head", "bitfit", "lora-qv"]
    assert all(r["test_accuracy"] is not None for r in table["rows"]) and not table["failed"]
    for name in ("head", "bitfit", "lora-qv"):
        assert (out / name / "summary.json").exists()
    assert "| lora-qv |" in stdout
    no_password_under(tmp_path)
