"""``export --to hf``: the merged model as a plain transformers folder.

Weights in ``--dtype`` (bf16, fp16, fp32), ``config.json``, the tokenizer with the chat template
the run trained with (``--template`` included), and ``generation_config.json`` whose
``eos_token_id`` lists the template's end-of-turn token before the tokenizer's eos token, so
``generate`` (and servers that read the file: vLLM, TGI) stop at the end of the answer rather
than at an eos the template never emits. ``leantune merge`` is this target at fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from leantune.export.common import DTYPES, Request, merged_model, stop_ids, write_folder
from leantune.models.pooling import copy_pooling_files, native_pooling


def set_generation_config(model: nn.Module, tok: Any) -> None:
    """Stop ids (end-of-turn first), bos and pad on the model's generation config."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    stops = stop_ids(tok)
    if stops:
        gen.eos_token_id = stops if len(stops) > 1 else stops[0]
    if tok.bos_token_id is not None:
        gen.bos_token_id = tok.bos_token_id
    if tok.pad_token_id is not None:
        gen.pad_token_id = tok.pad_token_id


def export_hf(request: Request) -> Path:
    """Write the merged model, tokenizer and generation config to ``request.out``."""
    model, tok = merged_model(request, DTYPES[request.dtype])
    causal = request.config.causal
    if causal:
        set_generation_config(model, tok)
    base, pooling = request.base, request.config.pooling

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)  # type: ignore[operator]
        tok.save_pretrained(folder)
        if native_pooling(base) is not None and pooling == "auto":
            copy_pooling_files(base, folder)  # leantune and sentence-transformers pool alike

    return write_folder(request, fill)
