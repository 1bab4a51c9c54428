"""What every command shares: the app, how a bad input fails, the generated options."""

from __future__ import annotations

import inspect
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

app = typer.Typer(
    help="Parameter-efficient fine-tuning that picks the parameters that matter.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RunArg = Annotated[Path, typer.Argument(help="A run folder written by leantune tune.")]


@app.callback()
def _root() -> None:
    """Parameter-efficient fine-tuning that picks the parameters that matter."""


def fail(message: str) -> typing.NoReturn:
    typer.echo(f"leantune: {message}", err=True)
    raise typer.Exit(2)


def config_options(extra: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """``--config`` and ``extra``, then one option per TuneConfig field, all "not given" by
    default so a YAML file's values survive unless the command line names them."""
    from leantune.tune import TuneConfig, option_docs
    from leantune.tune.config import option_groups

    hints = typing.get_type_hints(TuneConfig)
    docs, groups = option_docs(), option_groups()
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Optional[Path],  # noqa: UP045 - typer reads typing.Optional
                typer.Option(help="YAML file of options; options given here override it."),
            ],
        ),
        *extra,
    ]
    for f in fields(TuneConfig):
        base = next(
            a for a in typing.get_args(hints[f.name]) or (hints[f.name],) if a is not type(None)
        )
        flag = "--" + f.name.replace("_", "-")
        default = "" if f.default is MISSING or f.default is None else f" (default: {f.default})"
        decls = [f"{flag}/--no-{flag[2:]}"] if base is bool else [flag]
        option = typer.Option(
            *decls,
            help=docs.get(f.name, "") + default,
            show_default=False,
            rich_help_panel=groups.get(f.name),
        )
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[Optional[base], option],  # noqa: UP045
            )
        )
    return params


def flag(name: str, help: str) -> inspect.Parameter:
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[bool, typer.Option(f"--{name}", help=help)],
    )


def with_signature(func: Any, params: list[inspect.Parameter]) -> Any:
    func.__signature__ = inspect.Signature(params)
    func.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return func


def option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


def print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")
