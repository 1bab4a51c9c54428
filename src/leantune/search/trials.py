"""One sweep trial from its parameters to its end (run, pruned, refused), and a sweep's result
written from its study (``best.yaml``, ``trials.json``, the report): shared by the sweep in its
own folder (:mod:`leantune.search.sweep`) and the workers of a shared study
(:mod:`leantune.search.workers`)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from leantune.core.errors import LeantuneError
from leantune.core.files import atomic_write
from leantune.tune.runfolder import RunFolder

LOCK = "sweep.lock"
TRIALS_JSON = "trials.json"
BEST_YAML = "best.yaml"


def higher_is_better(metric: str) -> bool:
    return metric not in ("perplexity", "loss")


def params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def trial_name(number: int) -> str:
    """The run folder name of trial ``number`` inside the sweep folder."""
    return f"trial-{number:03d}"


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


def refuse(study: Any, trial: Any, e: LeantuneError, say: Callable[[str], None]) -> None:
    """Record a trial the config or tune refused: failed with its error, never retried."""
    from optuna.trial import TrialState

    trial.set_user_attr("error", str(e))
    study.tell(trial, state=TrialState.FAIL)
    say(f"{trial_name(trial.number)}: refused ({e})")


def trial_config(
    study: Any,
    trial: Any,
    common: Mapping[str, Any],
    params: dict[str, Any],
    out: Path,
    say: Callable[[str], None],
) -> Any:
    """The resolved config of a trial, or None when the config refuses its values."""
    from leantune.tune import make_config

    name = trial_name(trial.number)
    try:
        return make_config(dict(common) | params | {"name": name, "runs_dir": str(out)}).resolved()
    except LeantuneError as e:
        refuse(study, trial, e, say)
        return None


def run_trial(
    study: Any,
    trial: Any,
    cfg: Any,
    run: Callable[..., dict[str, Any]],
    out: Path,
    metric: str,
    say: Callable[[str], None],
) -> bool:
    """Run one trial and tell the study how it ended; True when the run was interrupted."""
    import optuna
    from optuna.trial import TrialState

    name = trial_name(trial.number)

    def report(row: dict[str, float]) -> None:
        trial.report(row[f"val_{metric}"], step=round(row["epoch"] * 100))
        if trial.should_prune():
            raise optuna.TrialPruned()

    try:
        summary = run(cfg, resume=False, overwrite=False, on_validation=report)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        RunFolder(out, name).discard()  # a pruned trial keeps no partial run
        say(f"{name}: pruned")
        return False
    except LeantuneError as e:
        # Refused by tune (values the config accepts but the model or data do not,
        # or a run that diverged): recorded, not left RUNNING to be retried for ever.
        refuse(study, trial, e, say)
        RunFolder(out, name).discard()
        return False
    if summary.get("interrupted"):
        return True
    value = summary.get(f"best_val_{metric}")
    if value is None or not math.isfinite(value):
        trial.set_user_attr("error", f"no finite validation {metric}")
        study.tell(trial, state=TrialState.FAIL)
    else:
        trial.set_user_attr(f"test_{metric}", summary.get(f"test_{metric}"))
        study.tell(trial, value)
        say(f"{name}: validation {metric} {value:.4f}")
    return False


def write_result(
    study: Any, common: Mapping[str, Any], out: Path, metric: str, higher: bool
) -> dict[str, Any]:
    """The sweep's result, written: the best config as YAML, every trial as JSON, the report."""
    from leantune.search.pages import write_sweep_report
    from leantune.tune import make_config, write_config

    result = sweep_result(study, metric, higher)
    best = result["best"]
    if best is not None:
        cfg = make_config(
            dict(common) | best["params"] | {"name": f"{out.name}-best", "runs_dir": "runs"}
        )
        write_config(cfg, out / BEST_YAML)
        best["config"] = asdict(cfg)
    atomic_write(out / TRIALS_JSON, json.dumps(result, indent=1, default=str) + "\n")
    write_sweep_report(out, result)
    return result


def sweep_result(study: Any, metric: str, higher: bool) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = []
    for t in study.get_trials(deepcopy=False):
        if "surplus" in t.user_attrs or "duplicate_of" in t.user_attrs:
            continue  # given back by a shared-study worker without running
        value = t.value
        if t.state == TrialState.PRUNED and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        trials.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": value,
                "params": dict(t.params),
                "run": trial_name(t.number),
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
