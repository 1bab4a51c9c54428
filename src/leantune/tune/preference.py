"""``--task preference``: the splits and their tokens, the training batches, the validation
metrics, and the reference's log-probs computed once (``--precompute-reference``), for
``tune/prepare.py``'s :class:`Prepared` to delegate to.

**The reference, once.** The reference is the model with its adapters switched off, so it
does not change during training: its sequence log-probs of the training pairs are computed
before the first step (one forward per pair, no gradients) and stored in the cache, keyed by
the model folder (and the base's precision), the token ids (which hold the data and the chat
template) and the objective's rows; each step then runs the policy alone. The default is on:
without it every step runs the reference's forward too, once per epoch per pair, so
precomputing costs one epoch's reference forwards and saves the rest, and a second run on the
same data reads them from the cache. ``--no-precompute-reference`` computes the reference
inside every step (as TRL does by default).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leantune.adapters.formats import load_adapter
from leantune.adapters.inject import unload
from leantune.analysis.evaluate import Encoded, Evaluation
from leantune.analysis.knowledge import folder_fingerprint
from leantune.core.defaults import cache_root
from leantune.core.errors import LeantuneError
from leantune.core.files import read_tensors, save_tensors
from leantune.models.data import length_buckets, stratified_split
from leantune.models.loading import model_dir
from leantune.models.precision import autocast
from leantune.models.preference import (
    PreferenceExample,
    PreferenceTokens,
    bbc_preferences,
    encode_preferences,
    load_preferences,
    preference_batch,
    unpaired,
)
from leantune.train.preference import (
    Objective,
    preference_forward,
    preference_metrics,
    reference_logps,
)
from leantune.tune.config import TuneConfig, read_config

BODY_WORDS = 45
"""Words of each BBC article the embedded instruct and preference data keep (the prompt stays
short on a CPU); ``tune/prepare.py``'s ``BBC_BODY_WORDS``."""
PreferenceSplits = tuple[list[PreferenceExample], list[PreferenceExample], list[PreferenceExample]]


def objective_of(config: TuneConfig) -> Objective:
    return Objective(
        config.objective,
        beta=config.beta,
        gamma=config.simpo_gamma,
        desirable_weight=config.desirable_weight,
        undesirable_weight=config.undesirable_weight,
    )


def _sample(rows: list[PreferenceExample], n: int | None, seed: int) -> list[PreferenceExample]:
    if n is None or n >= len(rows):
        return rows
    picked = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in picked]


def load_preference_splits(config: TuneConfig, body_words: int = BODY_WORDS) -> PreferenceSplits:
    """Train, validation and test rows: --data (and --eval-data / --test-data) or the embedded
    BBC headline pairs; paired rows unpaired for --objective kto, unpaired rows refused for
    the paired objectives."""
    if config.data is None:
        train, val, test = bbc_preferences(config.seed, config.fractions(), body_words)
    else:
        rows = load_preferences(config.data, config.prompt_column)
        given = [
            load_preferences(p, config.prompt_column) if p else None
            for p in (config.eval_data, config.test_data)
        ]
        train_f, val_f, test_f = config.fractions()
        val_f, test_f = (0.0 if given[0] else val_f), (0.0 if given[1] else test_f)
        total = train_f + val_f + test_f
        if total <= 0:
            raise LeantuneError("--split leaves no training data")
        fractions = (train_f / total, val_f / total, test_f / total)
        parts = stratified_split([0] * len(rows), fractions, config.seed)
        train = [rows[i] for i in parts[0]]
        val = given[0] or [rows[i] for i in parts[1]]
        test = given[1] or [rows[i] for i in parts[2]]
    out = []
    for what, part in (("training", train), ("validation", val), ("test", test)):
        if not part:
            raise LeantuneError(
                f"the {what} split has no preference rows; give more rows, a separate file, "
                "or other --split fractions"
            )
        if config.objective == "kto":
            part = unpaired(part)
        elif not all(ex.paired for ex in part):
            raise LeantuneError(
                f"--objective {config.objective} needs pairs (chosen/rejected), and the "
                f"{what} data holds prompt/completion/label rows; use --objective kto"
            )
        out.append(part)
    limits = (config.train_examples, config.eval_examples, config.eval_examples)
    train, val, test = (_sample(p, n, config.seed) for p, n in zip(out, limits, strict=True))
    return train, val, test


@dataclass
class PreferenceRun:
    """A preference run's tokens and objective; what ``Prepared`` delegates to."""

    objective: Objective
    train: PreferenceTokens
    val: PreferenceTokens
    test: PreferenceTokens
    notes: list[str] = field(default_factory=list)

    def encoded(self, data: PreferenceTokens) -> Encoded:
        """The chosen (or unpaired) sequences as instruct data (their answers labelled): what
        selection, the keep loss's sizes and the counts see."""
        labels = [
            [-100] * start + seq[start:]
            for seq, start in zip(data.sides[0], data.starts[0], strict=True)
        ]
        return Encoded(data.sides[0], targets=labels)

    def batches(self, prep: Any, epoch: int) -> list[dict[str, torch.Tensor]]:
        """This epoch's training batches (``prep``: the run's Prepared): pairs (or KTO rows)
        of similar lengths together, shuffled per epoch."""
        rows = prep.batch_rows or prep.config.batch_size
        lengths = [len(s) for s in self.train.sides[0]]
        order = length_buckets(lengths, rows, seed=prep.config.seed * 100_003 + epoch)
        return [preference_batch(self.train, r, prep.tok.pad_token_id) for r in order]

    def evaluate(self, prep: Any, enc: Encoded) -> Evaluation:
        """The metrics of the split ``enc`` stands for (prep.val, prep.test or prep.train)."""
        data = self.val if enc is prep.val else self.test if enc is prep.test else self.train
        rows = list(range(len(data)))
        size, pad = prep.config.eval_batch_size, prep.tok.pad_token_id
        batches = [
            preference_batch(data, rows[k : k + size], pad) for k in range(0, len(rows), size)
        ]
        return Evaluation(preference_metrics(self.objective, prep.model, batches, prep.device))


def encode_run(
    tok: Any, config: TuneConfig, splits: PreferenceSplits, length: int
) -> PreferenceRun:
    notes = []
    encoded = []
    for what, part in zip(("the training data", "validation", "test"), splits, strict=True):
        data = encode_preferences(tok, part, length)
        if data.truncated:
            notes.append(
                f"{what}: {data.truncated} of {len(part)} preference rows cut to --max-length "
                f"{length} from the prompt side (the answers kept)"
            )
        encoded.append(data)
    return PreferenceRun(objective_of(config), encoded[0], encoded[1], encoded[2], notes)


def _cache_key(config: TuneConfig, data: PreferenceTokens) -> str:
    how = [config.precision, config.base_dtype, config.quantize, data.paired]
    digest = hashlib.sha256(folder_fingerprint(model_dir(config.model, config.task)).encode())
    digest.update(json.dumps([how, data.sides, data.starts]).encode())
    return digest.hexdigest()[:32]


@torch.no_grad()
def precompute_reference(
    data: PreferenceTokens,
    model: nn.Module,
    config: TuneConfig,
    pad_id: int,
    device: torch.device,
    autocast: Callable[[], Any],
) -> bool:
    """The reference's log-probs of ``data``'s rows into ``data.ref``, from the cache when
    there (True) or computed with the adapters off and cached (False)."""
    path = cache_root() / "preference-reference" / f"{_cache_key(config, data)}.safetensors"
    if path.is_file():
        data.ref = read_tensors(path, path)["ref"]
        return True
    was = model.training
    model.eval()
    out = torch.zeros(len(data), 2)
    rows = list(range(len(data)))
    try:
        for k in range(0, len(rows), config.eval_batch_size):
            part = rows[k : k + config.eval_batch_size]
            batch = {key: v.to(device) for key, v in preference_batch(data, part, pad_id).items()}
            with autocast():
                main, kl = reference_logps(model, batch)
            main = main.float().cpu()
            if data.paired:
                out[part, 0], out[part, 1] = main.chunk(2)
            else:
                assert kl is not None
                out[part, 0], out[part, 1] = main, kl.float().cpu()
    finally:
        model.train(was)
    data.ref = out
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors({"ref": out}, path)
    return False


def start_run(prep: Any, run: PreferenceRun) -> None:
    """The run's loss (``prep.forward``) and, with --precompute-reference, the reference's
    log-probs of the training rows (read from the cache or computed now)."""
    prep.pref = run
    prep.forward = preference_forward(run.objective)
    config = prep.config
    if config.precompute_reference and run.objective.uses_reference:
        cached = [
            precompute_reference(
                data, prep.model, config, prep.tok.pad_token_id, prep.device,
                lambda: autocast(config.precision, prep.device),
            )
            for data in (run.train, run.val, run.test)
        ]  # fmt: skip
        rows = len(run.train) + len(run.val) + len(run.test)
        prep.notes.append(
            f"reference log-probs of {rows} training, validation and test rows "
            + ("read from the cache" if all(cached) else "computed once (adapter off) and cached")
        )


def with_run_model(config: TuneConfig) -> TuneConfig:
    """--from-run: the run's model folder as --model (checked: a finished run with an adapter,
    and the same model as --model when both are given). Refuses a preference run started on
    several processes: they split a batch's rows, and its chosen rows come before the rejected."""
    if config.preference and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LeantuneError(
            "--task preference runs in one process for now (several would part a pair's chosen "
            "and rejected rows); start it without torchrun / accelerate launch"
        )
    if config.from_run is None:
        return config
    run = Path(config.from_run)
    if not (run / "config.yaml").is_file() or not (run / "adapter").is_dir():
        raise LeantuneError(
            f"--from-run {run} is not a finished leantune run with an adapter/ folder; give "
            "runs/<name> of a finished instruct run, or a merged model folder as --model"
        )
    saved = read_config(run / "config.yaml")
    model = saved.get("model")
    if config.model is not None and model_dir(config.model, config.task) != model_dir(
        model, config.task
    ):
        raise LeantuneError(
            f"--from-run {run} was trained on {model or 'the embedded SmolLM2'}, not --model "
            f"{config.model}; drop --model"
        )
    return replace(config, model=model)


def merge_from_run(model: nn.Module, config: TuneConfig) -> None:
    """--from-run: the run's adapter merged into ``model`` (in memory), which is then the start
    and, with the new adapter off, the reference."""
    if config.from_run is not None:
        load_adapter(model, Path(config.from_run) / "adapter")
        unload(model, merge_active=True)


def evaluate_saved(saved: Any, data: Path | None, split: str) -> dict[str, Any]:
    """``leantune eval`` of a preference run (``saved``: finished.py's SavedRun): the metrics of
    its test (or val) split, or of another preference file, the reference computed live."""
    cfg = saved.config
    if data is not None:
        rows = load_preferences(data, cfg.prompt_column)
        rows = unpaired(rows) if cfg.objective == "kto" else rows
        if not all(r.paired for r in rows) and cfg.objective != "kto":
            raise LeantuneError(
                f"{data} holds prompt/completion/label rows; the run is {cfg.objective}"
            )
        where = str(data)
    else:
        _, val, test = load_preference_splits(cfg)
        rows, where = (test if split == "test" else val), f"the {split} split"
    tokens = encode_preferences(saved.tok, rows, saved.max_length)
    size, pad = cfg.eval_batch_size, saved.tok.pad_token_id
    batches = [preference_batch(tokens, list(range(k, min(k + size, len(rows)))), pad)
               for k in range(0, len(rows), size)]  # fmt: skip
    device = next(saved.model.parameters()).device
    metrics = preference_metrics(
        objective_of(cfg), saved.model, batches, device, lambda: autocast(cfg.precision, device)
    )
    return {"data": where, "examples": len(rows), **metrics}
