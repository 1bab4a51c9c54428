"""``leantune compare``: run each strategy (:mod:`leantune.search.strategies`) into its own run
folder and write the table; with ``storage``, as one worker of a shared study
(:mod:`leantune.search.workers`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from leantune.search.setup import check_setup
from leantune.search.strategies import Strategy, run_strategy, strategy_configs, write_table
from leantune.search.workers import compare_worker


def run_compare(
    strategies: Sequence[Strategy],
    common: Mapping[str, Any],
    out: Path,
    *,
    slack: float = 0.005,
    log: Callable[[str], None] | None = None,
    runner: Callable[..., dict[str, Any]] | None = None,
    storage: str | None = None,
    study_name: str = "leantune",
) -> dict[str, Any]:
    """Run each strategy into ``out/<name>/`` (finished ones are read back), then write the
    table, the Pareto plots and report.html. Returns {"rows", "recommendation", ...}.

    With ``storage`` (an Optuna RDB URL) this process is one worker of the shared study
    ``study_name``: it runs the strategies no other worker has taken."""
    from leantune.tune import run_tune

    say = log or (lambda s: None)
    run = runner or run_tune
    out = Path(out)
    configs, setup, metric = strategy_configs(strategies, common, out)
    if storage is not None:
        where = (storage, study_name)
        return compare_worker(strategies, configs, setup, common, out, where, slack, say, run)
    check_setup(out, setup, "comparison")
    rows = []
    for i, (s, cfg) in enumerate(zip(strategies, configs, strict=True), 1):
        row = run_strategy(f"[{i}/{len(strategies)}] {s.name}", cfg, out, metric, say, run)
        if row is None:
            return {"interrupted": True, "strategy": s.name, "out": str(out)}
        rows.append(row)
    result = write_table(out, rows, metric, slack)
    result["out"] = str(out)
    return result
