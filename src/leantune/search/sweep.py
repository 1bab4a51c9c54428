"""``leantune sweep``: hyperparameter search with Optuna, resumable after any interruption.

The sweep folder holds ``setup.json`` (common options, data fingerprint, search space, target),
``study.db`` (the Optuna study, SQLite), one run folder per trial (``trial-003/``),
``trials.json``, ``best.yaml`` (re-run it with ``leantune tune --config best.yaml``) and
``report.html``. TPE samples; a median pruner stops a trial whose validation metric after an
epoch is below the median of earlier trials at that point.

The search space is checked before anything is written: every choice and both ends of every
range must be a value tune accepts with the sweep's fixed options. A trial that tune still
refuses (a combination of searched values, a layer range the model lacks, a run that diverged)
is marked failed with its reason (``error`` in trials.json) and the sweep goes on; when no trial
completes, the sweep ends with that reason as its error.

Interrupted sweeps resume: finished trials (complete, pruned, or refused) are kept; a trial
left running by a killed process is marked failed and its parameters are tried again as a new
trial; the sampler is reseeded with the number of trials so far, so a resumed sweep does not
draw the same parameters as the first trials again. Only one process may work on a
sweep folder at a time (``sweep.lock`` holds its pid).

Shared studies (``--storage URL [--study NAME]``, any Optuna RDB URL: PostgreSQL, MySQL,
SQLite): several workers, on one machine or many, each with its own ``--out`` for its trials'
run folders, work on one study in the database (see :mod:`leantune.search.study`). Exactly ``--trials``
trials finish across all of them, no parameters run twice, pruning compares every worker's
results, and a killed worker's trial is failed after its heartbeat stops and run again. The
setup is stored in the study and a worker with other options, data or space is refused. Each
trial records its ``worker`` (hostname:pid) and ``run_folder``. Every worker waits until all
trials have ended, then writes ``best.yaml``, ``trials.json`` and ``report.html`` from the study
into its own ``--out``; ``leantune sweep --report --storage URL`` writes them without running
trials. Only the URL with its password masked is ever printed or written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from leantune.core.errors import LeantuneError
from leantune.core.files import read_yaml
from leantune.search.setup import check_setup
from leantune.search.trials import (
    LOCK,
    TRIALS_JSON,
    higher_is_better,
    params_text,
    run_trial,
    suggest,
    trial_config,
    trial_name,
    write_result,
)
from leantune.search.workers import sweep_worker
from leantune.tune.fingerprint import data_fingerprint
from leantune.tune.runfolder import RunFolder, pid_lock

STUDY_DB = "study.db"

DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"low": 3e-4, "high": 1e-2, "log": True},
    "r": {"choices": [2, 4, 8, 16]},
    "schedule": {"choices": ["linear", "cosine"]},
    "layer_decay": {"low": 0.6, "high": 1.0},
    "l2": {"choices": [0.0, 1e-4, 1e-3]},
}
"""Searched when no --space is given: LoRA's rate, rank, schedule, layer decay and L2 weight."""


def check_space(
    space: Any, where: str = "space", common: Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Each entry ``option: {low, high[, log][, step]}`` or ``option: {choices: [...]}``.

    Every choice and both ends of every range must be a value tune accepts, checked by building
    the config with it (on top of ``common``, the options fixed for every trial): a space that
    passes here does not leave trials that tune then refuses, but for combinations of searched
    values, which are recorded as failed trials.
    """
    import typing

    from leantune.tune import TuneConfig, check_option_types, make_config

    if not isinstance(space, dict) or not space:
        raise LeantuneError(f"{where}: give a mapping of option: {{low, high}} or {{choices}}")
    known = {f.name for f in fields(TuneConfig)} - {"name", "runs_dir", "seed", "metric"}
    hints = typing.get_type_hints(TuneConfig)
    ints = {k for k, hint in hints.items() if int in (typing.get_args(hint) or (hint,))}
    space = {k: dict(v) if isinstance(v, dict) else v for k, v in space.items()}
    for key, spec in space.items():
        if key == "metric":
            raise LeantuneError(
                f"{where}: metric is what the sweep optimizes; set it with --metric, not in the space"
            )
        if key not in known:
            raise LeantuneError(f"{where}: {key!r} is not a tune option one can search")
        if not isinstance(spec, dict):
            raise LeantuneError(f"{where}: {key}: give {{low, high}} or {{choices: [...]}}")
        if "choices" in spec:
            if set(spec) != {"choices"}:
                raise LeantuneError(f"{where}: {key}: choices stand alone (no low/high)")
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise LeantuneError(f"{where}: {key}: choices is empty; list at least one value")
            values = list(spec["choices"])
        else:
            extra = sorted(set(spec) - {"low", "high", "log", "step"})
            if extra or "low" not in spec or "high" not in spec:
                raise LeantuneError(f"{where}: {key}: give low and high (and maybe log, step)")
            for end in ("low", "high"):  # YAML reads 1e-3 (no dot) as text
                if isinstance(spec[end], str):
                    with contextlib.suppress(ValueError):
                        spec[end] = float(spec[end])
            low, high = spec["low"], spec["high"]
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
                raise LeantuneError(f"{where}: {key}: low and high must be numbers")
            values = [low, high]
        for value in values:
            check_option_types({key: value}, where)
            try:
                make_config(dict(common or {}) | {key: value})
            except LeantuneError as e:
                raise LeantuneError(f"{where}: {key}: {value!r} is refused: {e}") from None
        if "choices" in spec:
            continue
        if key in ints and not all(isinstance(v, int) for v in (low, high)):
            raise LeantuneError(
                f"{where}: {key} takes whole numbers; give low and high as integers"
            )
        if not low < high:
            raise LeantuneError(
                f"{where}: {key}: the range [{low}, {high}] is empty; low must be below high "
                "(use choices: [value] to fix one value)"
            )
        if spec.get("log") and low <= 0:
            raise LeantuneError(f"{where}: {key}: a log range needs low > 0")
    return space


def read_space(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return DEFAULT_SPACE
    return check_space(read_yaml(path, "search space"), str(path))


def _finished(trial: Any) -> bool:
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "error" in trial.user_attrs
    )


def run_sweep(
    common: Mapping[str, Any],
    space: Mapping[str, Mapping[str, Any]],
    out: Path,
    n_trials: int,
    *,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    runner: Callable[..., dict[str, Any]] | None = None,
    storage: str | None = None,
    study_name: str = "leantune",
) -> dict[str, Any]:
    """Run trials into ``out`` until ``n_trials`` have finished; returns the trials and the best.

    With ``storage`` (an Optuna RDB URL) this process is one worker of the shared study
    ``study_name``; ``out`` holds the run folders of the trials it runs."""
    from leantune.tune import make_config, run_tune

    if n_trials <= 0:
        raise LeantuneError("--trials must be positive")
    base = make_config(dict(common)).resolved()
    space = check_space(dict(space), common=common)
    say = log or (lambda s: None)
    run = runner or run_tune
    out = Path(out)
    metric = str(base.metric)
    setup = {
        "common": {k: v for k, v in asdict(base).items() if k not in ("name", "runs_dir")},
        "data_sha256": data_fingerprint(base),
        "space": space,
        "metric": metric,
    }
    if storage is None:
        result = _local_sweep(common, setup, out, n_trials, seed, say, run)
    else:
        result = sweep_worker(common, setup, out, n_trials, (storage, study_name), seed, say, run)
    if result.get("interrupted"):
        return result
    best = result["best"]
    if best is None:
        errors = [t["error"] for t in result["trials"] if "error" in t]
        if errors:
            raise LeantuneError(
                f"no trial completed: {len(errors)} failed, the last with: {errors[-1]} "
                f"(all in {out / TRIALS_JSON}); fix it and sweep into a new --out"
            )
    result["out"] = str(out)
    return result


def _local_sweep(
    common: Mapping[str, Any],
    setup: dict[str, Any],
    out: Path,
    n_trials: int,
    seed: int,
    say: Callable[[str], None],
    run: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    """The sweep folder's own study (``study.db``), one process at a time."""
    import optuna

    metric, space, higher = setup["metric"], setup["space"], higher_is_better(setup["metric"])
    check_setup(out, setup, "sweep (data, options or search space)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with pid_lock(out / LOCK, f"sweep {out}"):
        study, done = _open_study(out, higher, seed, n_trials, say)
        while done < n_trials:
            trial = study.ask()
            params = suggest(trial, space)
            cfg_or_none = trial_config(study, trial, common, params, out, say)
            if cfg_or_none is not None:
                say(f"[{done + 1}/{n_trials}] {trial_name(trial.number)}: {params_text(params)}")
                if run_trial(study, trial, cfg_or_none, run, out, metric, say):
                    return {"interrupted": True, "out": str(out)}
            done += 1
        return write_result(study, common, out, metric, higher)


def _open_study(
    out: Path, higher: bool, seed: int, n_trials: int, say: Callable[[str], None]
) -> tuple[Any, int]:
    """The study in ``out`` (new or resumed) and how many of its trials have finished.

    Trials left running by a killed process are failed and their parameters queued again."""
    import optuna
    from optuna.trial import TrialState

    storage = f"sqlite:///{(out / STUDY_DB).resolve()}"
    study = optuna.create_study(
        study_name="leantune",
        storage=storage,
        direction="maximize" if higher else "minimize",
        load_if_exists=True,
    )
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        RunFolder(out, trial_name(t.number)).discard()  # its unfinished run
        say(f"trial {t.number} was interrupted; its parameters will run again")
    done = sum(_finished(t) for t in study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(
        seed=seed + len(study.trials), n_startup_trials=max(3, n_trials // 3)
    )
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    return study, done
