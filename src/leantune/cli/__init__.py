"""The ``leantune`` command. Bad input prints one line to stderr and exits 2, no traceback.

``tune``'s options are generated from :class:`leantune.tune.TuneConfig`: each field's docstring
is its help text, so the config file, the CLI and the docs cannot drift apart.
"""

from __future__ import annotations

import sys

# Importing them adds their commands, in this order: tune, select (runs imports tune first),
# compare, sweep, then the saved-run commands, then combine.
from leantune.cli import finished, runs, tune  # noqa: F401

# isort: split
from leantune.cli import combine, export  # noqa: F401
from leantune.cli.common import app, fail
from leantune.core.errors import LeantuneError

__all__ = ["app", "fail", "main"]


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except LeantuneError as e:
        print(f"leantune: {e}", file=sys.stderr)
        sys.exit(2)
