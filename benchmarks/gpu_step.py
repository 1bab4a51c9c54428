"""The GPU check's step parts (``gpu_check.py``): leantune's training step against peft +
transformers on one model and batch, and the quantized base against bf16.

**Step** (``step_part``). A causal LM built from its config with random weights in bf16 (SDPA
attention, nothing downloaded), built twice from the same seed: one copy gets leantune's LoRA
(``lt.inject``, then ``cast_base`` to bf16: what ``leantune tune --base-dtype bf16`` does; the
adapters stay fp32), the other peft's (``get_peft_model``; peft keeps its adapters in fp32 too).
LoRA r 16, alpha 32, dropout 0 on every linear layer but the output head, on both (the counts
of adapted modules and trainable parameters are compared and must be equal). Before each row
both sides get the same LoRA start: peft's A (Kaiming-uniform) copied into leantune's, B zero.

- leantune's step is its own loop (``leantune.train.loop.train``, as ``leantune tune`` runs it:
  autocast to bf16, the loss, backward, clipping at 1.0, AdamW, the schedule's step), with the
  model's own forward and loss on all tokens (``--task causal-lm``) or the answer-only head
  (``train/answer.py``, ``--task instruct``) for the answer-only row;
- peft's step is what a transformers user writes: ``model(**batch).loss`` under
  ``torch.autocast(bf16)``, backward, ``clip_grad_norm_(1.0)``, AdamW, ``zero_grad``.

Both with AdamW lr 1e-3, no weight decay, a constant rate. Rows: each shape (8 × 1024 and 4 ×
2048 tokens) with and without gradient checkpointing (non-reentrant on both), loss on every
token; then the answer-only row (the last eighth of each row's tokens labelled) at the first
shape. In a row the two sides alternate step by step (peft's step runs inside leantune's
``on_step`` hook), ``WARMUP`` steps each first; the step time is the median of the timed steps
(``torch.cuda.synchronize`` at each end). Loss agreement: both start from the same weights and
see the same batch, so each step's loss must agree within ``LOSS_RTOL`` relative.

Memory is measured apart: each side alone on the device (the other not built yet, or freed),
``torch.cuda.reset_peak_memory_stats`` before each row and ``max_memory_allocated`` after
``MEMORY_STEPS`` steps (the weights, the adapters, AdamW's moments and the step's peak).

**Quantized base** (``quantized_part``). leantune's ``quantize_base`` (torchao int8 weight-only,
nf4 as QLoRA) on the Llama, then LoRA as above, against the bf16 base: each mode alone, its step
time (median) and peak memory at the first shape without checkpointing, and the base's bytes.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

R, ALPHA, LR = 16, 32, 1e-3
LOSS_RTOL = 0.02
"""Relative loss difference allowed between the sides at the same step: bf16 keeps 8 bits of
mantissa, and the two libraries round the LoRA update and sum it in another order."""
TARGET = 0.8
"""Issue 33's target: leantune at most 0.8× peft + transformers' step time and peak memory."""
MEMORY_STEPS = 2
"""Steps each side runs alone for its peak memory (the second has AdamW's moments)."""
ANSWER_SHARE = 8
"""The answer-only row labels the last 1/ANSWER_SHARE of each row's tokens."""


class Measured(RuntimeError):
    """A check failed after the figures were measured: they go into the record with it."""

    def __init__(self, message: str, figures: dict[str, Any]) -> None:
        super().__init__(message)
        self.figures = figures


def shapes(tiny: bool) -> list[tuple[int, int]]:
    return [(2, 32), (1, 64)] if tiny else [(8, 1024), (4, 2048)]


def memory_steps(device: torch.device) -> int:
    """One step on a CPU, where there is no allocator peak to read (the code path runs)."""
    return MEMORY_STEPS if device.type == "cuda" else 1


def steps(tiny: bool) -> tuple[int, int]:
    """(warm-up steps, timed steps) per side and row."""
    return (1, 1) if tiny else (2, 8)


def model_config(kind: str, tiny: bool) -> Any:
    """Llama-3.2-1B's shapes (hidden 2048, 16 layers, GQA 32/8, 128k vocabulary) or
    Qwen2-0.5B's (hidden 896, 24 layers, GQA 14/2, 152k vocabulary); tiny ones for the CPU."""
    from transformers import LlamaConfig, Qwen2Config

    common: dict[str, Any] = {"max_position_embeddings": 4096, "tie_word_embeddings": True}
    if kind == "llama":
        size = (
            dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
            if tiny
            else dict(
                vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16
            )
        )
        heads = dict(num_attention_heads=4, num_key_value_heads=2) if tiny else {}
        heads = heads or dict(num_attention_heads=32, num_key_value_heads=8)
        return LlamaConfig(**common, **size, **heads, rope_theta=500000.0)
    if kind == "qwen2":
        size = (
            dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
            if tiny
            else dict(
                vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24
            )
        )
        heads = dict(num_attention_heads=4, num_key_value_heads=2) if tiny else {}
        heads = heads or dict(num_attention_heads=14, num_key_value_heads=2)
        return Qwen2Config(**common, **size, **heads)
    raise ValueError(f"unknown model kind {kind!r}")


def build(kind: str, tiny: bool, device: torch.device, seed: int = 0) -> nn.Module:
    """The model in bf16 on ``device``, random weights from ``seed``, frozen, SDPA attention."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            model_config(kind, tiny), dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model.train()


def make_batch(
    vocab: int, rows: int, length: int, device: torch.device, answer_only: bool = False
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = ids.clone()
    if answer_only:
        labels[:, : length - length // ANSWER_SHARE] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fingerprint(model: nn.Module) -> list[float]:
    """Sums of a few base weights: both sides must start from the same model."""
    w = [p for n, p in model.named_parameters() if "lora" not in n.lower()]
    return [float(t.float().sum()) for t in (w[0], w[len(w) // 2], w[-1])]


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """transformers' activation checkpointing, non-reentrant (as leantune's
    ``enable_checkpointing``), on or off."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(  # type: ignore[operator]
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    else:
        off = getattr(model, "activation_checkpointing_disable", None)
        (off or model.gradient_checkpointing_disable)()  # type: ignore[operator]


# ---------------------------------------------------------------------------- the two sides


def leantune_side(model: nn.Module) -> nn.Module:
    import leantune as lt
    from leantune.adapters.accounting import cast_base

    lt.inject(model, lt.LoraConfig(r=R, alpha=ALPHA, dropout=0.0, targets="all-linear"))
    cast_base(model, "bf16")  # the base in bf16, the adapters (made bf16 on a bf16 layer) fp32
    return model


def peft_side(model: nn.Module) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def lora_factors(model: nn.Module, side: str) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """(A, B) of every adapted module by its name in the transformers model."""
    if side == "leantune":
        from leantune.adapters.inject import adapter_layers

        return {
            name: (layer.lora["default"].A, layer.lora["default"].B)  # type: ignore[index]
            for name, layer in adapter_layers(model)
        }
    inner = model.base_model.model
    return {
        name: (m.lora_A["default"].weight, m.lora_B["default"].weight)
        for name, m in inner.named_modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})
    }


def restart(factors: dict[str, tuple[nn.Parameter, nn.Parameter]], start: dict[str, Any]) -> None:
    """The same LoRA start on a side: A from ``start``, B zero."""
    with torch.no_grad():
        for name, (a, b) in factors.items():
            a.copy_(start[name])
            b.zero_()


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def leantune_train(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    n: int,
    on_step: Callable[[], None] | None = None,
) -> list[float]:
    """``n`` steps of leantune's loop on ``batch``; ``on_step`` after each; the step losses."""
    from leantune.train.answer import answer_forward_for
    from leantune.train.interface import TrainConfig, TrainHooks
    from leantune.train.loop import train

    config = TrainConfig(
        epochs=1,
        lr=LR,
        warmup_ratio=0.0,
        schedule="constant",
        max_grad_norm=1.0,
        max_steps=n,
        metric="perplexity",
        higher_is_better=False,
        precision="bf16",
    )
    forward = None
    if bool((batch["labels"] == -100).any()):  # the answer-only head, as --task instruct
        from leantune.models.precision import autocast

        with autocast("bf16", batch["input_ids"].device):
            forward = answer_forward_for(model, batch)
        if forward is None:
            raise RuntimeError("the answer-only head does not give the model's own loss")
    hooks = TrainHooks(on_step=(lambda p, limit: on_step()) if on_step else None, forward=forward)
    result = train(model, lambda epoch: [batch] * n, lambda m: {"perplexity": 1.0}, config, hooks)
    return [loss for _, loss in result.curve]


class PeftStep:
    """peft + transformers' step: own forward and loss under bf16 autocast, AdamW."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self.model, self.device = model, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0)

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


@contextmanager
def peak_memory(device: torch.device, out: dict[str, Any]) -> Iterator[None]:
    """``out["peak_mib"]``: CUDA's peak allocation over the block (None on a CPU)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    sync(device)
    out["peak_mib"] = (
        round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
    )


# ---------------------------------------------------------------------------- rows


def row_key(rows: int, length: int, ckpt: bool, answer: bool) -> str:
    return f"{rows}x{length}{' ckpt' if ckpt else ''}{' answer-only' if answer else ''}"


def row_plan(tiny: bool) -> list[tuple[int, int, bool, bool]]:
    """(rows, length, checkpointing, answer-only) of every row, in the order measured."""
    plan = [(b, n, ckpt, False) for ckpt in (False, True) for b, n in shapes(tiny)]
    first = shapes(tiny)[0]
    return [*plan, (first[0], first[1], False, True)]


def alternate_row(
    lt_model: nn.Module,
    peft: PeftStep,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    tiny: bool,
) -> dict[str, Any]:
    """Both sides from the same start, step by step: step times and losses."""
    warm, timed = steps(tiny)
    times: dict[str, list[float]] = {"leantune": [], "peft": []}
    peft_losses: list[float] = []
    mark = [0.0]

    def after_leantune_step() -> None:
        sync(device)
        times["leantune"].append(time.perf_counter() - mark[0])
        start = time.perf_counter()
        peft_losses.append(peft(batch))
        sync(device)
        times["peft"].append(time.perf_counter() - start)
        mark[0] = time.perf_counter()

    sync(device)
    mark[0] = time.perf_counter()
    lt_losses = leantune_train(lt_model, batch, warm + timed, after_leantune_step)
    tokens = int(batch["input_ids"].numel())
    out: dict[str, Any] = {"tokens": tokens, "warmup_steps": warm, "timed_steps": timed}
    for side, losses in (("leantune", lt_losses), ("peft", peft_losses)):
        median = statistics.median(times[side][warm:])
        out[side] = {
            "step_s": round(median, 5),
            "tokens_per_s": round(tokens / median, 1),
            "step_s_all": [round(t, 5) for t in times[side]],
            "losses": [round(x, 5) for x in losses],
        }
    diffs = [abs(a - b) / abs(b) for a, b in zip(lt_losses, peft_losses, strict=True)]
    out["loss_max_rel_diff"] = round(max(diffs), 6)
    out["loss_agrees"] = max(diffs) <= LOSS_RTOL
    out["time_ratio"] = round(out["leantune"]["step_s"] / out["peft"]["step_s"], 4)
    return out


def leantune_checkpointing(model: nn.Module, on: bool) -> None:
    from leantune.models.precision import enable_checkpointing

    if on:
        enable_checkpointing(model)  # leantune's own (--gradient-checkpointing)
    else:
        set_checkpointing(model, False)


def step_part(kind: str, device: torch.device, tiny: bool) -> dict[str, Any]:
    """Every row of one model: leantune alone (memory), both alternated (time, loss), peft
    alone (memory)."""
    plan = row_plan(tiny)
    vocab = model_config(kind, tiny).vocab_size
    rows: dict[str, dict[str, Any]] = {}
    lt_model = leantune_side(build(kind, tiny, device))
    for b, n, ckpt, answer in sorted(plan, key=lambda r: r[2]):
        leantune_checkpointing(lt_model, ckpt)
        mem: dict[str, Any] = {}
        with peak_memory(device, mem):
            leantune_train(lt_model, make_batch(vocab, b, n, device, answer), memory_steps(device))
        rows[row_key(b, n, ckpt, answer)] = {"leantune_peak_mib": mem["peak_mib"]}
    peft_model = peft_side(build(kind, tiny, device))
    inner = peft_model.base_model.model
    same_base = fingerprint(lt_model) == fingerprint(inner)
    lt_f, peft_f = lora_factors(lt_model, "leantune"), lora_factors(peft_model, "peft")
    counts = {
        "leantune": {"modules": len(lt_f), "trainable": trainable(lt_model)},
        "peft": {"modules": len(peft_f), "trainable": trainable(peft_model)},
    }
    if counts["leantune"] != counts["peft"] or set(lt_f) != set(peft_f) or not same_base:
        raise RuntimeError(f"the sides differ: {counts}, same base weights: {same_base}")
    start = {name: a.detach().clone() for name, (a, _) in peft_f.items()}
    for b, n, ckpt, answer in plan:
        leantune_checkpointing(lt_model, ckpt)
        set_checkpointing(inner, ckpt)
        restart(lt_f, start)
        restart(peft_f, start)
        batch = make_batch(vocab, b, n, device, answer)
        row = rows[row_key(b, n, ckpt, answer)]
        row |= {"rows": b, "length": n, "checkpointing": ckpt}
        row |= {"loss_on": "answer" if answer else "all"}
        row |= alternate_row(lt_model, PeftStep(peft_model, device), batch, device, tiny)
    del lt_model, lt_f
    for b, n, ckpt, answer in plan:
        set_checkpointing(inner, ckpt)
        restart(peft_f, start)
        batch = make_batch(vocab, b, n, device, answer)
        mem = {}
        with peak_memory(device, mem):
            step = PeftStep(peft_model, device)
            for _ in range(memory_steps(device)):
                step(batch)
            del step
        row = rows[row_key(b, n, ckpt, answer)]
        row["peft_peak_mib"] = mem["peak_mib"]
        if mem["peak_mib"] and row["leantune_peak_mib"]:
            row["memory_ratio"] = round(row["leantune_peak_mib"] / mem["peak_mib"], 4)
            row["target_met"] = (
                row["time_ratio"] <= TARGET and row["memory_ratio"] <= TARGET and row["loss_agrees"]
            )
    figures = {
        "model": kind,
        "config": {
            k: getattr(model_config(kind, tiny), k)
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
            )
        },
        "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0, "targets": "all-linear", "lr": LR},
        "counts": counts,
        "loss_rtol": LOSS_RTOL,
        "rows": list(rows.values()),
        "target": f"leantune ≤ {TARGET}× peft's step time and peak memory, losses within {LOSS_RTOL}",
    }
    apart = [k for k, r in rows.items() if not r["loss_agrees"]]
    if apart:
        raise Measured(f"the losses differ by more than {LOSS_RTOL} relative in {apart}", figures)
    return figures


class StepTimer:
    """Seconds between consecutive calls (synchronized): a loop's step times."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, list[float]()
        self.mark = time.perf_counter()

    def __call__(self) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.times.append(now - self.mark)
        self.mark = now


def quantized_mode(mode: str, device: torch.device, tiny: bool) -> dict[str, Any]:
    """The Llama with its base in ``mode`` (bf16, int8, nf4) under leantune's LoRA, alone."""
    from leantune.adapters.accounting import base_bytes
    from leantune.models.precision import quantize_base

    b, n = shapes(tiny)[0]
    warm, timed = steps(tiny)
    model = build("llama", tiny, device)
    quantized = len(quantize_base(model, mode)) if mode != "bf16" else 0
    leantune_side(model)
    batch = make_batch(model.config.vocab_size, b, n, device)
    mem: dict[str, Any] = {}
    with peak_memory(device, mem):  # after the build: the bf16 weights quantized are gone
        timer = StepTimer(device)
        losses = leantune_train(model, batch, warm + timed, timer)
    median = statistics.median(timer.times[warm:])
    return {
        "quantized_layers": quantized,
        "base_mib": round(base_bytes(model) / 2**20, 1),
        "peak_mib": mem["peak_mib"],
        "step_s": round(median, 5),
        "tokens_per_s": round(b * n / median, 1),
        "losses": [round(x, 5) for x in losses],
    }


def quantized_part(device: torch.device, tiny: bool) -> dict[str, Any]:
    """The int8 and nf4 base against bf16, each alone (one after the other)."""
    b, n = shapes(tiny)[0]
    out: dict[str, Any] = {"rows": b, "length": n, "modes": {}}
    for mode in ("bf16", "int8", "nf4"):
        out["modes"][mode] = quantized_mode(mode, device, tiny)
        gc.collect()
    bf16 = out["modes"]["bf16"]
    for mode in ("int8", "nf4"):
        row = out["modes"][mode]
        row["time_vs_bf16"] = round(row["step_s"] / bf16["step_s"], 4)
        if row["peak_mib"] and bf16["peak_mib"]:
            row["memory_vs_bf16"] = round(row["peak_mib"] / bf16["peak_mib"], 4)
        if not row["quantized_layers"]:
            raise RuntimeError(f"--quantize {mode} quantized no layer")
    return out
