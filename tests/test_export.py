"""`leantune export` on a tiny chat Llama run (LoRA, trained here in seconds): each target's
files, the GGUF metadata read back with the gguf package's reader, the Ollama template against
the Jinja one, the vLLM checker's refusals, and bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import chat_model_folder, chat_tokenizer, tiny_model_folder, topic_rows, write_rows
from leantune.cli import app
from leantune.core.errors import LeantuneError
from leantune.tune import TuneConfig, load_run, run_tune

gguf = pytest.importorskip("gguf")


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    res = CliRunner().invoke(app, [str(a) for a in args])
    return subprocess.CompletedProcess(list(args), res.exit_code, res.stdout, res.stderr)


def refused(res: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert res.stderr.startswith("leantune: ") and res.stderr.count("\n") == 1, res.stderr
    for text in expected:
        assert text in res.stderr, res.stderr


ROWS = [{"prompt": f"w{i} Which topic?", "response": ["sport", "tech"][i % 2]} for i in range(24)]


def tiny_run(root: Path, **extra: object) -> Path:
    """A finished instruct run (LoRA, one epoch) on a tiny chat Llama with a ChatML template."""
    model = chat_model_folder(root / "chat", extra=[f"{r['prompt']} {r['response']}" for r in ROWS])
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    values: dict[str, object] = {
        "task": "instruct",
        "model": str(model),
        "data": str(data),
        "runs_dir": str(root / "runs"),
        "name": "chat",
        "epochs": 1,
        "batch_size": 8,
        "layers": "all",
        "reference_examples": 0,
        "gen_examples": 0,
        "general_examples": 0,
    }
    run_tune(TuneConfig(**(values | extra)))  # type: ignore[arg-type]
    return root / "runs" / "chat"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("export"))


def test_hf_export_dtype_stop_ids_and_template(run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = cli("export", run, "--to", "hf", "--out", tmp_path / "hf", "--dtype", "bf16")
    assert res.returncode == 0, res.stderr
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert not any("lora" in k for k in tensors)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert eos[0] == end
    saved = load_run(run)
    assert tok.chat_template == saved.tok.chat_template
    # The merged bf16 model's logits are the run's (adapter unmerged, fp32) to bf16 rounding.
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ids = torch.tensor([saved.tok("w3 Which topic?")["input_ids"]])
    with torch.no_grad():
        a, b = merged(ids).logits, saved.model(ids).logits
    assert torch.allclose(a, b, atol=0.05), (a - b).abs().max()


def test_merge_is_export_hf_at_fp32(run: Path, tmp_path: Path) -> None:

    assert cli("merge", run, "--out", tmp_path / "m").returncode == 0
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    marker = json.loads((tmp_path / "m" / ".leantune-merge.json").read_text())
    assert marker["export"] == "hf"


def read_fields(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_metadata_and_tensors(run: Path, tmp_path: Path, quant: str) -> None:
    res = cli("export", run, "--to", "gguf", "--quant", quant, "--out", tmp_path / "g")
    assert res.returncode == 0, res.stderr
    path = tmp_path / "g" / f"chat-{quant}.gguf"
    fields = read_fields(path)
    saved = load_run(run)
    tok = saved.tok
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    by_id = {i: t for t, i in tok.get_vocab().items()}
    assert fields["tokenizer.ggml.tokens"] == [by_id[i] for i in range(len(by_id))]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.eos_token_id"] == end == fields["tokenizer.ggml.eot_token_id"]
    assert fields["tokenizer.ggml.token_type"][end] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == tok.chat_template
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    # Tensors: q is permuted the way llama.cpp's converter does; undoing it gives the merged
    # weight (f16 exactly; q8_0 within its step).
    from leantune.adapters.inject import unload

    merged = unload(saved.model, merge_active=True).state_dict()
    reader = gguf.GGUFReader(path)
    t = {x.name: x for x in reader.tensors}
    q = t["blk.0.attn_q.weight"]
    assert q.tensor_type == (
        gguf.GGMLQuantizationType.Q8_0 if quant == "q8_0" else gguf.GGMLQuantizationType.F16
    )
    values = gguf.quants.dequantize(q.data, q.tensor_type).reshape(32, 32)
    back = torch.from_numpy(np.ascontiguousarray(values)).reshape(4, 4, 2, 32).swapaxes(1, 2)
    want = merged["model.layers.0.self_attn.q_proj.weight"]
    tol = 2e-3 if quant == "f16" else float(want.abs().max()) / 127
    assert torch.allclose(back.reshape(32, 32), want, atol=tol)
    assert "output.weight" not in t or not saved.model.config.tie_word_embeddings
    assert t["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_gguf_qwen2_family_without_permutation(tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from leantune.export.gguf_file import write_gguf

    tok = chat_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    write_gguf(tmp_path / "q.gguf", model, tok, "q", "f16", None)
    fields = read_fields(tmp_path / "q.gguf")
    assert fields["general.architecture"] == "qwen2" and fields["qwen2.block_count"] == 2
    t = {x.name: x for x in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    assert "blk.0.attn_q.bias" in t and "output.weight" not in t
    q = gguf.quants.dequantize(t["blk.0.attn_q.weight"].data, t["blk.0.attn_q.weight"].tensor_type)
    want = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert torch.allclose(
        torch.from_numpy(np.ascontiguousarray(q)).reshape(32, 32), want, atol=2e-3
    )


def test_gguf_refuses_other_families(tmp_path: Path) -> None:
    from transformers import GPT2Config

    from leantune.export.gguf_file import check_family

    with pytest.raises(LeantuneError, match="llama, mistral, qwen2") as e:
        check_family(GPT2Config())
    assert "\n" not in str(e.value)


def test_ollama_modelfile_matches_the_template(run: Path, tmp_path: Path) -> None:
    from leantune.export.ollama import render_like_go, template_pieces

    res = cli("export", run, "--to", "ollama", "--out", tmp_path / "o", "--quant", "q8_0")
    assert res.returncode == 0, res.stderr
    assert "ollama create chat -f" in res.stdout and "ollama run chat" in res.stdout
    text = (tmp_path / "o" / "Modelfile").read_text()
    assert (
        text.startswith("FROM ./chat-q8_0.gguf\n") and (tmp_path / "o" / "chat-q8_0.gguf").is_file()
    )
    assert 'PARAMETER stop "<|im_end|>"' in text and 'SYSTEM """You are a tiny model."""' in text
    assert "{{-" not in text  # a trim marker would eat the newline after <|im_end|>
    tok = load_run(run).tok
    pieces = template_pieces(tok)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    conv.append({"role": "user", "content": "again"})
    want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert render_like_go(pieces, conv) == want
    assert pieces.before["user"] == "<|im_start|>user\n" and pieces.after == "<|im_end|>\n"


def test_vllm_export_prints_the_serve_line(run: Path, tmp_path: Path) -> None:
    res = cli("export", run, "--to", "vllm", "--out", tmp_path / "v")
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith("vllm serve ") and "--enable-lora --lora-modules chat=" in line
    assert line.endswith("--max-lora-rank 8")

    tensors = load_file(tmp_path / "v" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16} and tensors


LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "IA3"),
        ({"peft_type": "VERA"}, "VERA"),
        ({"peft_type": "PROMPT_TUNING"}, "PROMPT_TUNING"),
        ({"peft_type": "PREFIX_TUNING"}, "PREFIX_TUNING"),
        ({"peft_type": "LEANTUNE", "modules": {"a": {"method": "bottleneck"}}}, "bottleneck"),
        ({"peft_type": "LEANTUNE", "modules": {"a": {"method": "bitfit"}}}, "bitfit"),
        ({"peft_type": "LEANTUNE", "modules": {"a": {"method": "sparse"}}}, "sparse"),
        ({"peft_type": "LEANTUNE", "modules": {"a": {"method": "layernorm"}}}, "layernorm"),
        ({"target_modules": ["model.embed_tokens"]}, "embed_tokens"),
        ({"rank_pattern": {"model.layers.0.self_attn.q_proj": 4}}, "rank_pattern"),
        ({"bias": "all"}, "bias"),
        ({"r": 600, "lora_alpha": 1200}, "512"),
    ],
)
def test_vllm_refusals_are_one_line(change: dict[str, object], said: str) -> None:
    from leantune.export.vllm import check_adapter, max_lora_rank

    with pytest.raises(LeantuneError) as e:
        max_lora_rank(check_adapter(LORA | change))
    message = str(e.value)
    assert said in message and "--to hf" in message and "\n" not in message


def test_vllm_rank_rules() -> None:
    from leantune.export.vllm import check_adapter, max_lora_rank

    # Differing ranks with one scale load in vLLM; the flag rounds up to an allowed value.
    even = LORA | {"rank_pattern": {"x.q_proj": 24}, "alpha_pattern": {"x.q_proj": 48}}
    assert check_adapter(even) == 24 and max_lora_rank(24) == 32
    assert max_lora_rank(1) == 1 and max_lora_rank(2) == 8 and max_lora_rank(300) == 320


def test_vllm_refuses_a_run_that_trained_its_own_weights(tmp_path: Path) -> None:
    """A full fine-tuning run has no adapter to serve: refused by the CLI, nothing written."""
    root = tmp_path / "h"
    run = tiny_run(root, method="full")
    refused(cli("export", run, "--to", "vllm", "--out", tmp_path / "v"), "own weights", "--to hf")
    assert not (tmp_path / "v").exists()


# ---------------------------------------------------------------------------- bad input


def test_bad_input_one_line_nothing_written(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    refused(cli("export", run, "--to", "gguf", "--quant", "q4_k", "--out", out), "q4_k")
    refused(cli("export", run, "--to", "onnx", "--out", out), "onnx", "hf, gguf, ollama, vllm")
    refused(cli("export", run, "--to", "hf", "--dtype", "int8", "--out", out), "int8")
    assert not out.exists()
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    refused(cli("export", run, "--to", "gguf", "--out", out), "--overwrite")
    refused(cli("export", run, "--to", "gguf", "--out", out, "--overwrite"), "not written by")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    # The run's base model lost its tokenizer: refused before any weight is read.
    copy = tmp_path / "run-copy"
    shutil.copytree(run, copy)
    base = load_run(run).config.model
    bare = tmp_path / "bare"
    shutil.copytree(base, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (bare / name).unlink(missing_ok=True)
    config = (copy / "config.yaml").read_text().replace(str(base), str(bare))
    (copy / "config.yaml").write_text(config)
    refused(cli("export", copy, "--to", "hf", "--out", tmp_path / "nt"), "no tokenizer")
    assert not (tmp_path / "nt").exists()


def test_encoder_run_to_gguf_is_refused(tmp_path: Path) -> None:
    model = tiny_model_folder(tmp_path / "bert")
    data = write_rows(tmp_path / "topics.jsonl", topic_rows(30))
    res = cli(
        "tune",
        *("--model", model, "--data", data, "--runs-dir", tmp_path / "runs", "--name", "c"),
        *("--epochs", "1", "--batch-size", "8", "--reference-examples", "0", "--quiet"),
    )
    assert res.returncode == 0, res.stderr
    for to in ("gguf", "ollama", "vllm"):
        out = tmp_path / f"out-{to}"
        refused(cli("export", tmp_path / "runs" / "c", "--to", to, "--out", out), "--to hf")
        assert not out.exists()


@pytest.mark.slow  # about a minute: SmolLM2's tokenizer read from the GGUF, 49,152 tokens
def test_smollm2_vocabulary_matches_its_own_gguf(tmp_path: Path) -> None:
    """The embedded SmolLM2's GGUF is the ground truth: the tokenizer keys leantune writes for
    it (tokens, types, merges, special ids, pre-tokenizer, template) are the file's own."""
    from transformers import AutoTokenizer

    from leantune.core.smollm2 import smollm2_gguf
    from leantune.export.gguf_vocab import write_vocabulary

    source = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    truth = read_fields(source)
    writer = gguf.GGUFWriter(tmp_path / "v.gguf", "llama")
    vocab = int(truth["llama.vocab_size"])  # type: ignore[call-overload]
    write_vocabulary(writer, tok, vocab, eot=tok.convert_tokens_to_ids("<|im_end|>"), pre="smollm")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = read_fields(tmp_path / "v.gguf")
    for key in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
    ):
        assert ours[key] == truth[key], key
    assert ours["tokenizer.ggml.eot_token_id"] == truth["tokenizer.ggml.eos_token_id"]
    # Without the override the tokenizer's own pre-tokenizer (a bare byte-level split once
    # transformers has rebuilt it) gives gpt-2, which splits SmolLM2's text into the same ids.
    from leantune.export.gguf_vocab import pre_tokenizer_name

    assert pre_tokenizer_name(json.loads(tok.backend_tokenizer.to_str())) == "gpt-2"


def test_k_quant_without_llama_cpp_is_refused(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name)
    )
    out = tmp_path / "k"
    refused(cli("export", run, "--to", "gguf", "--quant", "q4_k_m", "--out", out), "gguf-check")
    assert not out.exists()
