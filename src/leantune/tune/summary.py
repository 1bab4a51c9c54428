"""summary.json of a tune run: the task metric before and after, the cost (trainable
parameters, adapter bytes, peak memory, time) and the knowledge kept."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leantune.adapters.accounting import ParameterReport
from leantune.analysis.evaluate import Evaluation
from leantune.analysis.knowledge import knowledge_kept
from leantune.core.files import folder_bytes
from leantune.core.memory import peak_memory_mb
from leantune.models.loading import model_dir
from leantune.models.precision import autocast
from leantune.train.interface import TrainResult
from leantune.tune.finished import probe_verdict, side_by_side, task_key
from leantune.tune.options import PROBE

if TYPE_CHECKING:
    from leantune.tune.run import TuneRecipe


def summarize(
    recipe: TuneRecipe,
    result: TrainResult,
    best: dict[str, float],
    report: ParameterReport,
    saved: Path,
    test: Evaluation,
    adapt_info: dict[str, Any],
) -> dict[str, Any]:
    """summary.json's contents (and the one line it says: task gained, knowledge kept)."""
    config, prep, final = recipe.config, recipe.prep, recipe.folder.final
    summary: dict[str, Any] = {
        "run": str(final),
        "model": str(model_dir(config.model, config.task)),
        "task": config.task,
        "method": config.method,
        **{f"test_{k}": v for k, v in test.metrics.items()},
        **report.as_dict(),
        "adapter_bytes": folder_bytes(saved),
        "adapter_path": str(final / saved.relative_to(recipe.run)),
        "peak_memory_mb": round(peak_memory_mb(prep.device), 1),
        "train_seconds": round(result.train_seconds, 2),
        "examples_per_s": round(result.examples_per_s, 2),
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "best_step": int(best.get("step", 0)),
        f"best_val_{config.metric}": best.get(f"val_{config.metric}"),
        "train_examples": len(prep.train),
        "val_examples": len(prep.val),
        "test_examples": len(prep.test),
        "device": str(prep.device),
        **adapt_info,
    }
    key = task_key(config, test.metrics)
    for metric, value in recipe.task_before.items():
        if metric in test.metrics:
            summary[f"test_{metric}_before"] = value
    summary["task_gain"] = test.metrics[key] - recipe.task_before[key]
    if recipe.probe is not None and config.method != PROBE:
        # --warm-head: "before" is the frozen model with the probe's head, the bar to beat.
        summary[f"probe_test_{key}"] = recipe.task_before[key]
        summary |= {f"probe_val_{k}": v for k, v in recipe.probe.val.items()}
    if recipe.ref is not None:
        with autocast(config.precision, prep.device):
            kept = knowledge_kept(prep.model, recipe.ref)
        summary |= kept | {"reference_source": recipe.ref.source}
        summary["knowledge_share_of_wall"] = round(
            kept["knowledge_seconds"] / (time.perf_counter() - recipe.wall), 4
        )
    recipe.say(side_by_side(summary, key))
    if (verdict := probe_verdict(summary, config.metric or key)) is not None:
        recipe.say(verdict)
    if prep.scores is not None:
        summary["select_seconds"] = round(prep.scores.seconds, 2)
        summary["select_share_of_wall"] = round(
            prep.scores.seconds / (time.perf_counter() - recipe.wall), 4
        )
    # The run from its start to this summary (loading, probe, baseline, training, test,
    # generation, knowledge kept), beside train_seconds.
    summary["wall_seconds"] = round(time.perf_counter() - recipe.wall, 1)
    return summary
