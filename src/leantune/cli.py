"""The ``leantune`` command. Bad input prints one line to stderr and exits 2, no traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from leantune.errors import LeantuneError

app = typer.Typer(
    help="Parameter-efficient fine-tuning that picks the parameters that matter.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Parameter-efficient fine-tuning that picks the parameters that matter."""


def fail(message: str) -> None:
    typer.echo(f"leantune: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def info(
    path: Annotated[
        Path, typer.Argument(help="An adapter folder (adapter_config.json + safetensors).")
    ],
) -> None:
    """Show what an adapter folder holds: method, targets, ranks, tensors and sizes."""
    from leantune.formats import CONFIG_NAME, WEIGHTS_NAME, read_adapter_files

    try:
        config, tensors = read_adapter_files(path)
    except LeantuneError as e:
        fail(str(e))
        return
    count = sum(t.numel() for t in tensors.values())
    targets = config.get("target_modules")
    shown = targets if isinstance(targets, str) else f"{len(targets or [])} modules"
    rows = [
        ("method", f"{config.get('peft_type')}" + (" (DoRA)" if config.get("use_dora") else "")),
        ("rank / alpha", f"{config.get('r')} / {config.get('lora_alpha')}"),
        ("rank_pattern", json.dumps(config.get("rank_pattern") or {})),
        ("rsLoRA", str(bool(config.get("use_rslora")))),
        ("targets", shown),
        ("modules_to_save", json.dumps(config.get("modules_to_save"))),
        ("task_type", str(config.get("task_type"))),
        ("base model", str(config.get("base_model_name_or_path"))),
        ("tensors", f"{len(tensors)} holding {count:,} parameters"),
        ("file bytes", f"{(Path(path) / WEIGHTS_NAME).stat().st_size:,} ({WEIGHTS_NAME})"),
        ("config", str(Path(path) / CONFIG_NAME)),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except LeantuneError as e:
        print(f"leantune: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
