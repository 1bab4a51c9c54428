"""Instruction tuning SmolLM2-135M-Instruct: leantune vs TRL's SFTTrainer + peft LoRA (issue 15).

Both sides train the embedded SmolLM2 folder (``leantune.core.smollm2.smollm2_dir``) on the same
``--steps × --batch`` BBC instruction conversations (``leantune.models.chat.bbc_instruct``, article
bodies cut to ``BBC_BODY_WORDS`` as ``leantune tune --task instruct`` does), written once as a
JSON Lines ``messages`` file that both read; one epoch, so each conversation is seen once.

- **leantune**: ``prepare`` + the one training loop (``leantune.train.loop.train``) that
  ``leantune tune --task instruct`` runs, with its defaults: LoRA r=8, alpha 16, dropout 0 on
  all linear layers of the upper half, lr 2e-3, length-bucketed batches with dynamic padding,
  loss on the assistant's tokens. Without the run folder, baseline and final test evaluation of
  ``run_tune`` (so neither side evaluates during training), and with L2 0 (TRL has no penalty).
- **TRL**: ``SFTTrainer`` + peft ``LoraConfig`` on exactly the modules leantune adapted (read
  from the leantune model after injection), ``assistant_only_loss=True``. SmolLM2's chat
  template has no ``{% generation %}`` markers and TRL cannot patch it (it raises "patching is
  not supported for this template"), so the tokenizer gets the same template with the assistant
  turn's content and ``<|im_end|>`` inside ``{% generation %}`` — what TRL's error asks for; it
  renders byte-identical text (checked), and the labels TRL builds are compared token by token
  with leantune's. TRL's own defaults bf16=True and gradient_checkpointing=True are turned off:
  both sides run fp32 without checkpointing.

Same on both: r, alpha, dropout, modules, optimizer steps, batch 16, max length 128, lr 2e-3,
linear schedule with ``round(0.06 · steps)`` warmup steps (passed to TRL as an integer: its
``warmup_ratio`` rounds up and starts at lr 0), AdamW (β 0.9/0.999, eps 1e-8, no weight decay),
clipping at 1.0, seed 0, fp32, 2 torch threads. Each side runs in its own child process of this
script; the main rounds alternate ABBA (leantune, trl / trl, leantune ...).

Per child: seconds per optimizer step (wall time between consecutive step ends, median of the
steps after the first 2), peak RSS at the end of training (VmHWM, ``leantune.core.memory``; ru_maxrss
too). Round 0's children then score their trained model — by code shared by both sides — with
the mean loss over the assistant tokens of the same 100 validation conversations and ROUGE-L of
greedy headlines (``leantune.analysis.generate.generate`` + ``rouge_l``, 32 new tokens) on the same 30
test prompts (training is seeded, so later rounds would train the same model: they time only).
leantune alone also runs variants (time and memory only): bf16 autocast, activation
checkpointing, an int8 base (``leantune.models.precision``).

Every child's result is kept in ``--work``/results; a rerun with the same settings reuses them
(resumable), ``--fresh`` starts over.

Usage:
    python benchmarks/bench_sft.py --steps 2 --rounds 1 --variants none   # smoke, ~3 min
    nice -n 10 python benchmarks/bench_sft.py --json benchmarks/bench_sft.json   # ~20 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

from _common import alternate, offline_env, paired_ratios, python_command, run_timed, save_json

BATCH, MAX_LENGTH, LR, WARMUP_RATIO, SEED = 16, 128, 2e-3, 0.06, 0
R, ALPHA, DROPOUT = 8, 16, 0.0
VAL_CONVERSATIONS, TEST_HEADLINES, MAX_NEW_TOKENS, EVAL_BATCH = 100, 30, 32, 8
VARIANTS = ("bf16", "checkpointing", "int8")
SKIP_FIRST = 2

# SmolLM2's template with the assistant turn's content and end-of-turn token marked for
# transformers' return_assistant_tokens_mask (TRL's assistant_only_loss). Renders the same text.
MARKED_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


# ---------------------------------------------------------------------------- shared helpers


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "torchao"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def machine() -> str:
    model = "unknown CPU"
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    bf16 = "avx512_bf16" in flags
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{model}, {os.cpu_count()} cores{' (AVX512-BF16)' if bf16 else ''}, {mem:.0f} GiB, "
        f"{platform.system()} {platform.machine()}, no GPU"
    )


def read_messages(path: Path) -> list[list[dict[str, str]]]:
    return [json.loads(line)["messages"] for line in path.read_text().splitlines() if line]


def write_data(work: Path, n_train: int) -> dict[str, Any]:
    """train.jsonl (n_train conversations), val.jsonl (100), test.jsonl (30 headline prompts)."""
    from leantune.analysis.generate import sample_examples
    from leantune.models.chat import bbc_instruct
    from leantune.tune.prepare import BBC_BODY_WORDS

    bbc = bbc_instruct(SEED, (0.7, 0.1, 0.2), body_words=BBC_BODY_WORDS)
    if n_train > len(bbc.train):
        raise SystemExit(f"--steps × batch = {n_train} > {len(bbc.train)} training conversations")
    train = sample_examples(bbc.train, n_train, SEED)
    val = sample_examples(bbc.validation, VAL_CONVERSATIONS, SEED)
    headlines = [ex for ex in bbc.test if ex.kind == "headline"]
    test = sample_examples(headlines, TEST_HEADLINES, SEED)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("val", val), ("test", test)):
        text = "".join(json.dumps({"messages": ex.messages}) + "\n" for ex in rows)
        (data / f"{name}.jsonl").write_text(text)
    kinds = {k: sum(ex.kind == k for ex in train) for k in ("headline", "topic")}
    return {"train": len(train), "train_kinds": kinds, "val": len(val), "test": len(test)}


def warmup_steps(steps: int) -> int:
    """leantune's rule (``TrainConfig.warmup_ratio`` · total, rounded)."""
    return round(steps * WARMUP_RATIO)


def peak_rss() -> dict[str, float]:
    from leantune.core.memory import peak_memory_mb

    return {
        "vmhwm_mb": peak_memory_mb(),
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def step_seconds(ends: list[float], start: float) -> list[float]:
    marks = [start, *ends]
    return [b - a for a, b in pairwise(marks)]


def evaluate(model: Any, work: Path) -> dict[str, Any]:
    """Mean loss over the assistant tokens of the validation conversations, and ROUGE-L of
    greedy headlines on the test prompts: the same code, tokenizer and batches for both sides."""
    import torch
    import torch.nn.functional as F

    from leantune.analysis.generate import Sampling, generate, rouge_l
    from leantune.core.smollm2 import smollm2_dir
    from leantune.models.chat import ChatExample, tokenize_chats
    from leantune.models.loading import load_tokenizer

    tok = load_tokenizer(smollm2_dir())
    val = [ChatExample(m) for m in read_messages(work / "data" / "val.jsonl")]
    chats = tokenize_chats(tok, val, MAX_LENGTH)
    model.eval()
    total, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(val), EVAL_BATCH):
            ids = chats.input_ids[start : start + EVAL_BATCH]
            labels = chats.labels[start : start + EVAL_BATCH]
            width = max(len(x) for x in ids)
            x = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
            y = torch.full((len(ids), width), -100, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for i, (a, b) in enumerate(zip(ids, labels, strict=True)):
                x[i, : len(a)], y[i, : len(b)], mask[i, : len(a)] = (
                    torch.tensor(a),
                    torch.tensor(b),
                    1,
                )
            logits = model(input_ids=x, attention_mask=mask).logits.float()
            shift_logits, shift_labels = logits[:, :-1], y[:, 1:]
            total += float(
                F.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.shape[-1]),
                    shift_labels.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
            )
            count += int((shift_labels != -100).sum())
    val_seconds = time.perf_counter() - t0
    tests = read_messages(work / "data" / "test.jsonl")
    prompts = [m[:-1] for m in tests]
    refs = [m[-1]["content"] for m in tests]
    t0 = time.perf_counter()
    answers = generate(
        model, tok, prompts, Sampling(max_new_tokens=MAX_NEW_TOKENS), batch_size=EVAL_BATCH
    )
    gen_seconds = time.perf_counter() - t0
    scores = [rouge_l(a, r) for a, r in zip(answers, refs, strict=True)]
    return {
        "val_loss": total / count,
        "val_tokens": count,
        "rouge_l": sum(scores) / len(scores),
        "examples": [
            {"reference": r, "answer": a} for r, a in list(zip(refs, answers, strict=True))[:5]
        ],
        "eval_seconds": {"val": val_seconds, "generate": gen_seconds},
    }


# ---------------------------------------------------------------------------- the two sides


def leantune_config(work: Path, steps: int) -> Any:
    from leantune.core.smollm2 import smollm2_dir
    from leantune.tune import TuneConfig

    data = work / "data"
    return TuneConfig(
        task="instruct",
        model=str(smollm2_dir()),
        data=str(data / "train.jsonl"),
        eval_data=str(data / "val.jsonl"),
        test_data=str(data / "test.jsonl"),
        split="1,0,0",
        max_length=MAX_LENGTH,
        batch_size=BATCH,
        epochs=1,
        lr=LR,
        warmup_ratio=WARMUP_RATIO,
        schedule="linear",
        r=R,
        alpha=ALPHA,
        dropout=DROPOUT,
        l2=0.0,
        max_steps=steps,
        seed=SEED,
        device="cpu",
        gen_examples=0,
        reference_examples=0,
        runs_dir=str(work / "runs"),
        name="bench",
    ).resolved()


def leantune_targets(work: Path) -> list[str]:
    """The modules ``leantune tune --task instruct`` adapts by default (upper half, all-linear)."""
    from leantune.adapters.inject import adapter_layers
    from leantune.tune.prepare import prepare

    prep = prepare(leantune_config(work, 1))
    return [name for name, _ in adapter_layers(prep.model)]


def run_leantune(work: Path, steps: int, variant: str, do_eval: bool) -> dict[str, Any]:
    import torch

    from leantune.adapters.inject import adapter_layers
    from leantune.models.precision import enable_checkpointing, quantize_base
    from leantune.train.interface import TrainHooks
    from leantune.train.loop import train
    from leantune.tune.config import train_config
    from leantune.tune.prepare import prepare
    from leantune.tune.strategy import apply_method

    config = leantune_config(work, steps)
    prep = prepare(config, with_method=False)
    if variant == "int8":
        quantize_base(prep.model, "int8")
    apply_method(prep.model, config)
    if variant == "checkpointing":
        enable_checkpointing(prep.model)
    model = prep.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    modules = [name for name, _ in adapter_layers(model)]
    tc = replace(train_config(config), precision="bf16" if variant == "bf16" else "fp32")
    ends: list[float] = []
    lengths = [len(x) for x in prep.train.ids]
    padded = sum(int(b["input_ids"].numel()) for b in prep.batches(0))
    # The same forward leantune tune uses: the output head at the answer tokens only.
    hooks = TrainHooks(
        on_step=lambda p, limit: ends.append(time.perf_counter()), forward=prep.forward
    )
    start = time.perf_counter()
    result = train(model, prep.batches, lambda m: {"perplexity": 1.0}, tc, hooks)
    memory = peak_rss()
    out = {
        "side": "leantune",
        "variant": variant,
        "steps": result.steps,
        "step_seconds": step_seconds(ends, start),
        "train_loss_curve": [loss for _, loss in result.curve],
        "peak_rss": memory,
        "trainable_params": trainable,
        "modules": len(modules),
        "tokens": sum(lengths),
        "padded_tokens": padded,
        "truncated": sum(n >= MAX_LENGTH for n in lengths),
        "precision": tc.precision,
        "torch_threads": torch.get_num_threads(),
    }
    if do_eval:
        out |= evaluate(model, work)
    return out


def trl_labels_check(dataset: Any, work: Path) -> dict[str, Any]:
    """TRL's labels vs leantune's on the training rows, token by token (TRL keeps the template's
    newline after the last <|im_end|>, masked; leantune drops tokens after the last trained one)."""
    from leantune.core.smollm2 import smollm2_dir
    from leantune.models.chat import ChatExample, tokenize_chats
    from leantune.models.loading import load_tokenizer

    tok = load_tokenizer(smollm2_dir())
    rows = [ChatExample(m) for m in read_messages(work / "data" / "train.jsonl")]
    ours = tokenize_chats(tok, rows, MAX_LENGTH)
    same_ids = same_labels = 0
    lengths = []
    for i, row in enumerate(dataset):
        ids, labels = list(row["input_ids"]), list(row["labels"])
        lengths.append(len(ids))
        last = max(t for t, y in enumerate(labels) if y != -100) + 1
        same_ids += ids[:last] == ours.input_ids[i]
        same_labels += labels[:last] == ours.labels[i]
    return {
        "rows": len(rows),
        "same_input_ids": same_ids,
        "same_labels": same_labels,
        "trl_tokens": sum(lengths),
        "leantune_tokens": sum(len(x) for x in ours.input_ids),
        "leantune_truncated": ours.truncated,
    }


def run_trl(work: Path, steps: int, variant: str, do_eval: bool) -> dict[str, Any]:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    from leantune.core.smollm2 import smollm2_dir

    hf_logging.set_verbosity_error()
    folder = smollm2_dir()
    targets = json.loads((work / "targets.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    original = tok.chat_template
    tok.chat_template = MARKED_TEMPLATE
    for conv in read_messages(work / "data" / "train.jsonl")[:50]:  # the same text
        for prompt in (False, True):
            msgs = conv[:-1] if prompt else conv
            a = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
            b = tok.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=prompt, chat_template=original
            )
            assert a == b, "the marked template renders other text than SmolLM2's"
    dataset = load_dataset("json", data_files=str(work / "data" / "train.jsonl"), split="train")
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_config = LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=DROPOUT,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    ends: list[float] = []
    marks: dict[str, float] = {}

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            marks["start"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            ends.append(time.perf_counter())

    bf16 = variant == "trl-defaults"
    args = SFTConfig(
        output_dir=str(work / "trl-out"),
        max_steps=steps,
        num_train_epochs=1,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=warmup_steps(steps),
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        bf16=bf16,
        fp16=False,
        gradient_checkpointing=bf16,
        use_cpu=True,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        max_length=MAX_LENGTH,
        assistant_only_loss=True,
        packing=False,
        seed=SEED,
        data_seed=SEED,
        dataloader_num_workers=0,
        disable_tqdm=True,
        logging_steps=1,  # the per-step loss curve (TRL's default logs every 10 steps)
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[StepTimer()],
    )
    check = trl_labels_check(trainer.train_dataset, work)
    trained: Any = trainer.model
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    modules = sum(1 for n, _ in trained.named_modules() if n.endswith(".lora_A"))
    trainer.train()
    memory = peak_rss()
    curve = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {
        "side": "trl",
        "variant": variant,
        "steps": trainer.state.global_step,
        "step_seconds": step_seconds(ends, marks["start"]),
        "train_loss_logged": curve,
        "peak_rss": memory,
        "trainable_params": trainable,
        "modules": modules,
        "labels_check": check,
        "precision": "bf16" if bf16 else "fp32",
        "torch_threads": torch.get_num_threads(),
    }
    if do_eval:
        trained.eval()
        out |= evaluate(trained, work)
    return out


def run_base(work: Path) -> dict[str, Any]:
    """The untrained model, evaluated as the trained ones are."""
    from leantune.core.smollm2 import smollm2_dir
    from leantune.models.loading import load_model

    model = load_model(smollm2_dir(), "instruct")
    return {"side": "base"} | evaluate(model, work)


# ---------------------------------------------------------------------------- orchestration


def child(args: argparse.Namespace) -> None:
    work = Path(args.work)
    if args.side == "targets":
        out: dict[str, Any] = {"targets": leantune_targets(work)}
    elif args.side == "base":
        out = run_base(work)
    elif args.side == "leantune":
        out = run_leantune(work, args.steps, args.variant, not args.no_eval)
    else:
        out = run_trl(work, args.steps, args.variant, not args.no_eval)
    out["load_average_at_end"] = os.getloadavg()
    save_json(args.out, out)


def spawn(
    work: Path, tag: str, side: str, steps: int, variant: str = "fp32", evaluate_: bool = True
) -> dict[str, Any]:
    """Run one child (or reuse its kept result) and return its JSON."""
    out = work / "results" / f"{tag}.json"
    if out.exists():
        print(f"[{tag}] kept result reused", flush=True)
        return json.loads(out.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    cmd = python_command(__file__, "--side", side, "--variant", variant, "--steps", str(steps))
    cmd += ["--work", str(work), "--out", str(tmp)] + ([] if evaluate_ else ["--no-eval"])
    env = offline_env(HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = work / "results" / f"{tag}.log"
    proc, seconds = run_timed(cmd, env, log=log)
    if proc.returncode != 0:
        raise SystemExit(
            f"[{tag}] failed (exit {proc.returncode}); see {log}:\n" + log.read_text()[-3000:]
        )
    tmp.rename(out)
    res = json.loads(out.read_text())
    res["wall_seconds"] = seconds
    save_json(out, res)
    print(f"[{tag}] done in {res['wall_seconds']:.0f} s: {summary_line(res)}", flush=True)
    return res


def median_step(res: dict[str, Any]) -> float:
    times = res["step_seconds"]
    later = times[SKIP_FIRST:] or times
    return statistics.median(later)


def fastest_step(res: dict[str, Any]) -> float:
    """The fastest step after the first 2: on a shared machine the least disturbed one."""
    times = res["step_seconds"]
    return min(times[SKIP_FIRST:] or times)


def summary_line(res: dict[str, Any]) -> str:
    if "step_seconds" not in res:
        return ", ".join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float))
    line = f"{median_step(res):.2f} s/step (fastest {fastest_step(res):.2f}), peak {res['peak_rss']['vmhwm_mb']:.0f} MB"
    if "val_loss" in res:
        line += f", val loss {res['val_loss']:.4f}, ROUGE-L {res['rouge_l']:.4f}"
    return line


def med(values: list[float]) -> float:
    return statistics.median(values)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per side")
    ap.add_argument("--rounds", type=int, default=2, help="leantune/TRL pairs, ABBA order")
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"leantune variants (time, memory): comma list of {', '.join(VARIANTS)}, "
        "trl-defaults (TRL's own bf16 + checkpointing), or none",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_sft"))
    ap.add_argument("--fresh", action="store_true", help="discard kept child results")
    ap.add_argument("--no-base", action="store_true", help="skip the untrained model's eval")
    # child options
    ap.add_argument(
        "--side", choices=("leantune", "trl", "targets", "base"), help=argparse.SUPPRESS
    )
    ap.add_argument("--variant", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--no-eval", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args()


def make_work(args: argparse.Namespace) -> Path:
    """The work folder of these settings (kept child results are reused; --fresh empties it)."""
    work = args.work / f"steps{args.steps}-batch{BATCH}"
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    return work


def adapted_modules(work: Path) -> list[str]:
    """The modules leantune adapts, from a child, written to targets.json for the TRL side."""
    targets: list[str] = spawn(work, "targets", "targets", 1)["targets"]
    (work / "targets.json").write_text(json.dumps(targets))
    print(f"{len(targets)} modules adapted: {targets[0]} ... {targets[-1]}", flush=True)
    return targets


def run_rounds(work: Path, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """The main rounds, leantune and TRL alternating ABBA; each side's results by round."""
    main_runs: dict[str, list[dict[str, Any]]] = {"leantune": [], "trl": []}
    for r, side in alternate(("leantune", "trl"), args.rounds):
        # Training is seeded and deterministic: round 0 evaluates, later rounds time only.
        res = spawn(work, f"round{r}-{side}", side, args.steps, evaluate_=r == 0)
        main_runs[side].append(res)
    return main_runs


def run_variants(work: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """One timing-only run per --variants entry (trl-defaults on the TRL side)."""
    variants = [v for v in args.variants.split(",") if v and v != "none"]
    variant_runs: dict[str, dict[str, Any]] = {}
    for v in variants:
        if v not in (*VARIANTS, "trl-defaults"):
            raise SystemExit(f"unknown variant {v!r}")
        side = "trl" if v == "trl-defaults" else "leantune"
        variant_runs[v] = spawn(work, f"variant-{v}", side, args.steps, v, evaluate_=False)
    return variant_runs


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's rounds: medians over rounds (and the values per round), scores of round 0."""
    out = {
        "step_s": med([median_step(x) for x in runs]),
        "step_s_per_round": [median_step(x) for x in runs],
        "fastest_step_s": min(fastest_step(x) for x in runs),
        "fastest_step_s_per_round": [fastest_step(x) for x in runs],
        "peak_mb": med([x["peak_rss"]["vmhwm_mb"] for x in runs]),
        "peak_mb_per_round": [x["peak_rss"]["vmhwm_mb"] for x in runs],
        "trainable_params": runs[0]["trainable_params"],
        "modules": runs[0]["modules"],
    }
    scored = [x for x in runs if "val_loss" in x]
    out["val_loss"] = med([x["val_loss"] for x in scored])
    out["rouge_l"] = med([x["rouge_l"] for x in scored])
    out["train_loss_final"] = [x.get("train_loss_curve", x.get("train_loss_logged")) for x in runs]
    return out


def compare(
    main_runs: dict[str, list[dict[str, Any]]], lt: dict[str, Any], tr: dict[str, Any]
) -> dict[str, Any]:
    """leantune / TRL per round (time, fastest step, peak RSS) and their medians; score diffs."""
    ours, theirs = main_runs["leantune"], main_runs["trl"]
    pair_time = paired_ratios([median_step(x) for x in ours], [median_step(x) for x in theirs])
    pair_mem = paired_ratios(
        [x["peak_rss"]["vmhwm_mb"] for x in ours], [x["peak_rss"]["vmhwm_mb"] for x in theirs]
    )
    pair_fast = paired_ratios([fastest_step(x) for x in ours], [fastest_step(x) for x in theirs])
    return {
        "time": med(pair_time),
        "time_fastest_steps": lt["fastest_step_s"] / tr["fastest_step_s"],
        "time_fastest_per_round": pair_fast,
        "time_per_round": pair_time,
        "memory": med(pair_mem),
        "memory_per_round": pair_mem,
        "val_loss_diff": lt["val_loss"] - tr["val_loss"],
        "rouge_l_diff": lt["rouge_l"] - tr["rouge_l"],
    }


def print_table(
    args: argparse.Namespace,
    base: dict[str, Any] | None,
    lt: dict[str, Any],
    tr: dict[str, Any],
    ratios: dict[str, Any],
    target_met: bool,
) -> None:
    """The main table: untrained model, both sides, their ratios, per round, the target."""
    print()
    print(
        f"{args.steps} steps × batch {BATCH}, max length {MAX_LENGTH}, {args.rounds} rounds (ABBA)"
    )
    print(
        "| side | s/step (median) | fastest step s | peak RSS MB | val loss | ROUGE-L | trainable |"
    )
    print("|---|---|---|---|---|---|---|")
    if base is not None:
        print(f"| untrained SmolLM2 | | | | {base['val_loss']:.4f} | {base['rouge_l']:.4f} | |")
    for name, a in (("leantune", lt), ("TRL SFTTrainer + peft", tr)):
        print(
            f"| {name} | {a['step_s']:.2f} | {a['fastest_step_s']:.2f} | {a['peak_mb']:,.0f} | "
            f"{a['val_loss']:.4f} | {a['rouge_l']:.4f} | {a['trainable_params']:,} |"
        )
    print(
        f"| ratio / diff leantune vs TRL | {ratios['time']:.2f}× | "
        f"{ratios['time_fastest_steps']:.2f}× | {ratios['memory']:.2f}× | "
        f"{ratios['val_loss_diff']:+.4f} | {ratios['rouge_l_diff']:+.4f} | |"
    )
    print(
        "per round (leantune / TRL): median step "
        + ", ".join(f"{x:.2f}" for x in ratios["time_per_round"])
        + "; fastest step "
        + ", ".join(f"{x:.2f}" for x in ratios["time_fastest_per_round"])
        + "; peak RSS "
        + ", ".join(f"{x:.2f}" for x in ratios["memory_per_round"])
    )
    print(
        f"target (≤ 0.8× time and memory, val loss ≤ TRL's): {'met' if target_met else 'not met'}"
    )


def print_variants(
    variant_runs: dict[str, dict[str, Any]], lt: dict[str, Any], tr: dict[str, Any]
) -> None:
    """The variants' table, each against its side's fp32 main rounds."""
    print()
    print(
        "| leantune variant | s/step (median) | fastest step s | vs fp32 fastest | peak RSS MB | vs fp32 |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| fp32 (main rounds) | {lt['step_s']:.2f} | {lt['fastest_step_s']:.2f} | 1.00× | "
        f"{lt['peak_mb']:,.0f} | 1.00× |"
    )
    for v, res in variant_runs.items():
        ref = tr if v == "trl-defaults" else lt
        s, m = median_step(res), res["peak_rss"]["vmhwm_mb"]
        label = "TRL defaults (bf16 + checkpointing), vs TRL fp32" if v == "trl-defaults" else v
        fast = fastest_step(res)
        print(
            f"| {label} | {s:.2f} | {fast:.2f} | {fast / ref['fastest_step_s']:.2f}× | "
            f"{m:,.0f} | {m / ref['peak_mb']:.2f}× |"
        )


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The record's settings: the command line's and the fixed ones of both sides."""
    return {
        "steps": args.steps,
        "rounds": args.rounds,
        "batch": BATCH,
        "max_length": MAX_LENGTH,
        "lr": LR,
        "warmup_steps": warmup_steps(args.steps),
        "r": R,
        "alpha": ALPHA,
        "dropout": DROPOUT,
        "val_conversations": VAL_CONVERSATIONS,
        "test_headlines": TEST_HEADLINES,
        "max_new_tokens": MAX_NEW_TOKENS,
        "skip_first_steps": SKIP_FIRST,
    }


def main() -> None:
    args = parse_args()
    if args.side:
        child(args)
        return

    work = make_work(args)
    data = write_data(work, args.steps * BATCH)
    print(f"data: {data}", flush=True)
    targets = adapted_modules(work)
    base = None if args.no_base else spawn(work, "base", "base", 0)
    main_runs = run_rounds(work, args)
    variant_runs = run_variants(work, args)

    lt, tr = aggregate(main_runs["leantune"]), aggregate(main_runs["trl"])
    ratios = compare(main_runs, lt, tr)
    target_met = (
        ratios["time"] <= 0.8 and ratios["memory"] <= 0.8 and lt["val_loss"] <= tr["val_loss"]
    )
    print_table(args, base, lt, tr, ratios, target_met)
    if variant_runs:
        print_variants(variant_runs, lt, tr)
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "load_average_at_end": os.getloadavg(),
        "versions": versions(),
        "settings": settings(args),
        "data": data,
        "targets": targets,
        "base": base,
        "leantune": lt,
        "trl": tr,
        "ratios": ratios,
        "target_met": target_met,
        "variants": variant_runs,
        "runs": main_runs,
    }
    if args.json:
        save_json(args.json, record)
        print(f"\nwritten {args.json}")


if __name__ == "__main__":
    main()
