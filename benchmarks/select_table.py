"""The budget × recipe table of docs/BENCHMARKS.md from bench_select.py's JSON files.

Usage: python benchmarks/select_table.py benchmarks/bench_select_grid.json
       benchmarks/bench_select_upper.json benchmarks/bench_select_seeds.json [--skip-all-layers-auto]
Files are JSON lists of rows (bench_select.py --json) or logs with one JSON row per line; a row
for the same (budget, recipe, seed) in a later file replaces an earlier one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _common import mean_sd

ORDER = {"auto": 0, "auto-mixed": 1, "sparse": 2, "query,value": 3, "all-linear": 4, "full": 5}


def read_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    if text.lstrip().startswith("["):
        return list(json.loads(text))
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def cell(values: list[float], digits: int) -> str:
    return mean_sd(values, f".{digits}f", f".{digits}f")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    for path in args.files:
        for r in read_rows(path):
            rows[(r["budget"], r["recipe"], r["seed"])] = r
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for (budget, recipe, _), r in rows.items():
        groups.setdefault((budget, recipe), []).append(r)
    print("| budget | recipe | trainable | seeds | test acc | train s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    key = lambda k: (float(k[0].rstrip("%")), ORDER.get(k[1], 9))  # noqa: E731
    for budget, recipe in sorted(groups, key=key):
        rs = sorted(groups[(budget, recipe)], key=lambda r: r["seed"])
        counts = sorted({r["trainable_params"] for r in rs})
        trainable = f"{counts[0]:,}" + (f"–{counts[-1]:,}" if len(counts) > 1 else "")
        print(
            f"| {budget} | {recipe} | {trainable} | {','.join(str(r['seed']) for r in rs)} | "
            f"{cell([r['test_accuracy'] for r in rs], 4)} | "
            f"{cell([r['train_seconds'] for r in rs], 0)} | "
            f"{cell([r['peak_rss_mb'] for r in rs], 0)} |"
        )
    print()
    for (budget, recipe), rs in sorted(groups.items(), key=lambda kv: key(kv[0])):
        if recipe.startswith("auto"):
            shares = [r["select_share_of_wall"] for r in rs if "select_share_of_wall" in r]
            if shares:
                print(
                    f"- {budget} {recipe}: selection {min(shares):.1%}–{max(shares):.1%} of wall time"
                )


if __name__ == "__main__":
    main()
