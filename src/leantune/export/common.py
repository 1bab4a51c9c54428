"""What every export target shares: the checked request, the merged model, the chat template's
end-of-turn token and the stop ids.

Everything is checked before anything is written (the target, the dtype or quant, the run, the
base model's tokenizer, the ``--out`` folder); the folder is then built beside ``--out`` and
renamed into place (``tune.outputs.write_merged_folder``), so a failure leaves nothing behind.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leantune.core.errors import LeantuneError
from leantune.models.loading import model_dir
from leantune.tune.config import TuneConfig, make_config, read_config
from leantune.tune.outputs import check_merge_out, write_merged_folder

TARGETS = ("hf", "gguf", "ollama", "vllm")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTS = ("f16", "bf16", "q8_0")
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
"""llama.cpp's own quantizer makes these from the f16 file (needs llama-cpp-python)."""
SENTINEL = "LEANTUNE-SENTINEL-7f3a"


@dataclass(frozen=True)
class Request:
    """A checked export: what, where, and the run's config and base model folder."""

    run: Path
    to: str
    out: Path
    config: TuneConfig
    base: Path
    dtype: str = "fp32"
    quant: str = "f16"
    overwrite: bool = False


def check_request(
    run: Path,
    to: str,
    out: Path,
    *,
    dtype: str | None = None,
    quant: str | None = None,
    overwrite: bool = False,
) -> Request:
    """Refuse, before anything is read at length or written: an unknown target, dtype or quant
    (or one the target does not take), a run that is not a finished run folder, a base model
    without a tokenizer, and an ``--out`` folder merge-style checks refuse."""
    run, out = Path(run), Path(out)
    if to not in TARGETS:
        raise LeantuneError(f"--to {to!r} is unknown; use one of {', '.join(TARGETS)}")
    if dtype is not None and dtype not in DTYPES:
        raise LeantuneError(f"--dtype {dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    if quant is not None and quant not in QUANTS + K_QUANTS:
        raise LeantuneError(
            f"--quant {quant!r} is unknown; use one of {', '.join(QUANTS + K_QUANTS)}"
        )
    if quant in K_QUANTS and importlib.util.find_spec("llama_cpp") is None:
        raise LeantuneError(
            f"--quant {quant} is made by llama.cpp's own quantizer, which needs "
            "llama-cpp-python: pip install 'leantune[gguf-check]' (or make gguf-check)"
        )
    if quant is not None and to not in ("gguf", "ollama"):
        raise LeantuneError(f"--quant is for --to gguf or ollama; --to {to} takes --dtype")
    if dtype is not None and to in ("gguf", "ollama"):
        raise LeantuneError(f"--dtype is for --to hf or vllm; --to {to} takes --quant")
    if not (run / "config.yaml").is_file():
        raise LeantuneError(f"{run} is not a leantune run folder (no config.yaml)")
    if not (run / "summary.json").is_file():
        raise LeantuneError(f"{run} has not finished; finish it with leantune tune --resume")
    config = make_config(read_config(run / "config.yaml"))
    base = model_dir(config.model, config.task)
    if not any((base / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise LeantuneError(
            f"the run's base model {base} has no tokenizer (no tokenizer.json); a served model "
            "needs one: save the tokenizer into that folder (tokenizer.save_pretrained)"
        )
    check_merge_out(out, overwrite, run, base)
    default_dtype = "bf16" if to == "vllm" else "fp32"
    return Request(run, to, out, config, base, dtype or default_dtype, quant or "f16", overwrite)


def merged_model(request: Request, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """The run's model with its adapter (or trained tensors) merged in, on the CPU, and the
    tokenizer with the chat template the run trained with."""
    from leantune.adapters.inject import unload
    from leantune.tune.finished import load_run

    saved = load_run(request.run)
    model = unload(saved.model, merge_active=True).cpu().eval()
    if dtype is not None:
        model = model.to(dtype)
    return model, saved.tok


def write_folder(request: Request, fill: Callable[[Path], None]) -> Path:
    """Build the export beside ``--out`` with ``fill`` and switch it into place."""
    return write_merged_folder(request.out, fill, run=str(request.run.resolve()), export=request.to)


def end_of_turn(tok: Any) -> int | None:
    """The token the chat template closes an assistant turn with (ChatML's ``<|im_end|>``):
    the first token after the answer's text when a conversation is rendered, when that token is
    a special or added token; None without a chat template or such a token."""
    if not getattr(tok, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SENTINEL}]
    text = str(tok.apply_chat_template(messages, tokenize=False))
    after = text[text.rfind(SENTINEL) + len(SENTINEL) :]
    ids = tok(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    added = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
    return int(ids[0]) if ids and ids[0] in added else None


def stop_ids(tok: Any) -> list[int]:
    """The ids generation stops at: the template's end-of-turn token, then the eos token."""
    found = [end_of_turn(tok), tok.eos_token_id]
    return list(dict.fromkeys(int(i) for i in found if i is not None))
