"""``leantune sweep``: hyperparameter search with Optuna, resumable after any interruption.

The sweep folder holds ``setup.json`` (common options, data fingerprint, search space, target),
``study.db`` (the Optuna study, SQLite), one run folder per trial (``trial-003/``),
``trials.json``, ``best.yaml`` (re-run it with ``leantune tune --config best.yaml``) and
``report.html``. TPE samples; a median pruner stops a trial whose validation metric after an
epoch is below the median of earlier trials at that point.

Interrupted sweeps resume: finished trials (complete, pruned, or refused by their config) are
kept; a trial left running by a killed process is marked failed and its parameters are tried again
as a new trial; the sampler is reseeded with the number of trials so far, so a resumed sweep
does not draw the same parameters as the first trials again. Only one process may work on a
sweep folder at a time (``sweep.lock`` holds its pid).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from leantune.compare import check_setup, data_fingerprint
from leantune.errors import LeantuneError

STUDY_DB = "study.db"
LOCK = "sweep.lock"
TRIALS_JSON = "trials.json"
BEST_YAML = "best.yaml"

DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"low": 3e-4, "high": 1e-2, "log": True},
    "r": {"choices": [2, 4, 8, 16]},
    "schedule": {"choices": ["linear", "cosine"]},
    "layer_decay": {"low": 0.6, "high": 1.0},
    "l2": {"choices": [0.0, 1e-4, 1e-3]},
}
"""Searched when no --space is given: LoRA's rate, rank, schedule, layer decay and L2 weight."""


def check_space(space: Any, where: str = "space") -> dict[str, dict[str, Any]]:
    """Each entry ``option: {low, high[, log][, step]}`` or ``option: {choices: [...]}``."""
    from leantune.tune import TuneConfig

    if not isinstance(space, dict) or not space:
        raise LeantuneError(f"{where}: give a mapping of option: {{low, high}} or {{choices}}")
    known = {f.name for f in fields(TuneConfig)} - {"name", "runs_dir", "seed"}
    for key, spec in space.items():
        if key not in known:
            raise LeantuneError(f"{where}: {key!r} is not a tune option one can search")
        if not isinstance(spec, dict):
            raise LeantuneError(f"{where}: {key}: give {{low, high}} or {{choices: [...]}}")
        if "choices" in spec:
            if set(spec) != {"choices"}:
                raise LeantuneError(f"{where}: {key}: choices stand alone (no low/high)")
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise LeantuneError(f"{where}: {key}: choices is empty; list at least one value")
            continue
        extra = sorted(set(spec) - {"low", "high", "log", "step"})
        if extra or "low" not in spec or "high" not in spec:
            raise LeantuneError(f"{where}: {key}: give low and high (and maybe log, step)")
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
            raise LeantuneError(f"{where}: {key}: low and high must be numbers")
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
    from leantune.tune import read_yaml

    return check_space(read_yaml(path, "search space"), str(path))


def suggest(trial: Any, space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, spec in space.items():
        if "choices" in spec:
            params[key] = trial.suggest_categorical(key, spec["choices"])
        elif all(isinstance(spec[k], int) for k in ("low", "high")):  # an integer range
            params[key] = trial.suggest_int(
                key, spec["low"], spec["high"], step=spec.get("step", 1), log=spec.get("log", False)
            )
        else:
            params[key] = trial.suggest_float(
                key, spec["low"], spec["high"], step=spec.get("step"), log=spec.get("log", False)
            )
    return params


class _Lock:
    """``sweep.lock`` holding this pid; a lock whose process is gone (kill -9) is taken over."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK

    def __enter__(self) -> _Lock:
        if self.path.exists():
            try:
                pid = int(self.path.read_text().strip() or 0)
            except ValueError:
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise LeantuneError(
                    f"another sweep (pid {pid}) is working in {self.path.parent}; wait for it"
                )
        tmp = self.path.with_name(f".{LOCK}.{os.getpid()}")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
) -> dict[str, Any]:
    """Run trials into ``out`` until ``n_trials`` have finished; returns the trials and the best."""
    import optuna
    from optuna.trial import TrialState

    from leantune.tune import atomic_write, make_config, run_tune, write_config

    if n_trials <= 0:
        raise LeantuneError("--trials must be positive")
    space = check_space(dict(space))
    say = log or (lambda s: None)
    run = runner or run_tune
    out = Path(out)
    base = make_config(dict(common)).resolved()
    metric = str(base.metric)
    higher = metric not in ("perplexity", "loss")
    setup = {
        "common": {k: v for k, v in asdict(base).items() if k not in ("name", "runs_dir")},
        "data_sha256": data_fingerprint(base),
        "space": space,
        "metric": metric,
    }
    check_setup(out, setup, "sweep (data, options or search space)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _Lock(out):
        storage = f"sqlite:///{(out / STUDY_DB).resolve()}"
        study = optuna.create_study(
            study_name="leantune",
            storage=storage,
            direction="maximize" if higher else "minimize",
            load_if_exists=True,
        )
        # Trials left running by a killed process: failed, their parameters tried again.
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            stale = out / f"trial-{t.number:03d}"
            if stale.exists():
                shutil.rmtree(stale)
            say(f"trial {t.number} was interrupted; its parameters will run again")
        done = sum(_finished(t) for t in study.get_trials(deepcopy=False))
        study.sampler = optuna.samplers.TPESampler(
            seed=seed + len(study.trials), n_startup_trials=max(3, n_trials // 3)
        )
        study.pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
        while done < n_trials:
            trial = study.ask()
            params = suggest(trial, space)
            name = f"trial-{trial.number:03d}"
            try:
                cfg = make_config(
                    dict(common) | params | {"name": name, "runs_dir": str(out)}
                ).resolved()
            except LeantuneError as e:
                trial.set_user_attr("error", str(e))
                study.tell(trial, state=TrialState.FAIL)
                say(f"{name}: refused ({e})")
                done += 1
                continue
            shown = ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
            )
            say(f"[{done + 1}/{n_trials}] {name}: {shown}")

            def report(row: dict[str, float], trial: Any = trial) -> None:
                trial.report(row[f"val_{metric}"], step=round(row["epoch"] * 100))
                if trial.should_prune():
                    raise optuna.TrialPruned()

            try:
                summary = run(cfg, resume=False, overwrite=False, on_validation=report)
            except optuna.TrialPruned:
                study.tell(trial, state=TrialState.PRUNED)
                shutil.rmtree(out / name / "checkpoint", ignore_errors=True)
                say(f"{name}: pruned")
                done += 1
                continue
            if summary.get("interrupted"):
                return {"interrupted": True, "out": str(out)}
            value = summary.get(f"best_val_{metric}")
            if value is None or not math.isfinite(value):
                trial.set_user_attr("error", f"no finite validation {metric}")
                study.tell(trial, state=TrialState.FAIL)
            else:
                trial.set_user_attr(f"test_{metric}", summary.get(f"test_{metric}"))
                study.tell(trial, value)
                say(f"{name}: validation {metric} {value:.4f}")
            done += 1
        result = _result(study, metric, higher)
        best = result["best"]
        if best is not None:
            cfg = make_config(
                dict(common) | best["params"] | {"name": f"{out.name}-best", "runs_dir": "runs"}
            )
            write_config(cfg, out / BEST_YAML)
            best["config"] = asdict(cfg)
        atomic_write(out / TRIALS_JSON, json.dumps(result, indent=1, default=str) + "\n")
        from leantune.report import write_sweep_report

        write_sweep_report(out, result)
    result["out"] = str(out)
    return result


def _result(study: Any, metric: str, higher: bool) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = []
    for t in study.get_trials(deepcopy=False):
        value = t.value
        if t.state == TrialState.PRUNED and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        trials.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": value,
                "params": dict(t.params),
                "run": f"trial-{t.number:03d}",
                **t.user_attrs,
            }
        )
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    best = None
    if complete:
        pick = (max if higher else min)(complete, key=lambda t: t["value"])
        best = dict(pick)
    return {
        "metric": metric,
        "higher_is_better": higher,
        "trials": trials,
        "finished": sum(t["state"] in ("COMPLETE", "PRUNED") or "error" in t for t in trials),
        "pruned": sum(t["state"] == "PRUNED" for t in trials),
        "best": best,
    }
