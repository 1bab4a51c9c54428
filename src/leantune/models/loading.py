"""Models for the tune job: the embedded MiniLM or any local transformers folder, with a
sequence-classification head or as a causal language model. Nothing is fetched."""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from leantune.core.errors import LeantuneError
from leantune.core.files import check_tensors

TASKS = ("classify", "causal-lm", "instruct", "preference")
CAUSAL_TASKS = ("causal-lm", "instruct", "preference")
CHAT_TASKS = ("instruct", "preference")
"""Tasks on conversations rendered with the chat template (``models/chat.py``)."""


def model_inputs(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``inputs`` that ``model``'s forward names: a tokenizer may return more
    than the model takes (``token_type_ids`` from a BERT-style tokenizer beside a causal LM,
    which transformers' generate refuses). A forward that names none (``**kwargs`` only, a
    wrapper) gets them all."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return dict(inputs)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = {p.name for p in params if p.kind in kinds}
    if not named:
        return dict(inputs)
    return {k: v for k, v in inputs.items() if k in named}


def model_dir(path: str | Path | None, task: str = "classify") -> Path:
    """The folder of the model: ``path``, or when None the embedded default of ``task``:
    MiniLM-L6, or SmolLM2-135M-Instruct for instruct (built into the cache once). The names
    ``minilm`` and ``smollm2`` (when no such folder exists) are the embedded models."""
    name = None if path is None or Path(path).exists() else str(path)
    if (path is None and task in CHAT_TASKS) or name == "smollm2":
        from leantune.core.smollm2 import smollm2_dir

        return smollm2_dir()
    if path is None or name == "minilm":
        from leantune.core.defaults import minilm_dir

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
    check_weights(folder)
    return folder


def _quiet() -> None:
    """Progress bars off. Warnings stay on: a few known to be noise are filtered in load_model."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# First parts of weight names that belong to a task head, not to the base model.
_CLASSIFY_HEADS = {"classifier", "score", "pre_classifier", "qa_outputs"}
_OTHER_HEADS = _CLASSIFY_HEADS | {
    "lm_head",
    "cls",
    "predictions",
    "vocab_transform",
    "vocab_projector",
    "vocab_layer_norm",
    "generator_lm_head",
    "generator_predictions",
    "discriminator_predictions",
}
HEAD_NAMES: frozenset[str] = frozenset(_OTHER_HEADS)
"""Module names that are a task head (quantization leaves them in full precision)."""
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _report_keys(message: str) -> list[tuple[str, str]] | None:
    """(key, status) pairs of a transformers weight-loading report; None if not one."""
    text = _ANSI.sub("", message)
    if "LOAD REPORT" in text:  # transformers 5: a table of key | status
        rows = re.findall(r"^(\S+)\s*\|\s*([A-Z]+)\b", text, re.MULTILINE)
        return [(k, s) for k, s in rows if k != "Key"] or None
    for pattern, status in (  # transformers 4: sentences with a list of keys
        (r"were not used when initializing \S+: \[([^\]]*)\]", "UNEXPECTED"),
        (r"newly initialized: \[([^\]]*)\]", "MISSING"),
    ):
        found = re.search(pattern, text)
        if found:
            return [(k, status) for k in re.findall(r"'([^']+)'", found.group(1))] or None
    if "newly initialized because the shapes did not match" in text:
        return [(k, "MISMATCH") for k in re.findall(r"^- (\S+?):", text, re.MULTILINE)] or None
    return None


class _KnownNoise(logging.Filter):
    """Drops transformers messages that only describe what leantune does on purpose: a new
    classification head, and the checkpoint's own head left out. Anything else is shown."""

    def __init__(self, task: str) -> None:
        super().__init__()
        self.task = task

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "which is incompatible to the `id2label` map" in message:
            return False  # leantune passes num_labels and id2label together
        keys = _report_keys(message)
        if keys is None:
            return True
        for key, status in keys:
            first = key.split(".")[0]
            if status == "UNEXPECTED" and (first in _OTHER_HEADS or ".pooler." in key):
                continue  # the checkpoint's own head or pooler, unused here
            new_head = status in ("MISSING", "MISMATCH") and first in _CLASSIFY_HEADS
            if self.task == "classify" and new_head:
                continue  # the new head for these labels
            return True
        return False


@contextmanager
def _filter_known_noise(task: str) -> Iterator[None]:
    noise = _KnownNoise(task)
    names = {n for n in logging.Logger.manager.loggerDict if n.split(".")[0] == "transformers"}
    # Where the noise comes from; these modules may be imported only during the load.
    names |= {"transformers.modeling_utils", "transformers.configuration_utils"}
    loggers = [logging.getLogger(n) for n in names]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)


_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_weights(folder: Path) -> None:
    """Only safetensors weights are loaded, each checked by its structure first
    (:func:`leantune.core.files.check_tensors`): leantune never unpickles a file."""
    weights = sorted(folder.glob("*.safetensors"))
    for file in weights:
        check_tensors(file)
    if weights:
        return
    pickled = sorted(
        p.name
        for p in folder.iterdir()
        if p.suffix in _PICKLES and p.name not in ("training_args.bin", "optimizer.pt")
    )
    if pickled:
        raise LeantuneError(
            f"{folder} holds pickled weights ({', '.join(pickled[:3])}); leantune never "
            "unpickles: convert it to model.safetensors where you trust the file "
            "(save_pretrained writes safetensors)"
        )
    raise LeantuneError(
        f"{folder} has no model.safetensors; give a folder with safetensors weights "
        "(save_pretrained writes them)"
    )


# Model types transformers can load as causal LMs that are encoders: their attention sees the
# whole text unless the config says is_decoder, so the next token is in plain view.
def _encoder_types() -> set[str]:
    from transformers.models.auto import modeling_auto as auto

    both = set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) & set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    seq2seq = set(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)  # their decoder halves
    return (both - seq2seq) | {"bert-generation", "xlnet", "reformer"}


def check_decoder(folder: Path, config: Any, task: str = "causal-lm") -> None:
    """Refuse a model whose attention is not causal for a causal task (causal-lm, instruct)."""
    from transformers.models.auto import modeling_auto as auto

    kind = getattr(config, "model_type", "?")
    if getattr(config, "is_decoder", False) or (kind == "xlm" and getattr(config, "causal", 0)):
        return
    if kind in _encoder_types():
        raise LeantuneError(
            f"{folder} holds a {kind} model, which is not a decoder: its attention is "
            "bidirectional, so as a causal LM it would see the tokens it predicts and its "
            f"perplexity would mean nothing; use a decoder (llama, gpt2, ...) for --task "
            f"{task}, or --task classify"
        )
    if kind not in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise LeantuneError(
            f"{folder} holds a {kind} model, which is not a decoder transformers can load as a "
            f"causal LM; use a decoder (llama, gpt2, ...) for --task {task}, or --task classify"
        )


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
    folder: Path,
    task: str,
    label_names: Sequence[str] = (),
    pad_token_id: int | None = None,
    pooling: str = "pooler",
) -> nn.Module:
    """A classification model with ``len(label_names)`` outputs, its head on the pooling
    ``pooling`` names (:func:`leantune.models.pooling.use_pooling`), or a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if task not in TASKS:
        raise LeantuneError(f"task {task!r} is unknown; use one of {TASKS}")
    _quiet()
    check_weights(folder)
    try:
        if task in CAUSAL_TASKS:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            check_decoder(folder, config, task)
        with _filter_known_noise(task):
            if task == "classify":
                model = AutoModelForSequenceClassification.from_pretrained(
                    folder,
                    num_labels=len(label_names),
                    id2label=dict(enumerate(label_names)),
                    label2id={n: i for i, n in enumerate(label_names)},
                    ignore_mismatched_sizes=True,
                    local_files_only=True,
                    use_safetensors=True,
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    folder, config=config, local_files_only=True, use_safetensors=True
                )
    except LeantuneError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LeantuneError(f"could not load a {task} model from {folder}: {first}") from None
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        # Sequence classification with decoder models finds the last token through it.
        model.config.pad_token_id = pad_token_id
    if task == "classify":
        from leantune.models.pooling import use_pooling

        use_pooling(model, folder, pooling)
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
