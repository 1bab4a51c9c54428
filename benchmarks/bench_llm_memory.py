"""SmolLM2-135M-Instruct with LoRA on every linear layer: the frozen base's bytes in fp32, bf16,
int8 and nf4 (``leantune.models.accounting.base_bytes``), and the training step time of an instruct
batch with the output head on every position vs at the answer tokens only (``train/answer.py``),
alternated in one process.

    python benchmarks/bench_llm_memory.py [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import leantune as lt
from _common import alternate, save_json
from leantune.adapters import accounting
from leantune.core.smollm2 import smollm2_dir
from leantune.models import precision
from leantune.train.answer import answer_forward
from leantune.tune import TuneConfig
from leantune.tune.prepare import prepare


def base_bytes(folder: Path) -> dict[str, dict[str, int]]:
    out = {}
    for mode in ("fp32", "bf16", "int8", "nf4"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        for p in model.parameters():
            p.requires_grad_(False)
        quantized = len(precision.quantize_base(model, mode)) if mode in ("int8", "nf4") else 0
        lt.inject(model, lt.LoraConfig(r=8, alpha=16, targets="all-linear"))
        if mode == "bf16":
            accounting.cast_base(model, "bf16")
        out[mode] = {"base_bytes": accounting.base_bytes(model), "quantized_layers": quantized}
    return out


def step_times(rounds: int) -> dict[str, list[float]]:
    """fp32, the default instruct LoRA, 4 batches of 16 per side per round, alternating."""
    cfg = TuneConfig(task="instruct", precision="fp32", train_examples=64, eval_examples=8)
    prep = prepare(cfg)
    model = prep.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = prep.batches(0)[:4]
    times: dict[str, list[float]] = {"full head": [], "answer head": []}
    for _, side in alternate(tuple(times), rounds, mirror=False):
        for b in batches:
            start = time.perf_counter()
            out = answer_forward(model, b) if side == "answer head" else model(**b)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            times[side].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = {"base_bytes": base_bytes(smollm2_dir()), "step_seconds": step_times(args.rounds)}
    for mode, row in result["base_bytes"].items():
        print(
            f"{mode:5s} base {row['base_bytes'] / 1e6:7.1f} MB  quantized layers {row['quantized_layers']}"
        )
    med = {k: statistics.median(v) for k, v in result["step_seconds"].items()}
    for side, m in med.items():
        print(f"{side:11s} median step {m:.2f} s")
    print(f"answer head / full head: {med['answer head'] / med['full head']:.2f}x")
    if args.json:
        save_json(args.json, result | {"median": med})


if __name__ == "__main__":
    main()
