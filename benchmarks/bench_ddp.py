"""1 process against 2 (torchrun, gloo, one thread each) on the default task, and the
communication arithmetic of docs/SCALING.md.

    python benchmarks/bench_ddp.py --json benchmarks/bench_ddp.json     # ~15 min on 2 cores
    python benchmarks/bench_ddp.py --paper                             # the arithmetic only

Both runs train LoRA on MiniLM-L6 + BBC News with the same global batch (1 × 16 rows, or
2 × 8), so they take the same steps: the comparison is time per step, samples per second and
seconds to the same validation accuracy (evaluated every --eval-every steps). The runs
alternate (1, 2, 1, 2 ... for --rounds) and the ratios are per round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    BIN,
    leantune_command,
    offline_env,
    read_metrics,
    read_summary,
    run_timed,
    save_json,
    seconds_to,
)

FLOPS = 400e12
"""Sustained bf16 FLOP/s of one H100-class GPU (about 40% of its peak) for the compute column:
a frozen base costs ~4 FLOPs per parameter and token (forward, and backward to the inputs)."""


def run(procs: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One tune run with ``procs`` processes (1: no launcher); its summary and validation rows."""
    name = f"p{procs}"
    batch = args.batch // procs
    tune = [
        "tune",
        "--name", name,
        "--runs-dir", str(out),
        "--batch-size", str(batch),
        "--epochs", str(args.epochs),
        "--eval-every", str(args.eval_every),
        "--reference-examples", "0",
        "--overwrite",
        "--quiet",
    ]  # fmt: skip
    if procs == 1:
        cmd = leantune_command(*tune)
    else:
        launcher = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={procs}"]
        cmd = [*launcher, "-m", "leantune.cli", *tune]
    run_timed(cmd, offline_env(OMP_NUM_THREADS="1"), check=True)
    return {"summary": read_summary(out / name), "rows": read_metrics(out / name)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        for i in range(args.rounds):
            one = run(1, Path(tmp), args)
            two = run(2, Path(tmp), args)
            target = min(max(r["val_accuracy"] for r in x["rows"]) for x in (one, two))
            row = {"round": i, "target_val_accuracy": target}
            for label, x in (("1", one), ("2", two)):
                s = x["summary"]
                row[label] = {
                    "train_seconds": s["train_seconds"],
                    "examples_per_s": s["examples_per_s"],
                    "steps": s["steps"],
                    "test_accuracy": s["test_accuracy"],
                    "seconds_to_target": seconds_to(x["rows"], target),
                }
            row["speedup_examples_per_s"] = row["2"]["examples_per_s"] / row["1"]["examples_per_s"]
            print(json.dumps(row), flush=True)
            rounds.append(row)
    return {
        "machine": f"{os.cpu_count()} CPU cores, one thread per process, gloo",
        "global_batch": args.batch,
        "epochs": args.epochs,
        "rounds": rounds,
        "median_speedup": statistics.median(r["speedup_examples_per_s"] for r in rounds),
    }


# ---------------------------------------------------------------------------- on paper


def lora_params(config: Any, r: int, targets: tuple[str, ...]) -> int:
    """LoRA parameters of rank ``r`` on the named projections of a Llama- or BERT-shaped
    config: r × (in + out) per projection and layer."""
    h = config.hidden_size
    inter = config.intermediate_size
    kv = h * getattr(config, "num_key_value_heads", config.num_attention_heads)
    kv //= config.num_attention_heads
    shapes = {
        "q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h),
        "gate": (h, inter), "up": (h, inter), "down": (inter, h),
    }  # fmt: skip
    per_layer = sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)
    return per_layer * config.num_hidden_layers


def paper() -> list[dict[str, Any]]:
    """Bytes each optimizer step moves, and the seconds at typical NCCL bus bandwidths."""
    from transformers import BertConfig, LlamaConfig

    minilm = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536)  # fmt: skip
    llama7b = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                          intermediate_size=11008, vocab_size=32000)  # fmt: skip
    base_7b = 6.74e9
    cases = [
        ("MiniLM-L6, LoRA r=8 q,v (default) + head", lora_params(minilm, 8, ("q", "v")) + 1925,
         22.7e6),
        ("7B, LoRA r=16 q,k,v,o", lora_params(llama7b, 16, ("q", "k", "v", "o")), base_7b),
        ("7B, LoRA r=16 all linear", lora_params(llama7b, 16, ("q", "k", "v", "o", "gate", "up",
                                                               "down")), base_7b),
    ]  # fmt: skip
    links = {
        "8 GPUs, NVLink (~300 GB/s bus)": (8, 300e9),
        "4 nodes x 8 GPUs, ~25 GB/s/GPU": (32, 25e9),
    }
    rows = []
    for label, params, base in cases:
        tokens = 16 * 128 if base < 1e9 else 8 * 2048  # rows × length per GPU and step
        grad_bytes = params * 4  # fp32 gradients of the trainable set
        for where, (n, bw) in links.items():
            ring = 2 * (n - 1) / n  # ring all-reduce: each byte sent and received ~twice
            gather = (n - 1) / n * base * 2 * 2  # FSDP: bf16 base gathered in forward+backward
            rows.append(
                {
                    "case": label,
                    "where": where,
                    "trainable_params": params,
                    "grad_MB_per_step": round(grad_bytes / 1e6, 2),
                    "allreduce_ms": round(ring * grad_bytes / bw * 1e3, 3),
                    "fsdp_gather_ms": round(gather / bw * 1e3, 1),
                    "compute_ms": round(4 * base * tokens / FLOPS * 1e3, 1),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="global batch (rows per step)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--paper", action="store_true", help="only the arithmetic")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result: dict[str, Any] = {"paper": paper()}
    for row in result["paper"]:
        print(json.dumps(row))
    if not args.paper:
        result |= measure(args)
    if args.json:
        save_json(args.json, result)


if __name__ == "__main__":
    main()
