"""The general measure's cost (issue 29) on the embedded instruct default: SmolLM2-135M-Instruct
answering ``--general-examples`` general prompts (``leantune.analysis.general``), beside the
default run's own test evaluation (loss on the test split and its generated answers), alternated
in one process so that both see the same machine; optionally a finished run's tuned side.

    python benchmarks/bench_general.py [--rounds 2] [--run runs/<instruct run>] [--json out.json]

The ratio ``general / test`` carries over to a run's phases: the test evaluation runs twice in
every instruct run (before and after), like the general measure.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from _common import save_json
from leantune.analysis.general import GeneralMeasure, score_general
from leantune.tune import TuneConfig, load_run
from leantune.tune.prepare import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--count", type=int, default=None, help="default: --general-examples'")
    parser.add_argument("--run", default=None, help="a finished instruct run: its tuned side too")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    config = TuneConfig(task="instruct").resolved()
    count = config.general_examples if args.count is None else args.count
    prep = prepare(config)
    rows: list[dict[str, Any]] = []
    measure = None
    for _ in range(args.rounds):
        start = time.perf_counter()
        prep.evaluate_test()
        test = time.perf_counter() - start
        measure = GeneralMeasure.of(count, config.precision)
        assert measure is not None
        measure.answer_before(prep.model, prep.tok)
        rows.append({"test_seconds": round(test, 1), "general_seconds": round(measure.seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    assert measure is not None
    result: dict[str, Any] = {"count": count, "precision": config.precision, "rounds": rows}
    result["general_before"] = round(score_general(measure.items, measure.before).mean, 4)
    if args.run:
        saved = load_run(args.run)
        spent = measure.seconds
        measure.answer_after(saved.model, saved.tok)
        result |= measure.summary() | {"after_seconds": round(measure.seconds - spent, 1)}
    print(json.dumps(result, indent=1))
    if args.json:
        save_json(args.json, result)


if __name__ == "__main__":
    main()
