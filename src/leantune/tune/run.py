"""The tune run as a recipe of named phases, each a method of :class:`TuneRecipe`:

1. ``setup_training`` loads and checks everything (model, data, method, schedules, penalties)
   and writes nothing, so bad input never touches the disk;
2. ``write_start`` takes the run's lock and writes the partial run folder (config.yaml,
   labels.json, plan.json and its heatmap);
3. ``baseline`` measures the model before any step (test metrics, the knowledge reference);
4. ``train`` runs the one loop (:func:`leantune.train.loop.train`) with the run's hooks;
5. ``finish`` puts the best weights back, saves them, tests, writes the summary and the report
   and switches the finished folder into place (see :mod:`leantune.tune.runfolder`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leantune.adapters.accounting import ParameterReport, parameter_report
from leantune.adapters.config import METHODS
from leantune.analysis.general import GeneralMeasure
from leantune.analysis.knowledge import Reference, prepare_reference, reference_texts
from leantune.core import distributed
from leantune.core.defaults import cache_root
from leantune.core.distributed import Parallel, together
from leantune.core.errors import LeantuneError
from leantune.core.files import atomic_write, load_into, read_tensors, unique_tensors
from leantune.core.memory import Phases, reset_peak_memory
from leantune.models.loading import max_positions, num_layers
from leantune.models.precision import autocast
from leantune.train.adapt import RankPruner
from leantune.train.checkpoint import checkpoint_meta, latest_checkpoint, trainable_parameters
from leantune.train.frozen_cache import FrozenLayerCache
from leantune.train.interface import Diverged, Progress, TrainHooks, TrainResult
from leantune.train.loop import train
from leantune.train.schedule import Unfreezer, adapter_lr_scales, lr_scales
from leantune.tune import runfolder
from leantune.tune.baseline_cache import measure_before
from leantune.tune.config import (
    TuneConfig,
    started_with,
    train_config,
    write_config,
)
from leantune.tune.fingerprint import data_fingerprint
from leantune.tune.finished import (
    BEST,
    check_same_start,
    reference_fingerprint,
    save_trained,
    validation_line,
)
from leantune.tune.options import DEFAULT_MODEL_TITLES, PROBE
from leantune.tune.prepare import Prepared, pick_device, prepare
from leantune.tune.runfolder import RunFolder
from leantune.tune.strategy import (
    apply_min_steps,
    grow_ranks,
    make_penalty,
    penalties_for_the_adapter,
    probe_result,
    warm_start,
)
from leantune.tune.summary import split_setup, summarize, write_results
from leantune.tune.track import Tracker, check_backends

STATE = runfolder.STATE


def run_tune(
    config: TuneConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    on_step: Callable[[Progress, int], None] | None = None,
    on_validation: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Run the tune job; returns the summary (``{"interrupted": True, ...}`` after Ctrl-C).

    Everything is checked before anything is written; the run is built in its partial folder
    and replaces ``runs/<name>`` only once finished (see :mod:`leantune.tune.runfolder`).
    ``on_validation`` sees each validation row (step, epoch, val_<metric>...) once it is saved;
    an exception it raises (a sweep's pruning) ends the run there, checkpoint kept."""
    started = time.perf_counter()
    l2_given = config.l2 is not None
    config = config.resolved()
    use_cuda = pick_device(config.device).type == "cuda"
    world = distributed.join(use_cuda, config.dist_timeout)  # under torchrun: the others
    folder = RunFolder(config.runs_dir, str(config.name))

    def check_folder() -> None:
        if not world.main:
            return  # rank 0 alone touches the run folder
        if folder.root.is_dir():  # finish what a killed process left half-way
            with folder.lock():
                folder.recover()
        folder.check(resume, overwrite)  # fails fast; checked again under the lock

    together(check_folder, "checking the run folder")
    recipe = TuneRecipe(config, folder, resume, overwrite, log, on_step, on_validation)
    recipe.l2_given = l2_given  # the plan's adapter may have another L2 default
    recipe.wall, phase = started, recipe.phases
    try:
        with contextlib.ExitStack() as stack:
            with phase("load"):
                together(recipe.setup_training, "setup")
                recipe.join_world()
                together(lambda: recipe.write_start(stack), "writing the run folder")
            split_setup(recipe)
            with phase("baseline"):
                recipe.baseline()
            with phase("training"):
                result = recipe.train()
            return recipe.finish(result)
    except torch.distributed.DistError as e:  # a process died, hangs or cannot be reached
        raise distributed.lost_contact(e, folder.work) from None


class TuneRecipe:
    """One tune run, built phase by phase (see the module docstring for the phases)."""

    prep: Prepared
    samples_before: list[dict[str, str]]
    general: GeneralMeasure | None = None
    l2_given: bool = True
    fingerprint: dict[str, Any]
    report: ParameterReport
    named: dict[str, nn.Parameter]
    scales: dict[str, float]
    run: Path
    tracker: Tracker
    task_before: dict[str, float]
    texts: list[str]
    source: str

    def __init__(
        self,
        config: TuneConfig,
        folder: RunFolder,
        resume: bool,
        overwrite: bool,
        log: Callable[[str], None] | None,
        on_step: Callable[[Progress, int], None] | None,
        on_validation: Callable[[dict[str, float]], None] | None,
    ) -> None:
        self.config, self.folder, self.resume, self.overwrite = config, folder, resume, overwrite
        self.say: Callable[[str], None] = log or (lambda s: None)
        self.on_step, self.on_validation = on_step, on_validation
        self.wall = time.perf_counter()
        self.phases = Phases()  # where the run's wall time goes (summary.json, the report)
        self.state = folder.work / STATE
        self.pruner: RankPruner | None = None
        self.unfreezer: Unfreezer | None = None
        self.frozen: FrozenLayerCache | None = None
        self.ref: Reference | None = None
        # The best weights travel inside the checkpoint unit, so they always match its progress.
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.saved_best: dict[str, float] = {}

    # ------------------------------------------------------------------------ phases

    def setup_training(self) -> None:
        """Load and check the model, data, method, schedules and penalties; writes nothing."""
        config, folder = self.config, self.folder
        reset_peak_memory(pick_device(config.device))  # this run's peak, not an earlier run's
        plan_file = folder.work / "plan.json"
        if self.resume and plan_file.exists():  # the plan the run started with, not a new one
            self.prep = prepare(replace(config, select=None, plan=str(plan_file)))
            self.prep.config = config
        else:
            self.prep = prepare(config)
        config = penalties_for_the_adapter(config, self.prep.model, self.l2_given)
        self.config = self.prep.config = config
        self.fingerprint = data_fingerprint(config)
        if self.resume and distributed.current().main:
            check_same_start(config, folder, self.fingerprint)
        model, prep = self.prep.model, self.prep
        # The global batch (a resume keeps its own) before what depends on it is set.
        world = distributed.current()
        rows = config.batch_size * world.size
        if self.resume:
            meta = checkpoint_meta(self.state) if world.main else {}
            rows = distributed.broadcast_json(meta.get("global_batch")) or rows
        self.use_global_batch(rows)
        config = self.config = prep.config = apply_min_steps(config, len(prep.batches(0)), self.say)
        total_steps = math.ceil(len(prep.batches(0)) / config.grad_accum) * config.epochs
        if config.adapt > 1:
            self.pruner = grow_ranks(model, config, total_steps, self.say)
        if config.causal:  # checked before anything is written
            self.general = GeneralMeasure.of(config.general_examples, config.precision)
        self.texts, self.source = (
            reference_texts(config.reference_text, config.reference_examples, config.seed)
            if config.reference_examples
            else ([], "")
        )
        with distributed.whole(prep.sharded):
            self.report = report = parameter_report(model)
        self.say(
            f"{config.method} on {config.model or DEFAULT_MODEL_TITLES[config.task]}: "
            f"{report.trainable:,} of {report.total:,} parameters trainable "
            f"({report.percent:.2f}%); {len(prep.train)} train / {len(prep.val)} validation / "
            f"{len(prep.test)} test texts"
        )
        # Gradual schedules and penalties: checked (and the Fisher measured) before anything is
        # written.
        self.named = named = trainable_parameters(model)
        n_layers = num_layers(model) or 0
        self.scales = lr_scales(
            named,
            n_layers=n_layers,
            layer_decay=config.layer_decay,
            adapters=adapter_lr_scales(model, loraplus_ratio=config.loraplus_ratio),
        )
        if config.unfreeze_every:
            self.unfreezer = Unfreezer(named, n_layers, config.unfreeze_every, total_steps)
        self.penalty = make_penalty(model, config, prep)
        for note in prep.notes:
            self.say(note)
        check_backends(config.track)
        self.probe = warm_start(prep)  # --method probe, --warm-head: the fitted head
        if self.probe is not None:
            how = "read from the cache" if self.probe.cached else "computed"
            val = ", ".join(f"{k} {v:.4f}" for k, v in self.probe.val.items())
            self.say(
                f"probe: head fitted in {self.probe.seconds:.1f} s (features {how}); val {val}"
            )

    def join_world(self) -> None:
        """Under several processes: stop when they were started differently; say the global
        batch (fixed in :meth:`setup_training`)."""
        config = self.config
        distributed.agree([self.fingerprint, started_with(config)], "the data or the options")
        world = distributed.current()
        rows = self.prep.batch_rows or config.batch_size
        if rows != config.batch_size or world.parallel:
            self.say(f"{world.size} process(es): {rows} rows per step, {rows / world.size:g} each")

    def use_global_batch(self, rows: int | None) -> None:
        if rows:
            self.prep.use_batch_rows(rows)

    def write_start(self, stack: contextlib.ExitStack) -> None:
        """Under the run's lock (held until the run ends): the partial folder's first files."""
        from leantune.tune.figures import write_heatmap

        config, folder, prep = self.config, self.folder, self.prep
        self.run = folder.work
        self.tracker = Tracker(None, folder.work, {}, name=folder.name)  # off on ranks > 0
        if not distributed.current().main:
            return
        stack.enter_context(folder.lock())
        folder.recover()
        folder.check(self.resume, self.overwrite)
        self.run = run = folder.begin(self.resume, data_sha256=self.fingerprint)
        if not self.resume:
            write_config(config, run / "config.yaml")
            atomic_write(run / "labels.json", json.dumps(prep.splits.label_names, indent=1) + "\n")
            if prep.plan is not None:
                prep.plan.save(run / "plan.json")
        if prep.scores is not None:
            write_heatmap(run / "importance.png", prep.scores.by_layer_and_kind("fisher"), "Fisher")
            counts = Counter(e.method for e in prep.plan.entries) if prep.plan else Counter()
            self.say(
                "selected " + ", ".join(f"{n} {m}" for m, n in counts.items()) + " module(s) in "
                f"{prep.scores.seconds:.1f} s on {prep.scores.examples} examples"
            )
        self.tracker = Tracker(config.track, run, asdict(config), name=folder.name)

    def read_best(self) -> None:
        """--resume: the best weights so far, from the checkpoint (rank 0 reads, all get them)."""
        data = b""
        if distributed.current().main:
            unit = latest_checkpoint(self.state)
            if unit is not None and (unit / BEST).is_file():
                data = (unit / BEST).read_bytes()
        data = distributed.broadcast_bytes(data)
        if data:
            self.best_weights = read_tensors(data, BEST)

    def baseline(self) -> None:
        """The original model's behaviour, before any step (adapters start as the identity)."""
        config, prep, model = self.config, self.prep, self.prep.model
        if self.resume:
            self.read_best()
        if self.texts:
            fingerprint = reference_fingerprint(config)
            with autocast(config.precision, prep.device):
                self.ref = prepare_reference(
                    model,
                    prep.tok,
                    self.texts,
                    self.source,
                    causal=config.causal,
                    max_length=min(64, max_positions(model) or 64),
                    fingerprint=fingerprint,
                )
            if self.ref.cached:
                self.say(f"knowledge kept: the original model's side read from {cache_root()}")
        elif config.reference_examples:
            self.say(
                "knowledge kept: no reference text (install fortunes-min or give --reference-text)"
            )
        self.task_before, self.samples_before, kept = measure_before(config, prep, self.general)
        if kept:
            self.say(f"before: the original model's answers read from {cache_root()}")
        if config.cache_prefix:
            self.frozen = FrozenLayerCache(model, [len(x) for x in prep.train.ids])
            self.say(
                f"frozen prefix: layers below {self.frozen.start} are cached after the first epoch"
                if self.frozen.active
                else "frozen prefix: nothing to cache (the lowest layer or embeddings are trained)"
            )

    def train(self) -> TrainResult:
        """The one loop with the run's hooks; a divergence or an error closes the tracker."""
        prep, pruner, unfreezer = self.prep, self.pruner, self.unfreezer
        world = distributed.current()
        if self.config.method == PROBE and self.probe is not None:
            result = probe_result(prep, self.probe)
            self.on_eval(result.history[0], result.history)
            return result
        hooks = TrainHooks(
            on_best=self.on_best,
            log=self.on_eval,
            on_step=self.on_step,
            forward=self.frozen.forward if self.frozen is not None else prep.forward,
            unfreeze=unfreezer.apply if unfreezer is not None else None,
            penalty=self.penalty if self.penalty else None,
            on_grads=pruner.observe if pruner is not None else None,
            after_step=pruner.after_step if pruner is not None else None,
            checkpoint_extra=self.extra_files,
        )
        try:
            return train(
                prep.model,
                prep.batches,
                lambda m: prep.evaluate(prep.val).metrics,
                train_config(self.config),
                hooks,
                checkpoint=self.state,
                resume=self.resume,
                lr_scales=self.scales,
                checkpoint_meta={
                    "data_sha256": self.fingerprint,
                    "config": started_with(self.config),
                    "global_batch": self.prep.batch_rows,
                },
                parallel=Parallel(world) if world.parallel else None,
            )
        except Diverged as e:
            self.tracker.close("FAILED")
            last = (
                f"the last good checkpoint (step {self.folder.checkpoint_step()}) is kept in "
                f"{self.run}; "
                if self.folder.resumable()
                else ""
            )
            raise LeantuneError(
                f"{e}. Nothing was saved as the run's result; {last}start over with --overwrite"
            ) from None
        except BaseException:
            self.tracker.close("FAILED")
            raise
        finally:
            if unfreezer is not None:
                unfreezer.release()

    def finish(self, result: TrainResult) -> dict[str, Any]:
        """Best weights back, saved, tested; summary, report, and the switch into place."""
        model = self.prep.model
        if result.interrupted:
            self.tracker.close("KILLED")
            return {"interrupted": True, "step": result.steps, "run": str(self.folder.final)}
        best = result.best or {}
        if self.pruner is not None:
            if not self.saved_best:  # no validation after pruning ended: the final weights
                self.best_weights = unique_tensors(self.named)
                self.saved_best.update(result.history[-1] if result.history else {})
            best = self.saved_best
        distributed.settle(model)
        if self.best_weights is not None:
            load_into(model, self.best_weights, self.state / BEST)
        adapt_info: dict[str, Any] = {}
        report = self.report
        if self.pruner is not None:
            ranks = self.pruner.finalize()
            adapt_info = {"adapt_start_params": report.trainable, "adapt_ranks": ranks}
            report = parameter_report(model)
        phase = self.phases
        with phase("save"):
            saved = self.save_trained()
        with phase("test"):
            test = self.prep.evaluate_test()
        if self.general is not None:
            with phase("generation"):
                self.general.answer_after(model, self.prep.tok)
        with phase("knowledge"):
            summary = summarize(self, result, best, report, saved, test, adapt_info)
        if not distributed.current().main:
            return summary  # rank 0 writes the rest
        write_results(self, result, test, summary)
        self.folder.commit()
        return summary

    # ------------------------------------------------------------------------ hooks

    def save_trained(self) -> Path:
        """The trained adapter or weights, written by rank 0 (FSDP: from whole blocks)."""
        with distributed.whole(self.prep.sharded):
            if distributed.current().main:
                return save_trained(self.prep.model, self.run, self.config)
        return self.run / ("adapter" if self.config.method in METHODS else "trained")

    def on_best(self, model: nn.Module, row: dict[str, float]) -> None:
        if self.pruner is not None and not self.pruner.done:
            return  # a best checkpoint must be at the target size
        # Copies: on the CPU .cpu() and .contiguous() return the live parameters themselves.
        self.best_weights = {k: t.clone() for k, t in unique_tensors(self.named).items()}
        self.pending[BEST] = self.best_weights
        self.saved_best.clear()
        self.saved_best.update(row)

    def extra_files(self) -> dict[str, dict[str, torch.Tensor]]:
        files = dict(self.pending)
        self.pending.clear()
        return files

    def on_eval(self, row: dict[str, float], history: list[dict[str, float]]) -> None:
        if not distributed.current().main:
            return
        self.say(validation_line(row))
        # Rewritten whole from the loop's history, so a resumed run's file stays complete.
        atomic_write(self.run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        self.tracker.log(row, int(row["step"]))
        if self.on_validation is not None:
            self.on_validation(row)
