"""The original model's answers, kept between runs: the "before" side of a causal run.

A causal run answers its test prompts and the general prompts with the untouched model before
any step (``TuneRecipe.baseline``); on the embedded instruct default that is about a fifth of the
run, and it is the same for every run that starts from the same weights on the same test split
with the same evaluation settings — a sweep's trials, seeds of a recipe that differ only in
training options, a rerun. So the results are kept as JSON in leantune's cache folder
(``baseline/``) and read back instead of answered again.

The key is exact, not a guess: a digest of every tensor of the model as it stands before the
first step (base weights, the adapter's start, quantized or cast weights — a model holding a
tensor subclass, e.g. a torchao quantized weight, is not cached), the test split's token ids and
conversations, and every option except those that only act during training (``TRAINING_ONLY``).
A missed hit costs the time it always cost; a wrong hit cannot happen short of a hash collision.
Under several processes nothing is cached (the ranks would have to agree on a hit).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leantune.analysis.general import GeneralMeasure
from leantune.core.defaults import cache_root
from leantune.core.distributed import current
from leantune.core.files import atomic_write

VERSION = 1
TRAINING_ONLY = frozenset(
    {
        "name", "runs_dir", "track", "dist_timeout", "epochs", "min_steps", "lr",
        "weight_decay", "warmup_ratio", "schedule", "triangular", "layer_decay",
        "unfreeze_every", "loraplus_ratio", "l2", "l1", "ewc", "grad_accum", "max_grad_norm",
        "max_steps", "cache_prefix", "eval_every", "patience", "keep", "keep_every",
        "keep_examples", "reference_text", "reference_examples", "adapt",
    }
)  # fmt: skip
"""Options that cannot change what the model answers before its first step."""


def weights_digest(model: nn.Module) -> str | None:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes); None when one is
    not a plain tensor (its bytes are not its values)."""
    h = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=False).items():
        if type(t) is not torch.Tensor and type(t) is not nn.Parameter:
            return None
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def baseline_key(config: Any, model: nn.Module, test: Any) -> str | None:
    """The cache key of a run's before-measurements, or None when they must not be cached.
    ``test`` is anything JSON-serialisable that pins the test split (its ids, conversations)."""
    weights = weights_digest(model)
    if weights is None:
        return None
    options = {k: v for k, v in asdict(config).items() if k not in TRAINING_ONLY}
    text = json.dumps([VERSION, weights, options, test], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _file(key: str) -> Path:
    return cache_root() / "baseline" / f"{key}.json"


def read_baseline(key: str | None) -> dict[str, Any] | None:
    """The kept measurements for ``key`` (None: none kept, unreadable, or no key)."""
    if key is None:
        return None
    try:
        saved = json.loads(_file(key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and saved.get("version") == VERSION else None


def write_baseline(key: str | None, value: dict[str, Any]) -> None:
    """Keep ``value`` for ``key``; a cache that cannot be written only costs the time."""
    if key is None:
        return
    file = _file(key)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(file, json.dumps({"version": VERSION} | value))
    except OSError:
        pass


def cached(key: str | None, measure: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """``measure()``'s result for ``key``, read back when kept (True) or measured and kept."""
    saved = read_baseline(key)
    if saved is not None:
        return saved, True
    value = measure()
    write_baseline(key, value)
    return value, False


def measure_before(
    config: Any, prep: Any, general: GeneralMeasure | None
) -> tuple[dict[str, float], list[dict[str, str]], bool]:
    """The test split's metrics and answers and the general prompts' answers (into
    ``general.before``) of the model as it stands: read back for a causal run in one process
    whose same start was measured before, else measured (and kept). The flag says it was read."""

    def measure() -> dict[str, Any]:
        before = prep.evaluate_test()
        if general is not None:
            general.answer_before(prep.model, prep.tok)
        answers = general.before if general is not None else None
        return {"metrics": before.metrics, "samples": before.samples, "general": answers}

    key = None
    if config.causal and not current().parallel:
        chats = prep.splits.chats
        pin = [prep.test.ids, prep.test.targets, asdict(chats)["test"] if chats else None]
        key = baseline_key(config, prep.model, pin)
    value, hit = cached(key, measure)
    if hit and general is not None:
        if not isinstance(value.get("general"), list) or len(value["general"]) != len(
            general.items
        ):
            value, hit = measure(), False  # kept without the general side: answer it now
        else:
            general.before = value["general"]
    return value["metrics"], value["samples"], hit
