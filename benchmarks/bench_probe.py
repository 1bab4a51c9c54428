"""Issue 17's table: the probe against tuning, with native pooling, a warm head and the keep
loss, on BBC articles and BBC headlines (MiniLM-L6, the embedded defaults otherwise).

    python benchmarks/bench_probe.py --json benchmarks/bench_probe.json [--seeds 0 1 2]
    python benchmarks/bench_probe.py --json ... --train-examples 100 --seeds 0 1 2 3 4

Each (data, recipe, seed) is one ``leantune tune`` run in its own process; finished runs are
read back from the JSON, so an interrupted benchmark goes on where it stopped. Reported per
run: test accuracy, knowledge kept (embedding cosine, 10-NN overlap, paraphrase retrieval top-1
on fortunes), trainable %,
training seconds, the whole run's seconds (probe fit, reference cache and evaluations included),
peak memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from _common import leantune_command, load_json, offline_env, read_summary, run_timed, save_json

OLD = ["--pooling", "pooler", "--no-warm-head", "--keep", "0"]
"""The defaults before issue 17 changed them: BERT's pooler, a random head, no keep loss."""
AUTO = ["--pooling", "auto"]
RECIPES: dict[str, list[str]] = {
    "probe": ["--method", "probe", *AUTO],
    "lora (default)": OLD,
    "+ native pooling": [*AUTO, "--no-warm-head", "--keep", "0"],
    "+ warm head": [*AUTO, "--warm-head", "--keep", "0"],
    "+ keep 1": [*AUTO, "--warm-head", "--keep", "1", "--keep-every", "1"],
    "+ keep 10": [*AUTO, "--warm-head", "--keep", "10", "--keep-every", "1"],
    "new default": [],
    "new default, r 4": ["--r", "4"],
    "new default, 4 epochs": ["--epochs", "4"],
    "new default, lr 4e-3": ["--lr", "4e-3"],
    "new default, no L2": ["--l2", "0"],
    "new default, all layers r 4": ["--layers", "all", "--r", "4"],
    "+ warm head, pooler": ["--pooling", "pooler", "--warm-head", "--keep", "0"],
    "+ keep 1, pooler": ["--pooling", "pooler", "--warm-head", "--keep", "1", "--keep-every", "1"],
    "+ keep 1 every 4": [*AUTO, "--warm-head", "--keep", "1", "--keep-every", "4"],
    "+ keep 1, 100 steps": [
        *AUTO,
        "--warm-head",
        "--keep",
        "1",
        "--keep-every",
        "1",
        "--min-steps",
        "100",
    ],
    "full": ["--method", "full", *OLD],
    "full + keep 1": ["--method", "full", *AUTO, "--warm-head", "--keep", "1", "--keep-every", "1"],
}
"""Every recipe names its flags, so a row means the same whatever the defaults are today.
"lora (default)" is the default before issue 17; "new default" is today's (on articles it equals
"+ keep 1": --keep-every 0 picks 1 there)."""
KEYS = (
    "test_accuracy",
    "knowledge_cosine",
    "knowledge_knn_overlap",
    "paraphrase_top1",
    "paraphrase_top1_before",
    "trainable_percent",
    "train_seconds",
    "peak_memory_mb",
)


def run(data: str, recipe: str, seed: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    cmd = leantune_command(
        "tune", "--data", data, "--seed", str(seed), "--name", "r",
        "--runs-dir", str(tmp), "--overwrite", "--quiet", *RECIPES[recipe],
    )  # fmt: skip
    if args.train_examples:
        cmd += ["--train-examples", str(args.train_examples)]
    done, seconds = run_timed(cmd, offline_env())
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    summary = read_summary(tmp / "r")
    return {k: summary.get(k) for k in KEYS} | {"wall_seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--data", nargs="+", default=["bbc", "bbc-headlines"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--train-examples", type=int)
    parser.add_argument("--table", action="store_true", help="print the table of --json; run none")
    args = parser.parse_args()
    results: dict[str, Any] = load_json(args.json, {})
    if args.table:
        print(markdown(results, args))
        return
    with tempfile.TemporaryDirectory(prefix="bench-probe-") as tmp:
        for seed in args.seeds:
            for data in args.data:
                for recipe in args.recipes:
                    key = f"{data}|{recipe}|{seed}|{args.train_examples or 'all'}"
                    if key in results:
                        continue
                    results[key] = run(data, recipe, seed, args, Path(tmp))
                    print(key, json.dumps(results[key]), flush=True)
                    save_json(args.json, results)
    summarize(results, args)


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Two-sided 95 % Student t quantiles by degrees of freedom (paired differences over seeds)."""


def runs_of(results: dict[str, Any], data: str, recipe: str, size: str) -> dict[str, Any]:
    """The runs of one data, recipe and training size in ``results``, by seed (as the key
    writes it); failed runs left out."""
    return {
        k.split("|")[2]: v
        for k, v in results.items()
        if k.split("|")[:2] == [data, recipe] and k.split("|")[3] == size and "error" not in v
    }


def paired_interval(diff: list[float]) -> tuple[float, float]:
    """The mean of paired differences and the half width of its 95 % confidence interval."""
    half = T975.get(len(diff) - 1, 1.96) * statistics.stdev(diff) / len(diff) ** 0.5
    return statistics.mean(diff), half


def summarize(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Mean ± sd of test accuracy per recipe, and each recipe's paired difference from the
    probe over the same seeds with a 95 % confidence interval."""
    size = str(args.train_examples or "all")
    for data in args.data:
        acc = {
            recipe: {
                int(seed): v["test_accuracy"]
                for seed, v in runs_of(results, data, recipe, size).items()
                if v.get("test_accuracy") is not None
            }
            for recipe in args.recipes
        }
        for recipe, by_seed in acc.items():
            if not by_seed:
                continue
            values = list(by_seed.values())
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            line = f"{data:14} {size:>4} {recipe:18} {statistics.mean(values):.4f} ± {spread:.4f}"
            seeds = sorted(set(by_seed) & set(acc.get("probe", {})))
            if recipe != "probe" and len(seeds) > 1:
                mean, half = paired_interval([by_seed[s] - acc["probe"][s] for s in seeds])
                line += f"  vs probe {mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]"
            print(line + f" (n={len(values)})")


COLUMNS = (
    ("test_accuracy", "test acc", ".4f"),
    ("knowledge_cosine", "cosine", ".3f"),
    ("knowledge_knn_overlap", "10-NN", ".3f"),
    ("paraphrase_top1", "paraphrase top-1", ".3f"),
    ("train_seconds", "train s", ".0f"),
    ("wall_seconds", "run s", ".0f"),
    ("peak_memory_mb", "peak MB", ",.0f"),
)


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    """Per data and size, one row per recipe: the mean (± sd over seeds, n seeds) of each
    column; the paraphrase column counts only the runs that measured it."""
    size = str(args.train_examples or "all")
    head = "| recipe | seeds | " + " | ".join(c[1] for c in COLUMNS) + " | vs probe (points) |"
    out = []
    for data in args.data:
        out += [f"\n{data}, {size} training examples\n", head, "|---" * (len(COLUMNS) + 3) + "|"]
        probe = {s: v["test_accuracy"] for s, v in runs_of(results, data, "probe", size).items()}
        for recipe in args.recipes:
            by_seed = runs_of(results, data, recipe, size)
            runs = list(by_seed.values())
            if not runs:
                continue
            cells = []
            for key, _, fmt in COLUMNS:
                values = [r[key] for r in runs if r.get(key) is not None]
                if not values:
                    cells.append("-")
                    continue
                cell = format(statistics.mean(values), fmt)
                if len(values) > 1 and key == "test_accuracy":
                    cell += f" ± {statistics.stdev(values):.4f}"
                cells.append(cell + (f" (n={len(values)})" if len(values) != len(runs) else ""))
            diff = [100 * (v["test_accuracy"] - probe[s]) for s, v in by_seed.items() if s in probe]
            paired = "-"
            if recipe != "probe" and len(diff) > 1:
                mean, half = paired_interval(diff)
                paired = f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}]"
            elif recipe != "probe" and diff:
                paired = f"{diff[0]:+.1f}"
            out.append(f"| {recipe} | {len(runs)} | " + " | ".join(cells) + f" | {paired} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
