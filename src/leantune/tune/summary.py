"""summary.json of a tune run: the task metric before and after, the cost (trainable
parameters, adapter bytes, peak memory, time) and the knowledge kept."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from leantune.adapters.accounting import ParameterReport
from leantune.analysis.evaluate import Evaluation
from leantune.analysis.general import general_line
from leantune.analysis.knowledge import knowledge_kept
from leantune.core.distributed import gather_tensors
from leantune.core.files import atomic_write, folder_bytes
from leantune.core.memory import Phases, host_peak_mb, peak_memory_mb, process_seconds
from leantune.models.loading import model_dir
from leantune.models.precision import autocast
from leantune.train.interface import TrainResult
from leantune.tune.finished import (
    HISTORY,
    paired,
    probe_verdict,
    side_by_side,
    task_key,
    write_run_report,
)
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
        **rank_peaks(prep.device),
        "train_seconds": round(result.train_seconds, 2),
        "examples_per_s": round(result.examples_per_s, 2),
        "steps": result.steps,
        # fp16: the loss scaler ran (its last scale) and the steps it skipped on overflow.
        **(
            {"fp16_loss_scale": result.loss_scale, "fp16_skipped_steps": result.skipped_steps}
            if result.loss_scale is not None
            else {}
        ),
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
    if recipe.general is not None:
        summary |= recipe.general.summary()
    recipe.say(side_by_side(summary, key) + general_line(summary))
    if (verdict := probe_verdict(summary, config.metric or key)) is not None:
        recipe.say(verdict)
    if prep.scores is not None:
        summary["select_seconds"] = round(prep.scores.seconds, 2)
        summary["select_share_of_wall"] = round(
            prep.scores.seconds / (time.perf_counter() - recipe.wall), 4
        )
    return summary


def rank_peaks(device: torch.device) -> dict[str, Any]:
    """The peak memory so far: ``peak_memory_mb`` (CUDA: the GPU's peak allocation, else the
    process's peak resident memory) and on CUDA the host's as well; under torchrun every
    rank's (a collective: every rank calls it), the largest as the headline figure."""
    own = [peak_memory_mb(device), host_peak_mb()]
    every = [t.tolist() for t in gather_tensors(torch.tensor(own, dtype=torch.float64))]
    out: dict[str, Any] = {"peak_memory_mb": round(max(r[0] for r in every), 1)}
    if device.type == "cuda":
        out["host_peak_memory_mb"] = round(max(r[1] for r in every), 1)
    if len(every) > 1:
        out["peak_memory_mb_by_rank"] = [round(r[0], 1) for r in every]
    return out


def final_resources(
    summary: dict[str, Any], device: torch.device, phases: Phases, wall: float
) -> dict[str, Any]:
    """The whole run's figures, read after its last work (rank 0, after the report): the peak
    memory again (the report and generation count), the run's wall time and its phases, and
    the time since the process started (imports included: what ``/usr/bin/time`` says)."""
    out: dict[str, Any] = {}
    own, host = peak_memory_mb(device), host_peak_mb()
    by_rank = list(summary.get("peak_memory_mb_by_rank") or [])
    if by_rank:
        by_rank[0] = round(max(by_rank[0], own), 1)
        out["peak_memory_mb_by_rank"] = by_rank
    out["peak_memory_mb"] = round(max(summary.get("peak_memory_mb", 0.0), own), 1)
    if device.type == "cuda":
        out["host_peak_memory_mb"] = round(max(summary.get("host_peak_memory_mb", 0.0), host), 1)
    out["wall_seconds"] = round(time.perf_counter() - wall, 2)
    out["phase_seconds"] = phases.rounded()
    if (since := process_seconds()) is not None:
        out["process_seconds"] = round(since, 1)
    return out


def split_setup(recipe: TuneRecipe) -> None:
    """The setup phase's selection and probe apart from loading."""
    prep, probe = recipe.prep, recipe.probe
    for name, seconds in (
        ("selection", prep.scores.seconds if prep.scores is not None else 0.0),
        ("probe", probe.seconds if probe is not None else 0.0),
    ):
        if seconds:
            recipe.phases.add("load", -seconds)
            recipe.phases.add(name, seconds)


def write_results(
    recipe: TuneRecipe, result: TrainResult, test: Evaluation, summary: dict[str, Any]
) -> None:
    """Rank 0's files of a finished run: history.json, the tracker's last row, the report with
    the whole run's figures (read after the last work: the page is written again, without
    redrawing the figures, once they are known), and summary.json last: a folder with it is a
    finished run."""
    run, phase = recipe.run, recipe.phases
    extra: dict[str, Any] = {"curve": result.curve, "confusion": test.confusion}
    if test.samples:
        extra["samples"] = paired(recipe.samples_before, test.samples)
    if recipe.general is not None:
        extra["general"] = recipe.general.table()
    atomic_write(run / HISTORY, json.dumps(extra) + "\n")
    recipe.tracker.log({f"final/{k}": v for k, v in summary.items()}, result.steps)
    recipe.tracker.close()
    device = recipe.prep.device
    with phase("report"):
        write_run_report(run, summary)  # the figures (drawing them takes memory of its own)
        summary |= final_resources(summary, device, phase, recipe.wall)
        write_run_report(run, summary, figures=False)  # the page with the final figures
    summary |= final_resources(summary, device, phase, recipe.wall)
    atomic_write(run / "summary.json", json.dumps(summary, indent=2) + "\n")
