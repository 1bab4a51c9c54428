"""Time to accuracy: training seconds until validation accuracy ≥ 0.95 on BBC News.

leantune tune with its LoRA defaults against the transformers + peft LoRA recipe of
benchmarks/peft_recipe.py (r=8 query,value, dropout 0.1, lr 5e-4, padding to 128, batch 16,
3 epochs). Same split (stratified 70/10/20, seed 0), same validation cadence (every 10
optimizer steps and each epoch; evaluation time excluded from both clocks), run one after the
other in child processes of this script so each has its own peak RSS.

Usage: python benchmarks/bench_time_to_acc.py [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import read_metrics, run_in_child, save_json, seconds_to
from leantune.core.memory import peak_memory_mb

TARGET = 0.95
EVAL_EVERY = 10


def run_leantune() -> dict[str, Any]:
    """leantune tune's defaults (run in a child process): curve, test accuracy, peak RSS."""
    from leantune.tune import TuneConfig, run_tune

    with tempfile.TemporaryDirectory() as tmp:
        # l2 0: as peft's recipe (and as the documented figures were made, before L2's default).
        config = TuneConfig(runs_dir=tmp, name="bench", eval_every=EVAL_EVERY, l2=0.0)
        summary = run_tune(config)
        rows = read_metrics(Path(tmp) / "bench")
    curve = [
        {"step": r["step"], "train_seconds": r["train_seconds"], "val_accuracy": r["val_accuracy"]}
        for r in rows
    ]
    return {
        "recipe": "leantune tune (defaults: LoRA r=8 all-linear, layers 3-5, lr 2e-3, 2 epochs)",
        "curve": curve,
        "test_accuracy": summary["test_accuracy"],
        "train_seconds": summary["train_seconds"],
        "steps": summary["steps"],
        "trainable_params": summary["trainable_params"],
        "peak_rss_mb": peak_memory_mb(),
    }


def run_peft() -> dict[str, Any]:
    """The peft recipe (run in a child process): curve, test accuracy, peak RSS."""
    sys.path.insert(0, str(Path(__file__).parent))
    from leantune.core.defaults import bbc_news, minilm_dir
    from leantune.models.data import stratified_split
    from peft_recipe import run_peft_recipe

    data = bbc_news()
    parts = stratified_split(data.labels, (0.7, 0.1, 0.2), seed=0)

    def pick(rows: list[int]) -> tuple[list[str], list[int]]:
        return [data.texts[i] for i in rows], [data.labels[i] for i in rows]

    result = run_peft_recipe(
        minilm_dir(),
        pick(parts[0]),
        pick(parts[1]),
        pick(parts[2]),
        len(data.label_names),
        epochs=3,
        eval_every=EVAL_EVERY,
        target=TARGET,
        log=None,
    )
    return {
        "recipe": "transformers + peft (LoRA r=8 query,value, dropout 0.1, lr 5e-4, pad 128, 3 epochs)",
        "curve": [
            {k: r[k] for k in ("step", "train_seconds", "val_accuracy")} for r in result.curve
        ],
        "test_accuracy": result.test_accuracy_best,
        "test_accuracy_final": result.test_accuracy_final,
        "train_seconds": result.train_seconds,
        "steps": result.steps,
        "peak_rss_mb": peak_memory_mb(),
    }


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, res in results.items():
        xs = [r["train_seconds"] for r in res["curve"]]
        ax.plot(xs, [r["val_accuracy"] for r in res["curve"]], marker=".", label=name)
    ax.axhline(TARGET, color="grey", linestyle=":", label=f"target {TARGET}")
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    results = {"leantune": run_in_child(run_leantune), "peft": run_in_child(run_peft)}
    for name, res in results.items():
        res["seconds_to_target"] = seconds_to(res["curve"], TARGET)
        print(
            f"{name:9s} to val acc ≥ {TARGET}: {res['seconds_to_target']} s; "
            f"test acc {res['test_accuracy']:.4f}; {res['train_seconds']:.0f} s training; "
            f"peak RSS {res['peak_rss_mb']:.0f} MB"
        )
    ours, theirs = results["leantune"]["seconds_to_target"], results["peft"]["seconds_to_target"]
    ratio = ours / theirs if ours and theirs else None
    print(f"time-to-accuracy ratio leantune / peft: {ratio if ratio is None else round(ratio, 3)}")
    record = {
        "machine": f"{platform.processor() or platform.machine()}, {mp.cpu_count()} cores",
        "target": TARGET,
        "eval_every": EVAL_EVERY,
        "ratio": ratio,
        "results": results,
    }
    if args.json:
        save_json(args.json, record)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
