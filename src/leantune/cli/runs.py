"""``leantune compare`` and ``leantune sweep``: many runs under one folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from leantune.cli.common import app, config_options, fail, flag, option, with_signature
from leantune.cli.tune import run_with_progress
from leantune.errors import LeantuneError


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
    options apply to every strategy unless the strategy sets them.
    """
    from leantune.compare import load_strategies, markdown_table, run_compare

    config, out, spec = kwargs.pop("config"), kwargs.pop("out"), kwargs.pop("strategies")
    quiet = kwargs.pop("quiet")
    try:
        strategies, preset_common = load_strategies(spec)
        common = preset_common | _common(config, kwargs, "compare")
        result = run_compare(
            strategies,
            common,
            out,
            log=None if quiet else (lambda s: typer.echo(s, err=True)),
            runner=lambda cfg, **kw: run_with_progress(cfg, kw["resume"], kw["overwrite"], quiet),
        )
    except LeantuneError as e:
        fail(str(e))
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
                            help="A preset (default, lora) or a YAML file: a list of strategy "
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
            ]
        ),
    )
)


# ---------------------------------------------------------------------------- sweep


def sweep(**kwargs: Any) -> None:
    """Search hyperparameters with Optuna (TPE, median pruning after each epoch).

    The study lives in <out>/study.db: run the same command again after an interruption and it
    goes on where it stopped. The best configuration is written to <out>/best.yaml for
    leantune tune --config. The other options are fixed for every trial.
    """
    from leantune.sweep import read_space, run_sweep

    config, out, space, trials = (kwargs.pop(k) for k in ("config", "out", "space", "trials"))
    quiet = kwargs.pop("quiet")
    try:
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
        )
    except LeantuneError as e:
        fail(str(e))
    if result.get("interrupted"):
        typer.echo("leantune: interrupted; run the same command to continue the sweep", err=True)
        raise typer.Exit(130)
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
            ]
        ),
    )
)
