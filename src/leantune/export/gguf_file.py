"""``export --to gguf``: the merged model as one GGUF file llama.cpp loads.

Written with the ``gguf`` package (llama.cpp's own Python writer): ``GGUFWriter`` for the file,
``TensorNameMap`` for the tensor names (``model.layers.0.self_attn.q_proj.weight`` ->
``blk.0.attn_q.weight``), ``gguf.quants`` for bf16 and q8_0. Families: the Llama family
(``llama``, ``mistral``: SmolLM2 is one) and Qwen2; other architectures are refused by name.

Two things llama.cpp's converter does that a plain dump would miss. **q/k permutation:** the
Llama architecture in llama.cpp rotates adjacent pairs of a head's dimensions, transformers
rotates the two halves (``rotate_half``), so the rows of ``q_proj`` and ``k_proj`` are reordered
per head from [halves] to [pairs] (Qwen2 is marked NEOX-style in llama.cpp: no reordering).
**Quant types:** ``f16`` and ``bf16`` store every matrix in that type; ``q8_0`` stores blocks
of 32 values as int8 with one f16 scale per block (8.5 bits a value; a matrix whose rows are
not a multiple of 32 long stays f16); vectors (norms, biases) stay f32, as llama.cpp's converter
keeps them. k-quants (``q4_k_m``, ``q5_k_m``, ``q6_k``) are llama.cpp's own quantizer's job:
the f16 file is written first, then ``llama_model_quantize`` (llama-cpp-python) converts it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leantune.core.errors import LeantuneError
from leantune.export.common import K_QUANTS, Request, end_of_turn, merged_model, write_folder
from leantune.export.gguf_vocab import write_vocabulary

FAMILIES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}
"""transformers model_type -> (gguf MODEL_ARCH member, whether q/k rows are permuted)."""


def check_family(config: Any) -> tuple[Any, bool]:
    """The gguf architecture and the permutation flag; refuses other families and rope scaling
    llama.cpp would need extra tensors for."""
    import gguf

    kind = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False) or kind not in FAMILIES:
        raise LeantuneError(
            f"GGUF export supports the {', '.join(FAMILIES)} families of causal LMs; this run's "
            f"model is {kind or 'unknown'}: use --to hf"
        )
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", None):
        raise LeantuneError(
            f"GGUF export does not write {rope['rope_type']} rope scaling; use --to hf and "
            "llama.cpp's convert_hf_to_gguf.py"
        )
    arch, permute = FAMILIES[kind]
    return getattr(gguf.MODEL_ARCH, arch), permute


def rope_parameters(config: Any) -> dict[str, Any]:
    """transformers 5 keeps rope_theta in ``rope_parameters``; 4.x on the config itself."""
    found = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    found.setdefault("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    found.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return found


def permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from [first half, second half] to interleaved pairs."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def encode(tensor: torch.Tensor, quant: str) -> tuple[np.ndarray, Any]:
    """The tensor's bytes in the quant type, and that type (vectors stay f32)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    data = tensor.detach().float().cpu().numpy()
    if data.ndim < 2:
        return data.astype(np.float32), Q.F32
    if quant == "q8_0" and data.shape[-1] % 32 == 0:
        return quantize(data, Q.Q8_0), Q.Q8_0
    if quant == "bf16":
        return quantize(data, Q.BF16), Q.BF16
    return data.astype(np.float16), Q.F16


def model_tensors(model: nn.Module, arch: Any, permuted: bool) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) pairs: the name map's names, q/k permuted for the Llama family,
    a tied output head written once (llama.cpp falls back to the embedding)."""
    import gguf

    config: Any = model.config
    blocks = int(config.num_hidden_layers)
    names = gguf.get_tensor_name_map(arch, blocks)
    heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = []
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise LeantuneError(f"GGUF export has no llama.cpp name for the tensor {name}")
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute(tensor, heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute(tensor, kv_heads)
        out.append((mapped, tensor))
    return out


def file_type(quant: str) -> int:
    from gguf import LlamaFileType

    return int(
        {
            "f16": LlamaFileType.MOSTLY_F16,
            "bf16": LlamaFileType.MOSTLY_BF16,
            "q8_0": LlamaFileType.MOSTLY_Q8_0,
        }[quant]
    )


def write_hparams(writer: Any, config: Any, name: str, quant: str) -> None:
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_name(name)
    writer.add_file_type(file_type(quant))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.num_key_value_heads))
    writer.add_rope_freq_base(float(rope_parameters(config)["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != int(config.hidden_size):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def gguf_name(request: Request) -> str:
    return f"{request.run.name}-{request.quant}.gguf"


def write_gguf(
    path: Path, model: nn.Module, tok: Any, name: str, quant: str, pre: str | None
) -> None:
    """One GGUF file at ``path``: hyperparameters, tokenizer, chat template, tensors."""
    import gguf

    config: Any = model.config
    arch, permuted = check_family(config)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    write_hparams(writer, config, name, quant)
    write_vocabulary(writer, tok, int(config.vocab_size), end_of_turn(tok), pre)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for mapped, tensor in model_tensors(model, arch, permuted):
        data, qtype = encode(tensor, quant)
        writer.add_tensor(mapped, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_model_file(
    path: Path, model: nn.Module, tok: Any, name: str, quant: str, pre: str | None
) -> None:
    """``write_gguf``, or for a k-quant the f16 file quantized by llama.cpp."""
    if quant not in K_QUANTS:
        write_gguf(path, model, tok, name, quant, pre)
        return
    import llama_cpp

    f16 = path.with_name(f".{path.name}.f16")
    write_gguf(f16, model, tok, name, "f16", pre)
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(path).encode(), params) != 0:
            raise LeantuneError(f"llama.cpp's quantizer failed to make {quant} from {f16.name}")
    finally:
        f16.unlink(missing_ok=True)


def source_pre(base: Path) -> str | None:
    """The pre-tokenizer name of the GGUF the base folder was built from (the embedded
    SmolLM2: ``smollm``); None for an ordinary transformers folder."""
    from leantune.core.smollm2 import MARKER, smollm2_gguf

    if not (base / MARKER).is_file():
        return None
    from gguf import GGUFReader

    field = GGUFReader(smollm2_gguf()).fields.get("tokenizer.ggml.pre")
    return str(field.contents()) if field is not None else None


def check_gguf_run(request: Request) -> None:
    """Refuse before loading weights: a run that is not a causal LM, a family llama.cpp's
    names are not mapped for here."""
    import importlib.util

    from transformers import AutoConfig

    if importlib.util.find_spec("gguf") is None:
        raise LeantuneError("GGUF export needs the package gguf; pip install 'leantune[gguf]'")
    if not request.config.causal:
        raise LeantuneError(
            f"{request.run} is a {request.config.task} run (an encoder with a classification "
            "head); GGUF export takes causal LM runs: use --to hf"
        )
    check_family(AutoConfig.from_pretrained(request.base, local_files_only=True))


def export_gguf(request: Request) -> Path:
    """The GGUF file, alone in ``request.out``."""
    check_gguf_run(request)
    model, tok = merged_model(request)
    pre = source_pre(request.base)

    def fill(folder: Path) -> None:
        write_model_file(
            folder / gguf_name(request), model, tok, request.run.name, request.quant, pre
        )

    return write_folder(request, fill)
