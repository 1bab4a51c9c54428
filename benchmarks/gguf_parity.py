"""A finished instruct run exported to GGUF and run through llama.cpp (llama-cpp-python), beside
leantune's own answers: greedy answers side by side, token ids of the rendered prompts, the
next-token logits' largest difference (as a fraction of their spread), file sizes, times.

    HF_HUB_OFFLINE=1 python benchmarks/gguf_parity.py runs/export-demo --quant q8_0 f16 \
        --json benchmarks/gguf_parity.json

``smollm2-base`` in place of the run compares the embedded SmolLM2 untuned (no run folder).

Needs llama-cpp-python (`make gguf-check`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

PROMPTS = [
    "Write a headline for this article: Shares in the chip maker rose 8% after it reported "
    "record quarterly profits and raised its forecast for the year.",
    "Which topic is this article about (business, entertainment, politics, sport or tech)? "
    "The striker scored twice as the home side won the cup final 3-1.",
    "What is the capital of France?",
    "Give me two tips for sleeping better.",
    "What is 12 + 30?",
]


def llama_answer(llm: Any, ids: list[int], max_tokens: int) -> tuple[str, str, list[int]]:
    out = llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0, top_k=1)
    choice = out["choices"][0]
    return choice["text"].strip(), choice["finish_reason"], []


def spread_error(model: Any, llm: Any, ids: list[int]) -> float:
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0, -1].double().numpy()
    llm.reset()
    llm.eval(ids)
    got = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
    return float(np.abs(got - want).max() / (want.max() - want.min()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--quant", nargs="+", default=["q8_0"])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=None, help="keep the exports here")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import llama_cpp

    from leantune.adapters.inject import unload
    from leantune.analysis.generate import Sampling
    from leantune.export import export_run
    from leantune.tune import generate_run, load_run

    root = args.out or Path(tempfile.mkdtemp(prefix="gguf-parity."))
    start = time.perf_counter()
    if args.run.name == "smollm2-base":  # the embedded model untuned, without a run folder
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from leantune.analysis.generate import generate
        from leantune.core.smollm2 import smollm2_dir

        tok = AutoTokenizer.from_pretrained(smollm2_dir())
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
        convs = [[{"role": "user", "content": p}] for p in PROMPTS]
        sampling = Sampling(max_new_tokens=args.max_new_tokens)
        ours = [{"answer": a} for a in generate(model, tok, convs, sampling)]
    else:
        ours = generate_run(args.run, PROMPTS, None, Sampling(max_new_tokens=args.max_new_tokens))
        saved = load_run(args.run)
        model = unload(saved.model, merge_active=True).float().eval()
        tok = saved.tok
    leantune_s = time.perf_counter() - start
    result: dict[str, Any] = {
        "run": str(args.run),
        "leantune_s": round(leantune_s, 1),
        "quants": {},
    }
    for quant in args.quant:
        start = time.perf_counter()
        if args.run.name == "smollm2-base":
            from leantune.export.gguf_file import write_gguf

            path = root / f"smollm2-base-{quant}.gguf"
            root.mkdir(parents=True, exist_ok=True)
            write_gguf(path, model, tok, "smollm2-base", quant, "smollm")
        else:
            folder, _ = export_run(args.run, "gguf", root / quant, quant=quant, overwrite=True)
            path = next(folder.glob("*.gguf"))
        export_s = time.perf_counter() - start
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=2048, logits_all=True, verbose=False, n_threads=2, seed=0
        )
        rows = []
        start = time.perf_counter()
        for prompt, mine in zip(PROMPTS, ours, strict=True):
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tok(text)["input_ids"]
            same_ids = list(llm.tokenize(text.encode(), add_bos=True, special=True)) == ids
            answer, finish, _ = llama_answer(llm, ids, args.max_new_tokens)
            rows.append(
                {
                    "prompt": prompt,
                    "leantune": mine["answer"],
                    "llama_cpp": answer,
                    "finish_reason": finish,
                    "same_answer": answer == mine["answer"],
                    "same_token_ids": same_ids,
                    "logit_error": round(spread_error(model, llm, ids), 5),
                }
            )
        result["quants"][quant] = {
            "file": path.name,
            "bytes": path.stat().st_size,
            "export_s": round(export_s, 1),
            "llama_cpp_s": round(time.perf_counter() - start, 1),
            "rows": rows,
        }
        for row in rows:
            print(json.dumps({"quant": quant} | row, ensure_ascii=False))
        print(f"{quant}: {path} {path.stat().st_size / 1e6:.1f} MB, export {export_s:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
