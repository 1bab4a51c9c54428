"""One LoRA training step on MiniLM (batch 16, length 128): leantune vs peft, side by side.

Time: both models live in one process and steps alternate (leantune, peft, leantune, ...), so
machine noise hits both alike; the median ratio is reported. Memory: bytes autograd saves for
backward in one step (exact, deterministic), and peak RSS of child processes that each run one
library only, alternated. Usage: python benchmarks/bench_step.py [--rounds N] [--json out.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

import leantune as lt
from _common import alternate, paired_ratios, python_command, run_timed, save_json
from leantune.core.defaults import minilm_dir
from leantune.core.memory import peak_memory_mb

BATCH, LENGTH, R, ALPHA, DROPOUT = 16, 128, 8, 16, 0.1
RECIPES = {"query,value": ["query", "value"], "all-linear": "all-linear"}


def build(lib: str, targets: list[str] | str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=5)
    if lib == "leantune":
        lt.inject(model, lt.LoraConfig(r=R, alpha=ALPHA, dropout=DROPOUT, targets=targets))
    else:
        model = get_peft_model(
            model,
            PeftLoraConfig(
                r=R,
                lora_alpha=ALPHA,
                lora_dropout=DROPOUT,
                target_modules=targets,
                task_type="SEQ_CLS",
            ),
        )
    return model.train()


def make_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1000, 30000, (BATCH, LENGTH), generator=g),
        "attention_mask": torch.ones(BATCH, LENGTH, dtype=torch.long),
        "labels": torch.randint(0, 5, (BATCH,), generator=g),
    }


def step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]
) -> None:
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def saved_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one forward pass."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def child(lib: str, recipe: str, steps: int) -> None:
    """Run one library alone and print its peak RSS in MB."""
    model = build(lib, RECIPES[recipe])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = make_batch()
    for _ in range(steps):
        step(model, opt, batch)
    print(peak_memory_mb())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json")
    ap.add_argument("--child", nargs=3, metavar=("LIB", "RECIPE", "STEPS"))
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    results = {}
    batch = make_batch()
    for recipe, targets in RECIPES.items():
        models = {lib: build(lib, targets) for lib in ("leantune", "peft")}
        opts = {
            lib: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for lib, m in models.items()
        }
        trainable = {
            lib: sum(p.numel() for p in m.parameters() if p.requires_grad)
            for lib, m in models.items()
        }
        for lib in models:  # warm up
            step(models[lib], opts[lib], batch)
        times: dict[str, list[float]] = {"leantune": [], "peft": []}
        for _, lib in alternate(("leantune", "peft"), args.rounds):
            t0 = time.perf_counter()
            step(models[lib], opts[lib], batch)
            times[lib].append(time.perf_counter() - t0)
        saved = {lib: saved_bytes(m, batch) for lib, m in models.items()}
        del models, opts
        rss: dict[str, list[float]] = {"leantune": [], "peft": []}
        for _, lib in alternate(("leantune", "peft"), 2):  # leantune, peft, peft, leantune
            out, _ = run_timed(python_command(__file__, "--child", lib, recipe, "2"), check=True)
            rss[lib].append(float(out.stdout.strip().splitlines()[-1]))
        med = {lib: statistics.median(t) for lib, t in times.items()}
        ratios = paired_ratios(times["leantune"], times["peft"])
        results[recipe] = {
            "trainable": trainable,
            "step_s_median": med,
            "time_ratio_median": statistics.median(ratios),
            "saved_for_backward_mb": {k: v / 2**20 for k, v in saved.items()},
            "saved_ratio": saved["leantune"] / saved["peft"],
            "peak_rss_mb": {k: statistics.median(v) for k, v in rss.items()},
            "rss_ratio": statistics.median(rss["leantune"]) / statistics.median(rss["peft"]),
        }
        r = results[recipe]
        print(
            f"{recipe:12s} step s leantune {med['leantune']:.3f} peft {med['peft']:.3f} "
            f"ratio {r['time_ratio_median']:.3f} | saved-for-backward MB "
            f"{r['saved_for_backward_mb']['leantune']:.1f} vs {r['saved_for_backward_mb']['peft']:.1f} "
            f"ratio {r['saved_ratio']:.3f} | peak RSS MB {r['peak_rss_mb']['leantune']:.0f} vs "
            f"{r['peak_rss_mb']['peft']:.0f} ratio {r['rss_ratio']:.3f} | trainable {trainable}"
        )
    meta = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "rounds": args.rounds,
    }
    if args.json:
        # No newline at the end, as the committed bench_step.json.
        save_json(args.json, {"meta": meta, "results": results}, end="")


if __name__ == "__main__":
    main()
