"""A 12-trial sweep on the embedded default, killed with SIGKILL in the middle, then resumed
(issue 6). Prints the trials before the kill, after the rerun, how many were pruned, and checks
that no finished trial ran twice.

Trials train on a 300-example stratified sample for 2 epochs (validation and test whole) so the
sweep fits on 2 cores; the space is the default (lr, r, schedule, layer_decay, l2).

Usage: python benchmarks/sweep_resume.py [--out runs/sweep-bench] [--kill-after 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from _common import offline_env, python_command, run_timed, save_json

COMMON = ["--train-examples", "300", "--epochs", "2", "--quiet"]


def finished(out: Path) -> int:
    trials = out / "study.db"
    if not trials.exists():
        return 0
    import sqlite3

    with sqlite3.connect(trials) as db:
        return db.execute(
            "select count(*) from trials where state in ('COMPLETE', 'PRUNED')"
        ).fetchone()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/sweep-bench"))
    parser.add_argument("--kill-after", type=int, default=5, help="finished trials before kill")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    cmd = python_command("-m", "leantune.cli", "sweep", "--trials", "12", "--out", args.out)
    env = offline_env()
    start = time.perf_counter()
    proc = subprocess.Popen([*cmd, *COMMON], env=env)
    while finished(args.out) < args.kill_after and proc.poll() is None:
        time.sleep(2)
    time.sleep(20)  # into the next trial
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = finished(args.out)
    killed_at = time.perf_counter() - start
    rerun, _ = run_timed([*cmd, *COMMON], env)
    sys.stdout.write(rerun.stdout)
    result = json.loads((args.out / "trials.json").read_text())
    trials = result["trials"]
    done = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]
    keys = [json.dumps(t["params"], sort_keys=True) for t in done]
    summary = {
        "finished_before_kill": before,
        "killed_after_s": round(killed_at, 1),
        "rerun_exit": rerun.returncode,
        "finished": len(done),
        "pruned": result["pruned"],
        "failed (interrupted)": sum(t["state"] == "FAIL" for t in trials),
        "repeated_params": len(keys) - len(set(keys)),
        "total_s": round(time.perf_counter() - start, 1),
        "best": result["best"] and {k: result["best"][k] for k in ("number", "value", "params")},
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        save_json(args.json, summary)


if __name__ == "__main__":
    main()
