"""``python -m leantune.cli``."""

from leantune.cli import main

main()
