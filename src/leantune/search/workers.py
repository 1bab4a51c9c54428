"""The worker side of shared studies (:mod:`leantune.search.study`) for ``sweep`` and ``compare``.

A sweep worker runs trials of the shared study into its own ``--out``; a compare worker takes
the strategies queued in the study one by one. Both wait until every trial has ended, then write
the results from the study into their own ``--out``. :func:`run_local_workers` starts several
workers on this machine (``compare --workers N``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from leantune.core.errors import LeantuneError

Say = Callable[[str], None]


def sweep_worker(
    common: Mapping[str, Any],
    setup: dict[str, Any],
    out: Path,
    n_trials: int,
    where: tuple[str, str],
    seed: int,
    say: Say,
    run: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    """One worker of the shared sweep study ``where`` = (URL, study name); trials run into
    ``out``. Returns the sweep's result once ``n_trials`` have finished in the study."""
    from leantune.search.setup import check_setup
    from leantune.search.study import join_setup, mask_url, open_study, run_study_trials, worker_id
    from leantune.search.trials import (
        LOCK,
        params_text,
        run_trial,
        suggest,
        trial_config,
        trial_name,
        write_result,
    )
    from leantune.tune.runfolder import RunFolder, pid_lock

    url, name = where
    metric, space = setup["metric"], setup["space"]
    higher = metric not in ("perplexity", "loss")
    what = "sweep (data, options, search space or study)"
    study = open_study(url, name, higher)  # a bad URL is refused before --out is made
    check_setup(out, setup | {"storage": mask_url(url), "study": name}, what)
    with pid_lock(out / LOCK, f"sweep {out}"):
        join_setup(study, setup, common, "sweep (data, options or search space)")
        _shared_sampler(study, seed, n_trials)
        say(f"worker {worker_id()} on study {name!r} in {mask_url(url)}")

        def run_one(trial: Any, params: dict[str, Any], done: int) -> bool:
            for t in study.get_trials(deepcopy=False):  # lost here earlier: no run to keep
                if t.state.name == "FAIL" and "error" not in t.user_attrs:
                    RunFolder(out, trial_name(t.number)).discard()
            cfg = trial_config(study, trial, common, params, out, say)
            if cfg is None:
                return False
            trial.set_user_attr("run_folder", str((out / trial_name(trial.number)).resolve()))
            say(f"[{done + 1}/{n_trials}] {trial_name(trial.number)}: {params_text(params)}")
            if run_trial(study, trial, cfg, run, out, metric, say):
                RunFolder(out, trial_name(trial.number)).discard()  # runs again as a new trial
                return True
            return False

        if not run_study_trials(study, n_trials, lambda t: suggest(t, space), run_one, say):
            return {"interrupted": True, "out": str(out)}
        return write_result(study, common, out, metric, higher)


def _shared_sampler(study: Any, seed: int, n_trials: int) -> None:
    """TPE seeded per worker, with a constant liar so that workers spread their draws."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.sampler = optuna.samplers.TPESampler(
            seed=(seed + len(study.trials) + os.getpid()) % 2**31,
            n_startup_trials=max(3, n_trials // 3),
            constant_liar=True,
        )
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)


def sweep_report(storage: str, study_name: str, out: Path) -> dict[str, Any]:
    """best.yaml, trials.json and report.html of a shared sweep study, written into ``out``."""
    from leantune.search.study import OPTIONS_ATTR, SETUP_ATTR, load_study, mask_url
    from leantune.search.trials import write_result

    study = load_study(storage, study_name)
    setup = study.user_attrs.get(SETUP_ATTR)
    if not isinstance(setup, dict) or "space" not in setup:
        raise LeantuneError(
            f"study {study_name!r} in {mask_url(storage)} was not made by leantune sweep; "
            "check --study"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metric = str(setup["metric"])
    higher = metric not in ("perplexity", "loss")
    result = write_result(study, study.user_attrs[OPTIONS_ATTR], out, metric, higher)
    result["out"] = str(out)
    return result


# ---------------------------------------------------------------------------- compare


def prepare_compare(
    strategies: Sequence[Any],
    setup: dict[str, Any],
    common: Mapping[str, Any],
    out: Path,
    where: tuple[str, str],
) -> Any:
    """Check ``out``, open the study, check or store its setup, and queue each strategy not yet
    in it; returns the study."""
    from leantune.search.setup import check_setup
    from leantune.search.study import is_void, join_setup, mask_url, open_study

    url, name = where
    check_setup(out, setup | {"storage": mask_url(url), "study": name}, "comparison or study")
    study = open_study(url, name, higher=True)
    listed = [{"name": s.name, "options": s.options} for s in strategies]
    join_setup(study, setup | {"strategies": listed}, common, "comparison (options, data or list)")
    have = {t.params.get("strategy") for t in study.get_trials(deepcopy=False) if not is_void(t)}
    for s in strategies:
        if s.name not in have:
            study.enqueue_trial({"strategy": s.name})
    return study


def compare_worker(
    strategies: Sequence[Any],
    configs: Sequence[Any],
    setup: dict[str, Any],
    common: Mapping[str, Any],
    out: Path,
    where: tuple[str, str],
    slack: float,
    say: Say,
    run: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    """One worker of the shared comparison ``where``: runs strategies taken from the study into
    ``out`` until all have ended, then writes the table from the study."""
    from leantune.search.strategies import run_strategy
    from leantune.search.study import give_back, run_study_trials, worker_id

    study = prepare_compare(strategies, setup, common, out, where)
    names = [s.name for s in strategies]
    by_name = dict(zip(names, configs, strict=True))
    metric = str(configs[0].metric)
    current = {"strategy": "the wait for other workers"}
    say(f"worker {worker_id()} on study {where[1]!r}")

    def run_one(trial: Any, params: dict[str, Any], done: int) -> bool:
        name = current["strategy"] = params["strategy"]
        trial.set_user_attr("run_folder", str((out / name).resolve()))
        label = f"[{names.index(name) + 1}/{len(names)}] {name}"
        row = run_strategy(label, by_name[name], out, metric, say, run)
        if row is None:
            return True
        trial.set_user_attr("row", row)
        if row.get("error"):
            give_back(study, trial, error=row["error"])
        else:
            study.tell(trial, float(row.get(f"test_{metric}") or 0.0))
        return False

    params_of = lambda t: {"strategy": t.suggest_categorical("strategy", names)}  # noqa: E731
    if not run_study_trials(study, len(names), params_of, run_one, say):
        return {"interrupted": True, "strategy": current["strategy"], "out": str(out)}
    result = study_table(study, names, out, metric, slack)
    if result is None:
        raise LeantuneError(f"study {where[1]!r} ended without every strategy; run it again")
    return result


def study_table(
    study: Any, names: Sequence[str], out: Path, metric: str, slack: float
) -> dict[str, Any] | None:
    """The comparison of the study's finished strategies, written into ``out``; None while one
    has not ended."""
    from leantune.search.strategies import write_table
    from leantune.search.study import is_done

    rows = {}
    for t in study.get_trials(deepcopy=False):
        if is_done(t) and "row" in t.user_attrs:
            rows[t.params.get("strategy")] = t.user_attrs["row"]
    if any(n not in rows for n in names):
        return None
    result = write_table(Path(out), [rows[n] for n in names], metric, slack)
    result["out"] = str(out)
    return result


def run_local_workers(argv: list[str], n: int, say: Say) -> list[str]:
    """Start ``n`` processes ``leantune <argv>`` and wait for them (Ctrl-C is passed on to
    them); each one's stderr lines are echoed with its number. Returns one line per failure."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "leantune.cli", *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a Ctrl-C reaches them through this process only
        )
        for _ in range(n)
    ]
    last = [""] * n

    def echo(i: int) -> None:
        stream = procs[i].stderr
        assert stream is not None
        for line in stream:
            if line.strip():
                last[i] = line.strip()
                say(f"worker {i + 1}: {line.rstrip()}")

    threads = [threading.Thread(target=echo, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        for p in procs:
            p.wait()
    except KeyboardInterrupt:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise
    finally:
        for t in threads:
            t.join(timeout=5)
    return [
        f"worker {i + 1} of {n} failed (exit {p.returncode}): {last[i] or 'no message'}"
        for i, p in enumerate(procs)
        if p.returncode != 0
    ]
