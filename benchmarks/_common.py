"""What the benchmark scripts share: child processes, alternating recipes, JSON result files.

Child processes (each measured run gets a fresh interpreter, so its peak RSS and torch state are
its own):

- ``run_in_child``: a function of a script in a spawned interpreter, its return value back.
- ``tune_in_child``: ``run_tune`` so (the runs of bench_select, bench_adapt, bench_gradual).
- ``run_timed``: a command to its end, its wall seconds; ``python_command``,
  ``leantune_command`` and ``offline_env`` build the command and its environment;
  ``read_summary`` and ``read_metrics`` read the run folder a ``leantune tune`` left.

Alternation: ``alternate`` (A B, B A, A B ... so drift on a shared machine hits both sides alike)
and ``paired_ratios`` (A / B per round).

JSON results, also resume files (a run already in the file is not redone): ``load_json``,
``save_json`` (atomic), ``has_row``, ``add_row``. Tables: ``mean_sd``, ``seconds_to``.

Scripts import it as ``_common`` (their own folder is first on ``sys.path`` when run as
``python benchmarks/X.py``).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue as queue_module
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

BIN = Path(sys.executable).parent
"""The running interpreter's bin folder (the venv's): ``leantune``, ``torchrun``."""

# ---------------------------------------------------------------------------- child processes


def _call_and_send(fn: Callable[..., Any], args: tuple[Any, ...], queue: Any) -> None:
    queue.put(fn(*args))


def run_in_child(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a fresh interpreter (multiprocessing's spawn); its result comes back
    through a queue, so it must pickle. ``fn`` must be a module-level function (a script's own
    functions are fine: the child imports the script as ``__mp_main__``)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_call_and_send, args=(fn, args, queue))
    proc.start()
    while True:  # a child that dies (an import error, a crash) must not leave us waiting
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(
                    f"{fn.__name__} died in its child (exit {proc.exitcode})"
                ) from None
    proc.join()
    return result


def _tune(options: dict[str, Any], keep: tuple[str, ...], threads: int) -> dict[str, Any]:
    import torch

    from leantune.core.memory import peak_memory_mb
    from leantune.tune import TuneConfig, run_tune

    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        # The figures in docs/BENCHMARKS.md were made before L2 1e-3 became LoRA's default:
        # off unless a recipe sets it, so they reproduce.
        config = TuneConfig(runs_dir=tmp, name="b", **({"l2": 0.0} | options))
        summary = run_tune(config)
    return {k: summary[k] for k in keep if k in summary} | {"peak_rss_mb": peak_memory_mb()}


def tune_in_child(
    options: dict[str, Any], keep: tuple[str, ...], threads: int = 0
) -> dict[str, Any]:
    """``run_tune(TuneConfig(**options))`` (L2 0 unless ``options`` set it; run folder in a
    temporary directory) in a fresh child process: its summary's ``keep`` keys, and
    ``peak_rss_mb``, the child's peak RSS (VmHWM). ``threads`` > 0 sets the child's torch
    threads (for runs side by side)."""
    return run_in_child(_tune, options, keep, threads)


def python_command(*args: str | Path) -> list[str]:
    """This interpreter with ``args``: a script of this folder, or ``-m module``."""
    return [sys.executable, *map(str, args)]


def leantune_command(*args: str) -> list[str]:
    """The ``leantune`` command of this interpreter's environment with ``args``."""
    return [str(BIN / "leantune"), *args]


def offline_env(**extra: str) -> dict[str, str]:
    """This process's environment with ``HF_HUB_OFFLINE=1`` and ``extra`` set, for children that
    must use only the embedded models and data."""
    return dict(os.environ) | {"HF_HUB_OFFLINE": "1"} | extra


def run_timed(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    log: Path | None = None,
    check: bool = False,
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``cmd`` to its end and return it with its wall seconds. Its output is captured as text
    (``stdout`` and ``stderr`` apart) or, with ``log``, written to that file (both streams).
    ``env`` None inherits this process's; ``check`` raises ``CalledProcessError`` on a non-zero
    exit."""
    start = time.perf_counter()
    if log is None:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=check)
    else:
        with log.open("w") as f:
            done = subprocess.run(
                cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True, check=check
            )
    return done, time.perf_counter() - start


def read_summary(run: Path) -> dict[str, Any]:
    """A finished run folder's ``summary.json``."""
    return json.loads((run / "summary.json").read_text())


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """A run folder's ``metrics.jsonl``: one row per evaluation."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- alternation


def alternate(sides: Sequence[T], rounds: int, *, mirror: bool = True) -> Iterator[tuple[int, T]]:
    """``(round, side)`` for ``rounds`` rounds of every side in turn. With ``mirror`` odd rounds
    take the sides in reverse (A B, B A, A B ...: ABBA), so a drift in the machine's speed hits
    every side alike; without it every round takes them in the given order."""
    for r in range(rounds):
        order = sides if not mirror or r % 2 == 0 else sides[::-1]
        for side in order:
            yield r, side


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """``a[i] / b[i]`` per round (the two lists must be as long)."""
    return [x / y for x, y in zip(a, b, strict=True)]


# ---------------------------------------------------------------------------- JSON results


def load_json(path: Path | None, default: Any) -> Any:
    """The JSON in ``path``; ``default`` when there is no path or no file yet (a fresh start)."""
    if path is None or not path.exists():
        return default
    return json.loads(path.read_text())


def save_json(path: str | Path, data: Any, *, end: str = "\n") -> None:
    """``data`` as JSON with indent 1 and ``end`` after it, written beside ``path`` and renamed
    over it, so an interrupted write leaves the previous file whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + end)
    tmp.replace(path)


def has_row(rows: list[dict[str, Any]], **fields: Any) -> bool:
    """Whether a row has all these field values (a resume file's run is done)."""
    return any(all(r.get(k) == v for k, v in fields.items()) for r in rows)


def add_row(rows: list[dict[str, Any]], row: dict[str, Any], path: Path | None = None) -> None:
    """Append a finished run's row, print it as one JSON line and, with ``path``, save all rows
    there at once (so an interrupted benchmark resumes after it)."""
    rows.append(row)
    print(json.dumps(row), flush=True)
    if path:
        save_json(path, rows)


# ---------------------------------------------------------------------------- tables


def mean_sd(values: Sequence[float], fmt: str = ".4g", sd_fmt: str = ".2g") -> str:
    """``mean ± sd`` (sample standard deviation) in these formats; one value alone as is."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), sd_fmt)}"


def seconds_to(curve: list[dict[str, Any]], target: float) -> float | None:
    """Training seconds at the first evaluation whose ``val_accuracy`` reaches ``target``."""
    return next((r["train_seconds"] for r in curve if r["val_accuracy"] >= target), None)
