"""The GPU check's end-to-end parts (``gpu_check.py``): ``leantune tune --task instruct`` in bf16,
fp16, on a quantized base and under torchrun, then ``leantune generate``; hotswap under
``torch.compile``. They run on ``gpu_fixture/``: a tiny chat Llama (hidden 64, 2 layers) with a
byte-level BPE tokenizer, a ChatML template, and 90 "Which topic?" conversations, made by
``python benchmarks/gpu_check.py --make-fixture`` with the tests' own tokenizer helper
(``tests/helpers.chat_tokenizer``) and shipped in the repository (nothing to download there).

Each tune part runs the ``leantune`` command of this interpreter's environment in a child
process (on CUDA with ``--device auto``: the run picks ``cuda``, under torchrun
``cuda:LOCAL_RANK``), checks the run it left (exit 0, summary.json, the adapter, a finite test
perplexity) and records the summary's figures.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "gpu_fixture"
LEANTUNE = [sys.executable, "-m", "leantune.cli"]
"""The leantune command of this interpreter: the same as the ``leantune`` script, and found also
where leantune runs from the tree (PYTHONPATH=src) without an install."""
TOPICS = {
    "sport": "match goal team win cup",
    "tech": "phone chip software web data",
    "business": "shares profit bank market sales",
}
RUN = ("--epochs", "2", "--general-examples", "8", "--gen-examples", "6")
TINY_RUN = (
    "--epochs", "1", "--max-steps", "3", "--eval-examples", "6",
    "--general-examples", "2", "--gen-examples", "2",
)  # fmt: skip
"""The CPU rehearsal's runs: every phase, a few steps and prompts (a CPU step is slow)."""
PROMPTS = ["match goal team win. Which topic?", "phone chip web data. Which topic?"]
SUMMARY_KEYS = (
    "steps",
    "device",
    "precision",
    "train_seconds",
    "peak_memory_mb",
    "host_peak_memory_mb",
    "test_perplexity_before",
    "test_perplexity",
    "test_exact_match_before",
    "test_exact_match",
    "general_before",
    "general_after",
)


class CheckFailed(RuntimeError):
    """A part's check failed; ``figures`` still go into the record."""

    def __init__(self, message: str, figures: dict[str, Any]) -> None:
        super().__init__(message)
        self.figures = figures


def rows(n: int) -> list[dict[str, str]]:
    names = sorted(TOPICS)
    out = []
    for i in range(n):
        topic = names[i % 3]
        words = TOPICS[topic].split()
        text = " ".join(words[(i + j) % 5] for j in range(6))
        out.append({"prompt": f"{text}. Which topic?", "response": topic})
    return out


def make_fixture(folder: Path) -> None:
    """The tiny chat Llama, its tokenizer (with the chat template) and chat.jsonl."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(HERE.parent / "tests"))
    from helpers import chat_tokenizer

    data = rows(90)
    tok = chat_tokenizer([f"{r['prompt']} {r['response']}" for r in data[:30]])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,  # nf4 quantizes a layer of a multiple of 2048 weights: 64 × 32 is one
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
    )
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))


# ---------------------------------------------------------------------------- tune runs


def device_spec(args: Any) -> str:
    return "cpu" if args.device == "cpu" else "auto"


def tune_command(args: Any, name: str, *extra: str) -> list[str]:
    work = Path(args.work)
    return [
        "tune",
        "--task", "instruct",
        "--model", str(FIXTURE),
        "--data", str(FIXTURE / "chat.jsonl"),
        "--runs-dir", str(work / "runs"),
        "--name", name,
        "--overwrite",
        "--batch-size", "8",
        "--lr", "1e-2",
        "--layers", "all",
        "--reference-examples", "0",
        "--max-new-tokens", "4",
        "--device", device_spec(args),
        *(TINY_RUN if args.tiny else RUN),
        *extra,
    ]  # fmt: skip


def run_command(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    print("$", " ".join(cmd), flush=True)
    print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", flush=True)
    return done


def checked_run(args: Any, name: str, done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The run's figures; CheckFailed when it did not finish as a run should."""
    run = Path(args.work) / "runs" / name
    figures: dict[str, Any] = {"exit_code": done.returncode}
    summary_path = run / "summary.json"
    if done.returncode != 0 or not summary_path.is_file():
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise CheckFailed(f"leantune tune exit {done.returncode}: {last}", figures)
    summary = json.loads(summary_path.read_text())
    figures |= {k: summary[k] for k in SUMMARY_KEYS if k in summary}
    figures["run"] = str(run)
    problems = []
    if not (run / "adapter" / "adapter_model.safetensors").is_file():
        problems.append("no adapter/adapter_model.safetensors")
    if not math.isfinite(summary.get("test_perplexity", math.nan)):
        problems.append(f"test perplexity {summary.get('test_perplexity')}")
    if not summary.get("steps"):
        problems.append("no optimizer step")
    if problems:
        raise CheckFailed("; ".join(problems), figures)
    return figures


def expect_device(args: Any, figures: dict[str, Any], want: str | None = None) -> None:
    device = str(figures.get("device", ""))
    expected = want or ("cpu" if args.device == "cpu" else "cuda")
    if not device.startswith(expected):
        raise CheckFailed(f"the run used {device!r}, not {expected}", figures)


def tune(args: Any, name: str, *extra: str) -> dict[str, Any]:
    done = run_command([*LEANTUNE, *tune_command(args, name, *extra)])
    figures = checked_run(args, name, done)
    expect_device(args, figures)
    return figures


def generate(args: Any, name: str) -> dict[str, Any]:
    run = Path(args.work) / "runs" / name
    cmd = [*LEANTUNE, "generate", str(run), "--max-new-tokens", "6"]
    for prompt in PROMPTS:
        cmd += ["--prompt", prompt]
    done = run_command(cmd)
    if done.returncode != 0:
        raise RuntimeError(
            f"leantune generate exit {done.returncode}: {done.stderr.strip()[-300:]}"
        )
    answers = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if len(answers) != len(PROMPTS) or not all("answer" in a for a in answers):
        raise RuntimeError(f"leantune generate gave {answers!r}")
    return {"answers": answers}


def tune_bf16(args: Any) -> dict[str, Any]:
    figures = tune(args, "bf16", "--precision", "bf16")
    try:
        figures["generate"] = generate(args, "bf16")
    except RuntimeError as e:
        raise CheckFailed(str(e), figures) from None
    return figures


def tune_fp16(args: Any) -> dict[str, Any]:
    figures = tune(args, "fp16", "--precision", "fp16")
    summary = json.loads((Path(figures["run"]) / "summary.json").read_text())
    scale, skipped = summary.get("fp16_loss_scale"), summary.get("fp16_skipped_steps")
    figures |= {"fp16_loss_scale": scale, "fp16_skipped_steps": skipped}
    # The scaler ran (a scale in the summary) and stepped: not every step was skipped.
    if not scale or not math.isfinite(scale) or skipped is None or skipped >= figures["steps"]:
        raise CheckFailed(
            f"the fp16 loss scaler did not step (scale {scale}, skipped {skipped})", figures
        )
    return figures


def tune_quantize(args: Any) -> dict[str, Any]:
    done = run_command(
        [*LEANTUNE, *tune_command(args, "nf4", "--precision", "bf16", "--quantize", "nf4")]
    )
    figures = checked_run(args, "nf4", done)
    expect_device(args, figures)
    said = [line for line in (done.stdout + done.stderr).splitlines() if "--quantize nf4:" in line]
    figures["quantize_note"] = said[0].strip() if said else None
    if not said or " 0 linear layers" in said[0]:
        raise CheckFailed("the run quantized no layer of the base", figures)
    return figures


def tune_torchrun(args: Any) -> dict[str, Any]:
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    cmd = [*head, "-m", "leantune.cli", *tune_command(args, "torchrun", "--precision", "bf16")]
    figures = checked_run(args, "torchrun", run_command(cmd))
    # One process under torchrun: NCCL on CUDA (leantune's join), gloo on a CPU.
    figures["backend"] = "gloo" if args.device == "cpu" else "nccl"
    expect_device(args, figures, "cpu" if args.device == "cpu" else "cuda:0")
    return figures


# ---------------------------------------------------------------------------- hotswap


def saved_adapter(path: Path, r: int, alpha: float, seed: int) -> Path:
    """A LoRA adapter on the fixture model with random factors, saved to ``path``."""
    import torch
    from transformers import AutoModelForCausalLM

    import leantune as lt

    model = AutoModelForCausalLM.from_pretrained(FIXTURE)
    lt.inject(model, lt.LoraConfig(r=r, alpha=alpha, targets="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lt.adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lt.save_adapter(model, path)
    return path


def hotswap_part(args: Any) -> dict[str, Any]:
    """A compiled model serves adapter a, then b, a, b (other rank and scaling), each time
    equal to the eager model with that adapter, with no compile after the first."""
    import torch
    from transformers import AutoModelForCausalLM

    import leantune as lt

    device = torch.device(args.device)
    work = Path(args.work) / "hotswap"
    folders = {
        "a": saved_adapter(work / "a", r=4, alpha=8, seed=1),
        "b": saved_adapter(work / "b", r=8, alpha=3, seed=2),
    }
    x = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)

    def load(folder: Path, name: str = "default") -> Any:
        model = AutoModelForCausalLM.from_pretrained(FIXTURE)
        lt.load_adapter(model, folder, name)
        return model.to(device).eval()

    with torch.no_grad():
        expected = {k: load(f)(input_ids=x).logits for k, f in folders.items()}
    compiles = [0]
    # CUDA: inductor, what serving uses. CPU: dynamo with an eager backend (the graph
    # capture, guards and recompiles are dynamo's; inductor's C++ build takes minutes here).
    backend_name = "inductor" if device.type == "cuda" else "eager"

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        compiles[0] += 1
        if backend_name == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return gm.forward

    model = load(folders["a"], "served")
    lt.prepare_hotswap(model, 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    diffs = []
    with torch.no_grad():
        diffs.append(float((compiled(input_ids=x).logits - expected["a"]).abs().max()))
        first = compiles[0]
        for name in ("b", "a", "b"):
            lt.hotswap(compiled, folders[name])
            diffs.append(float((compiled(input_ids=x).logits - expected[name]).abs().max()))
    gap = float((expected["a"] - expected["b"]).abs().max())
    figures = {
        "backend": backend_name,
        "compiles_first_call": first,
        "recompiles": compiles[0] - first,
        "max_abs_diff_to_eager": diffs,
        "a_vs_b_max_abs": gap,
    }
    if compiles[0] != first:
        raise CheckFailed(f"hotswap made torch.compile recompile {compiles[0] - first}x", figures)
    if max(diffs) > 1e-3 or gap < 1e-2:
        raise CheckFailed("the compiled model's outputs do not follow the swapped adapter", figures)
    return figures
