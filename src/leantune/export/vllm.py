"""``export --to vllm``: the run's LoRA adapter, checked against vLLM's LoRA loader, and the
``vllm serve`` line that serves it on the base model.

The rules are vLLM 0.11's (``vllm/lora/peft_helper.py``, ``vllm/config/lora.py``,
``vllm/lora/models.py``):

- ``PEFTHelper`` refuses ``modules_to_save`` (a trained head or embedding) and ``use_dora``;
  ``bias`` other than ``none`` needs a bias option vLLM no longer has;
- ``PEFTHelper`` keeps only ``r``, ``lora_alpha`` and ``use_rslora`` for the scale, one scale for
  every module: ``rank_pattern`` / ``alpha_pattern`` are dropped, so a module whose
  alpha/r (alpha/√r with rsLoRA) differs from the file's would be served with the wrong
  scale; an adapter with differing ranks but one scale loads;
- ``--max-lora-rank`` takes one of 1, 8, 16, 32, 64, 128, 256, 320, 512 and must be at least the
  largest rank;
- only the modules the model's vLLM class lists take LoRA: for Llama, Mistral and Qwen2 the
  attention and MLP projections (q, k, v, o, gate, up, down);
- the adapter's tensors are cast to the LoRA dtype (``--lora-dtype auto``: the base model's);
  leantune writes them in ``--dtype`` (bf16 by default).

Only peft's ``LORA`` type is an adapter vLLM serves: IA3, VeRA, prompt and prefix tuning,
bottleneck adapters, BitFit / LayerNorm / sparse and mixed plans (leantune's ``LEANTUNE`` type)
and runs that trained the model's own weights (``trained/``) are refused with ``--to hf``
(the merged model, which vLLM serves as a model) as the way out.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

from leantune.core.errors import LeantuneError
from leantune.core.files import read_tensors
from leantune.export.common import DTYPES, Request, write_folder

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
WAY_OUT = "export --to hf (the merged model) and serve that instead"


def _refuse(what: str) -> LeantuneError:
    return LeantuneError(f"vLLM cannot serve this run as a LoRA adapter: {what}; use {WAY_OUT}")


def check_adapter(config: dict[str, Any]) -> int:
    """Refuse (one line, module doc) what vLLM's LoRA loader refuses or would misread; the
    largest rank otherwise."""
    kind = config.get("peft_type")
    if kind == "LEANTUNE":
        methods = sorted({str(m.get("method")) for m in (config.get("modules") or {}).values()})
        raise _refuse(f"it is a {'/'.join(methods)} adapter in leantune's own format")
    if kind != "LORA":
        raise _refuse(f"it is a {kind} adapter; vLLM serves LoRA only")
    if config.get("modules_to_save"):
        raise _refuse(
            f"it trained {', '.join(config['modules_to_save'])} in full (modules_to_save)"
        )
    if config.get("use_dora"):
        raise _refuse("it is DoRA (use_dora)")
    if config.get("bias", "none") != "none":
        raise _refuse(f"it trains biases (bias={config['bias']})")
    targets = config.get("target_modules") or []
    names = [targets] if isinstance(targets, str) else list(targets)
    unsupported = sorted({n for n in names if n.rsplit(".", 1)[-1] not in LORA_MODULES})
    if unsupported:
        shown = ", ".join(unsupported[:3]) + (" ..." if len(unsupported) > 3 else "")
        raise _refuse(
            f"it adapts {shown}; vLLM takes LoRA on {', '.join(LORA_MODULES)} of Llama, "
            "Mistral and Qwen2"
        )
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    ranks = {k: int(v) for k, v in (config.get("rank_pattern") or {}).items()}
    alphas = {k: float(v) for k, v in (config.get("alpha_pattern") or {}).items()}

    def scale(rank: int, a: float) -> float:
        return a / math.sqrt(rank) if config.get("use_rslora") else a / rank

    for module in set(ranks) | set(alphas):
        if not math.isclose(
            scale(ranks.get(module, r), alphas.get(module, alpha)), scale(r, alpha)
        ):
            raise _refuse(
                f"{module} has its own rank/alpha (rank_pattern, alpha_pattern) and vLLM uses "
                "one scale, lora_alpha/r, for every module"
            )
    return max([r, *ranks.values()])


def max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` value vLLM accepts that holds ``rank``."""
    fits = [n for n in MAX_LORA_RANKS if n >= rank]
    if not fits:
        raise _refuse(f"its rank {rank} is above vLLM's largest --max-lora-rank, 512")
    return fits[0]


def adapter_config(request: Request) -> dict[str, Any]:
    """The run's adapter config; refuses a run without an adapter."""
    path = request.run / "adapter" / "adapter_config.json"
    if not path.is_file():
        raise _refuse(f"the run trained the model's own weights ({request.config.method})")
    config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise LeantuneError(f"{path} is not a JSON object")
    return config


def check_vllm_run(request: Request) -> tuple[dict[str, Any], int]:
    if not request.config.causal:
        raise LeantuneError(
            f"{request.run} is a {request.config.task} run; vLLM serves causal LMs: use --to hf"
        )
    config = adapter_config(request)
    rank = check_adapter(config)
    return config, max_lora_rank(rank)


def export_vllm(request: Request) -> tuple[Path, str]:
    """The adapter (tensors in ``--dtype``) in ``request.out``, and the ``vllm serve`` line."""
    from safetensors.torch import save_file

    config, max_rank = check_vllm_run(request)
    source = request.run / "adapter" / "adapter_model.safetensors"
    tensors = {k: v.to(DTYPES[request.dtype]) for k, v in read_tensors(source).items()}
    config = config | {"base_model_name_or_path": str(request.base)}

    def fill(folder: Path) -> None:
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})

    folder = write_folder(request, fill)
    name = request.run.name
    line = (
        f"vllm serve {shlex.quote(str(request.base))} --enable-lora --lora-modules "
        f"{shlex.quote(f'{name}={folder.resolve()}')} --max-lora-rank {max_rank}"
    )
    return folder, line
