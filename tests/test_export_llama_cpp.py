"""The exported GGUF checked against llama.cpp itself (llama-cpp-python), not against leantune:
token ids, the rendered chat prompt, next-token logits, greedy answers and the stop at the
template's end-of-turn token, on a tiny Llama run trained here.

llama-cpp-python compiles llama.cpp from source, so it is an optional extra (``make
gguf-check`` builds it once, keeps the wheel, and runs these tests); without it they are
skipped with the reason.

Tolerances (next-token logits, max |llama.cpp - leantune| over the vocabulary, leantune in
float32): f16 stores each weight with a relative rounding of at most 2^-11 and llama.cpp
computes in f32 (activations rounded to f16 only inside some matrix products), so the logits
agree to ``F16_TOL`` of their spread (max - min; measured about 2e-4) and greedy answers are
identical; q8_0 rounds each weight to one of 255 steps of its block of 32's largest value (up to
1/254 of it, ~0.4 %), so the logits move by up to ``Q8_TOL`` of their spread (measured 0.5-0.7
%), enough to swap two near-tied tokens (it does on one of the four prompts here, at the 12th
token): greedy answers are compared only for f16. The q/k permutation is checked on a Llama with
sharp attention, where position matters: without it the logits there are off by a quarter of
their spread (and on the trained tiny run by 2x ``F16_TOL``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from test_export import cli, tiny_run

llama_cpp = pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not installed; `make gguf-check` builds it (llama.cpp from "
    "source, once) and runs these tests",
)

F16_TOL = 5e-4
Q8_TOL = 0.02
K4_TOL = 0.1  # 4 bits: 16 steps per block, ~16x q8_0's rounding (measured 0.026)
PROMPTS = ["w3 Which topic?", "w10 Which topic?", "Hello! How can I help?", "Paris 2024, 12 cats"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("llama-cpp"))


@pytest.fixture(scope="module")
def saved(run: Path) -> Any:
    from leantune.adapters.inject import unload
    from leantune.tune import load_run

    found = load_run(run)
    found.model = unload(found.model, merge_active=True).float().eval()
    return found


def export(run: Path, root: Path, quant: str) -> Path:
    out = root / quant
    res = cli("export", run, "--to", "gguf", "--quant", quant, "--out", out)
    assert res.returncode == 0, res.stderr
    return out / f"chat-{quant}.gguf"


def load(path: Path) -> Any:
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0
    )


def rendered(tok: Any, prompt: str) -> str:
    return str(
        tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    )


def llama_ids(llm: Any, text: str) -> list[int]:
    return list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))


def next_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[len(ids) - 1], dtype=np.float64)


def spread_error(saved: Any, llm: Any, ids: list[int]) -> float:
    with torch.no_grad():
        want = saved.model(torch.tensor([ids])).logits[0, -1].double().numpy()
    got = next_logits(llm, ids)
    return float(np.abs(got - want).max() / (want.max() - want.min()))


def greedy_llama(llm: Any, ids: list[int], n: int) -> list[int]:
    """Greedy tokens until llama.cpp's end-of-generation test (included) or ``n``."""
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    out: list[int] = []
    llm.reset()
    for token in llm.generate(ids, temp=0.0, top_k=1):
        out.append(int(token))
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(out) == n:
            break
    return out


def greedy_hf(saved: Any, ids: list[int], n: int, stops: list[int]) -> list[int]:
    with torch.no_grad():
        gen = saved.model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=n,
            eos_token_id=stops,
            pad_token_id=saved.tok.pad_token_id,
        )
    return [int(t) for t in gen[0, len(ids) :]]


@pytest.fixture(scope="module")
def f16(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load(export(run, tmp_path_factory.mktemp("gguf"), "f16"))


def test_token_ids_equal_the_training_tokenizer(saved: Any, f16: Any) -> None:
    for prompt in PROMPTS:
        text = rendered(saved.tok, prompt)
        assert llama_ids(f16, text) == saved.tok(text)["input_ids"], text


def test_rendered_prompt_is_byte_identical(saved: Any, f16: Any) -> None:
    """llama-cpp-python's chat path (its Jinja formatter fed the GGUF's template, what
    ``create_chat_completion`` uses) renders what training did. llama.cpp's C API
    ``llama_chat_apply_template`` does not run the template: it recognises it as ChatML and
    writes ChatML itself, which matches once a system message is given, but leaves out a
    template's default system prompt (``You are a tiny model.`` here) without one."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = f16.metadata["tokenizer.chat_template"]
    assert template == saved.tok.chat_template
    formatter = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="")
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        want = rendered(saved.tok, prompt)
        assert formatter(messages=messages).prompt == want
        with_system = [{"role": "system", "content": "Be brief."}, *messages]
        text = saved.tok.apply_chat_template(
            with_system, tokenize=False, add_generation_prompt=True
        )
        assert cpp_template(f16, with_system) == text


def cpp_template(llm: Any, messages: list[dict[str, str]]) -> str:
    """llama.cpp's ``llama_chat_apply_template`` with the model's template."""
    template = llama_cpp.llama_model_chat_template(llm._model.model, None)
    chat = (llama_cpp.llama_chat_message * len(messages))()
    keep = []
    for i, m in enumerate(messages):
        keep += [m["role"].encode(), m["content"].encode()]
        chat[i].role, chat[i].content = keep[-2], keep[-1]
    buf = (llama_cpp.ctypes.c_char * 4096)()
    n = llama_cpp.llama_chat_apply_template(template, chat, len(messages), True, buf, 4096)
    assert 0 < n < 4096
    return bytes(buf[:n]).decode("utf-8")


def test_f16_logits_and_greedy_answers_agree(saved: Any, f16: Any) -> None:
    stops = [saved.tok.convert_tokens_to_ids("<|im_end|>")]
    for prompt in PROMPTS:
        ids = saved.tok(rendered(saved.tok, prompt))["input_ids"]
        assert spread_error(saved, f16, ids) < F16_TOL, prompt
        assert greedy_llama(f16, ids, 12) == greedy_hf(saved, ids, 12, stops), prompt


def test_q8_0_logits_within_tolerance(run: Path, saved: Any, tmp_path: Path) -> None:
    q8 = load(export(run, tmp_path, "q8_0"))
    errors = [
        spread_error(saved, q8, saved.tok(rendered(saved.tok, p))["input_ids"]) for p in PROMPTS
    ]
    assert max(errors) < Q8_TOL, errors


def test_generation_stops_at_the_end_of_turn_token(saved: Any, f16: Any) -> None:
    end = saved.tok.convert_tokens_to_ids("<|im_end|>")
    assert f16._model.token_eot() == end or f16.token_eos() == end
    ids = saved.tok(rendered(saved.tok, PROMPTS[0]))["input_ids"]
    # Pushed to say <|im_end|> first, llama.cpp must end the answer there (not print it).
    out = f16.create_completion(ids, max_tokens=8, temperature=0.0, logit_bias={end: 100.0})
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["text"] == ""


def test_llama_q_k_permutation_on_sharp_attention(saved: Any, tmp_path: Path) -> None:
    """A Llama whose attention depends strongly on position (q and k scaled up): llama.cpp's
    logits at every position match only with q/k permuted as its converter does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from leantune.export.gguf_file import write_gguf

    tok = saved.tok
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    write_gguf(tmp_path / "sharp.gguf", model, tok, "sharp", "f16", None)
    llm = load(tmp_path / "sharp.gguf")
    ids = tok(rendered(tok, "Hello! How can I help? Which topic: business, sport or tech?"))
    ids = ids["input_ids"]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].double().numpy()
    llm.reset()
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float64)
    spread = (want.max(1) - want.min(1))[:, None]
    assert float((np.abs(got - want) / spread).max()) < F16_TOL


def test_k_quant_through_llama_cpps_quantizer(run: Path, saved: Any, tmp_path: Path) -> None:
    """q4_k_m is made by llama.cpp's own quantizer from the f16 file (the tiny model's rows, 32
    long, are below the k-quants' 256 block, so llama.cpp falls back per tensor): the file
    says Q4_K_M, loads, and the f16 file is not left behind."""
    path = export(run, tmp_path, "q4_k_m")
    assert [p.name for p in path.parent.iterdir() if p.suffix != ".json"] == [path.name]
    llm = load(path)
    assert llm.metadata["general.file_type"] == str(llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)
    ids = saved.tok(rendered(saved.tok, PROMPTS[0]))["input_ids"]
    assert spread_error(saved, llm, ids) < K4_TOL
