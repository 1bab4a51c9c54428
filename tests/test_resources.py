"""The resources a run reports are the whole run's (issue 30): the peak memory is read after
the last work (generation, knowledge kept, the report), and the phases cover the wall time.

Each job runs in its own process, as ``leantune tune`` does; the process records its own
VmHWM when it exits (atexit), which the reported peak must reach (less a margin for what
interpreter shutdown may touch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import chat_model_folder, tiny_model_folder, topic_rows, write_rows
from test_instruct_tune import rows
from test_keep import reference_file

RUNNER = """
import atexit, sys
from pathlib import Path

OUT = Path(sys.argv[1])

def record():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            OUT.write_text(str(int(line.split()[1]) / 1024))

atexit.register(record)
sys.argv = ["leantune", *sys.argv[2:]]
from leantune.cli import main
main()
"""
MARGIN_MB = 8


def run_job(tmp_path: Path, args: list[str]) -> tuple[dict, float]:
    hwm = tmp_path / "vmhwm.txt"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", RUNNER, str(hwm), "tune", "--runs-dir", str(tmp_path / "runs")]
    done = subprocess.run(
        [*cmd, "--name", "job", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / "job" / "summary.json").read_text())
    return summary, float(hwm.read_text())


def check_whole_run(summary: dict, exit_peak: float) -> None:
    assert summary["peak_memory_mb"] >= exit_peak - MARGIN_MB, (
        summary["peak_memory_mb"],
        exit_peak,
    )
    phases = summary["phase_seconds"]
    assert {"load", "baseline", "training", "test", "report"} <= set(phases)
    wall = summary["wall_seconds"]
    assert abs(sum(phases.values()) - wall) <= 0.03 * wall + 0.05, (phases, wall)
    assert summary["train_seconds"] <= phases["training"] <= wall
    assert summary["process_seconds"] >= wall  # imports came first


def test_a_classify_run_reports_its_whole_peak_and_time(tmp_path: Path) -> None:
    model = tiny_model_folder(tmp_path / "bert")
    data = write_rows(tmp_path / "data.csv", topic_rows(60))
    ref = reference_file(tmp_path / "ref.txt")
    args = ["--model", str(model), "--data", str(data), "--reference-text", str(ref)]
    summary, exit_peak = run_job(tmp_path, [*args, "--epochs", "1", "--reference-examples", "8"])
    check_whole_run(summary, exit_peak)
    assert summary["phase_seconds"]["probe"] > 0  # the warm head's fit, apart from loading
    page = (tmp_path / "runs" / "job" / "report.html").read_text()
    assert "Where the time went" in page and f"{summary['peak_memory_mb']:,.0f} MB" in page


def test_an_instruct_run_reports_its_whole_peak_and_time(tmp_path: Path) -> None:
    corpus = [f"{r['prompt']} {r['response']}" for r in rows(30)]
    model = chat_model_folder(tmp_path / "chat", extra=corpus)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(48)))
    ref = reference_file(tmp_path / "ref.txt")
    args = ["--task", "instruct", "--model", str(model), "--data", str(data)]
    args += ["--reference-text", str(ref), "--reference-examples", "8", "--epochs", "1"]
    summary, exit_peak = run_job(tmp_path, [*args, "--gen-examples", "4", "--max-new-tokens", "4"])
    check_whole_run(summary, exit_peak)
    assert summary["phase_seconds"]["generation"] > 0


@pytest.mark.parametrize("device", ["cpu"])
def test_the_peak_is_read_again_after_the_report(device: str) -> None:
    """final_resources takes the larger of the peak so far and the process's peak now."""
    import torch

    from leantune.core.memory import Phases, host_peak_mb
    from leantune.tune.summary import final_resources

    out = final_resources({"peak_memory_mb": 1.0}, torch.device(device), Phases(), 0.0)
    assert out["peak_memory_mb"] >= host_peak_mb() - 1 > 1.0
    kept = final_resources({"peak_memory_mb": 1e9}, torch.device(device), Phases(), 0.0)
    assert kept["peak_memory_mb"] == 1e9
