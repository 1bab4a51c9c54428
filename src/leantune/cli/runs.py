"""``leantune compare`` and ``leantune sweep``: many runs under one folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from leantune.cli.common import app, config_options, fail, flag, option, with_signature
from leantune.cli.tune import run_with_progress
from leantune.core.errors import LeantuneError


def _common(config: Path | None, options: dict[str, Any], command: str) -> dict[str, Any]:
    """Options shared by every run of compare/sweep: --config's YAML, then the command line."""
    from leantune.tune import read_config

    common = (read_config(config) if config else {}) | {
        k: v for k, v in options.items() if v is not None
    }
    for key in ("name", "runs_dir"):
        if key in common:
            fail(f"{command} names its runs itself; drop --{key.replace('_', '-')} (use --out)")
    return common


def compare(**kwargs: Any) -> None:
    """Run several strategies on the same data and split; write a table, Pareto plots and a report.

    Each strategy is an ordinary run folder under --out; finished ones are not redone. The other
    options apply to every strategy unless the strategy sets them. With --storage (an Optuna
    database URL) this process is one worker of a shared study: the strategies are handed out to
    every worker given the same --storage and --study; --workers N starts N workers here.
    """
    from leantune.search.strategies import load_strategies

    config, out, spec = kwargs.pop("config"), kwargs.pop("out"), kwargs.pop("strategies")
    quiet, storage, study = kwargs.pop("quiet"), kwargs.pop("storage"), kwargs.pop("study")
    workers = kwargs.pop("workers")
    try:
        if workers < 1:
            raise LeantuneError("--workers must be 1 or more")
        given = _common(config, kwargs, "compare")
        strategies, preset_common = load_strategies(spec, str(given.get("task", "classify")))
        common = preset_common | given
        if workers > 1:
            argv = _worker_argv(config, out, spec, quiet, kwargs)
            result = _compare_workers(strategies, common, out, storage, study, workers, argv)
        else:
            result = _compare_here(strategies, common, out, storage, study, quiet)
    except LeantuneError as e:
        fail(str(e))
    except KeyboardInterrupt:
        result = {"interrupted": True, "strategy": "the workers"}
    _print_compare(result, out)


def _compare_here(
    strategies: list[Any],
    common: dict[str, Any],
    out: Path,
    storage: str | None,
    study: str,
    quiet: bool,
) -> dict[str, Any]:
    """Run the comparison in this process (alone, or as one worker of a shared study)."""
    from leantune.search.compare import run_compare

    return run_compare(
        strategies,
        common,
        out,
        log=None if quiet else (lambda s: typer.echo(s, err=True)),
        runner=lambda cfg, **kw: run_with_progress(cfg, kw["resume"], kw["overwrite"], quiet),
        storage=storage,
        study_name=study,
    )


def _compare_workers(
    strategies: list[Any],
    common: dict[str, Any],
    out: Path,
    storage: str | None,
    study: str,
    workers: int,
    argv: list[str],
) -> dict[str, Any]:
    """Prepare the shared study, run ``workers`` worker processes on it, read the table back."""
    from leantune.search.strategies import strategy_configs
    from leantune.search.study import load_study
    from leantune.search.workers import prepare_compare, run_local_workers, study_table

    url = storage or f"sqlite:///{(Path(out) / 'compare.db').resolve()}"
    _configs, setup, metric = strategy_configs(strategies, common, Path(out))
    prepare_compare(strategies, setup, common, Path(out), (url, study))
    failures = run_local_workers(
        [*argv, "--storage", url, "--study", study, "--workers", "1"],
        workers,
        lambda s: typer.echo(s, err=True),
    )
    names = [s.name for s in strategies]
    result = study_table(load_study(url, study), names, Path(out), metric, 0.005)
    if result is None:
        raise LeantuneError(
            (failures[0] if failures else "the workers ended before every strategy")
            + "; run the same command to continue"
        )
    return result


def _worker_argv(
    config: Path | None, out: Path, spec: str, quiet: bool, options: dict[str, Any]
) -> list[str]:
    """The command line of one compare worker: the same options as this one."""
    argv = ["compare", "--strategies", spec, "--out", str(out)]
    argv += ["--config", str(config)] if config else []
    argv += ["--quiet"] if quiet else []
    for key, value in options.items():
        flag_name = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag_name if value else f"--no-{flag_name[2:]}")
        elif value is not None:
            argv += [flag_name, str(value)]
    return argv


def _print_compare(result: dict[str, Any], out: Path) -> None:
    """The table, the recommendation and the report's path; one line for failed strategies."""
    from leantune.search.strategies import markdown_table

    if result.get("interrupted"):
        typer.echo(
            f"leantune: interrupted in {result['strategy']}; run the same command to continue",
            err=True,
        )
        raise typer.Exit(130)
    typer.echo(markdown_table(result["rows"], result["metric"]), nl=False)
    typer.echo(f"recommendation: {result['recommendation']}")
    typer.echo(f"report: {Path(out) / 'report.html'}")
    if result["failed"]:
        names = ", ".join(result["failed"])
        fail(
            f"{len(result['failed'])} of {len(result['rows'])} strategies failed ({names}; "
            "their errors are in the table); fix them and run the same command again"
        )


STORAGE = option(
    "storage",
    Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="An Optuna database URL (postgresql://user:password@host/db, mysql://..., "
            "sqlite:///file.db) shared by several workers, on one machine or many."
        ),
    ],
    None,
)
STUDY = option(
    "study",
    Annotated[str, typer.Option(help="The study's name in --storage.")],
    "leantune",
)


app.command("compare")(
    with_signature(
        compare,
        config_options(
            [
                option(
                    "strategies",
                    Annotated[
                        str,
                        typer.Option(
                            help="A preset (default, lora, methods) or a YAML file: a list of strategy "
                            "names (full, head, bitfit, layernorm, lora-qv, lora-all, dora, "
                            "auto-<budget>) or {name: ..., use: <name>, <option>: ...} mappings; "
                            "or {strategies: [...], common: {...}}."
                        ),
                    ],
                    "default",
                ),
                option(
                    "out",
                    Annotated[Path, typer.Option(help="The comparison folder.")],
                    Path("runs/compare"),
                ),
                flag("quiet", "No progress bars or per-eval lines."),
                STORAGE,
                STUDY,
                option(
                    "workers",
                    Annotated[
                        int,
                        typer.Option(
                            help="Worker processes on this machine (more than 1: an SQLite "
                            "study in --out unless --storage is given)."
                        ),
                    ],
                    1,
                ),
            ]
        ),
    )
)


# ---------------------------------------------------------------------------- sweep


def sweep(**kwargs: Any) -> None:
    """Search hyperparameters with Optuna (TPE, median pruning after each epoch).

    The study lives in <out>/study.db: run the same command again after an interruption and it
    goes on where it stopped. The best configuration is written to <out>/best.yaml for
    leantune tune --config. The other options are fixed for every trial. With --storage (an
    Optuna database URL) this process is one worker of a shared study: run the same command on
    other machines (each with its own --out) and --trials finish across all of them.
    """
    from leantune.search.sweep import read_space, run_sweep

    config, out, space, trials = (kwargs.pop(k) for k in ("config", "out", "space", "trials"))
    quiet, storage, study = kwargs.pop("quiet"), kwargs.pop("storage"), kwargs.pop("study")
    report = kwargs.pop("report")
    try:
        if report:
            result = _sweep_report(storage, study, out)
        else:
            common = {"reference_examples": 0} | _common(config, kwargs, "sweep")
            result = run_sweep(
                common,
                read_space(space),
                out,
                trials,
                seed=int(common.get("seed", 0)),
                log=None if quiet else (lambda s: typer.echo(s, err=True)),
                runner=lambda cfg, **kw: run_with_progress(
                    cfg, False, False, quiet, on_validation=kw["on_validation"]
                ),
                storage=storage,
                study_name=study,
            )
    except LeantuneError as e:
        fail(str(e))
    if result.get("interrupted"):
        typer.echo("leantune: interrupted; run the same command to continue the sweep", err=True)
        raise typer.Exit(130)
    _print_sweep(result, out)


def _sweep_report(storage: str | None, study: str, out: Path) -> dict[str, Any]:
    """--report: the results of a shared study, written into --out."""
    from leantune.search.workers import sweep_report

    if storage is None:
        raise LeantuneError(
            "--report writes a shared study's results; give its --storage (and --study)"
        )
    return sweep_report(storage, study, out)


def _print_sweep(result: dict[str, Any], out: Path) -> None:
    best = result["best"]
    typer.echo(
        f"{result['finished']} trials finished, {result['pruned']} pruned; "
        + (
            f"best: trial {best['number']}, validation {result['metric']} {best['value']:.4f}, "
            f"{json.dumps(best['params'])}"
            if best
            else "no trial completed"
        )
    )
    if best:
        typer.echo(f"re-run it: leantune tune --config {Path(out) / 'best.yaml'}")
    typer.echo(f"report: {Path(out) / 'report.html'}")


app.command("sweep")(
    with_signature(
        sweep,
        config_options(
            [
                option(
                    "space",
                    Annotated[
                        Optional[Path],  # noqa: UP045
                        typer.Option(
                            help="YAML search space: option: {low, high, log?, step?} or "
                            "option: {choices: [...]} (default: lr, r, schedule, layer_decay, l2)."
                        ),
                    ],
                    None,
                ),
                option(
                    "trials",
                    Annotated[int, typer.Option(help="Trials to finish (pruned ones count).")],
                    12,
                ),
                option(
                    "out",
                    Annotated[Path, typer.Option(help="The sweep folder.")],
                    Path("runs/sweep"),
                ),
                flag("quiet", "No progress bars or per-eval lines."),
                STORAGE,
                STUDY,
                flag(
                    "report",
                    "Write best.yaml, trials.json and report.html of the shared "
                    "study (--storage, --study) into --out, running no trials.",
                ),
            ]
        ),
    )
)
