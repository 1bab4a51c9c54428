"""Models for the tune job: the embedded MiniLM or any local transformers folder, with a
sequence-classification head or as a causal language model. Nothing is fetched."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from leantune.errors import LeantuneError

TASKS = ("classify", "causal-lm")


def model_dir(path: str | Path | None) -> Path:
    """The folder of the model: ``path``, or the embedded MiniLM when None."""
    if path is None:
        from leantune.defaults import minilm_dir

        return minilm_dir()
    folder = Path(path)
    if not folder.exists():
        raise LeantuneError(f"model folder {folder} does not exist")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise LeantuneError(
            f"{folder} is not a transformers model folder (no config.json); pass a folder "
            "written by save_pretrained"
        )
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise LeantuneError(f"{folder}/config.json is not valid JSON: {e}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise LeantuneError(
            f"{folder}/config.json has no model_type; it is not a transformers model config"
        )
    return folder


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    _quiet()
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... here
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LeantuneError(f"no usable tokenizer in {folder}: {first}") from None
    if tok.pad_token_id is None:
        # Decoder-only models often ship without a pad token; padding is masked out anyway.
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            raise LeantuneError(f"the tokenizer in {folder} has neither a pad nor an eos token")
    return tok


def load_model(
    folder: Path, task: str, label_names: Sequence[str] = (), pad_token_id: int | None = None
) -> nn.Module:
    """A classification model with ``len(label_names)`` outputs, or a causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task not in TASKS:
        raise LeantuneError(f"task {task!r} is unknown; use one of {TASKS}")
    _quiet()
    try:
        if task == "classify":
            model = AutoModelForSequenceClassification.from_pretrained(
                folder,
                num_labels=len(label_names),
                id2label=dict(enumerate(label_names)),
                label2id={n: i for i, n in enumerate(label_names)},
                ignore_mismatched_sizes=True,
                local_files_only=True,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LeantuneError(f"could not load a {task} model from {folder}: {first}") from None
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        # Sequence classification with decoder models finds the last token through it.
        model.config.pad_token_id = pad_token_id
    return model


def max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
