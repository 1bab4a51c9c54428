"""benchmarks/gpu_check.py, the prepared GPU check: its part runner keeps one part's crash, error
or hang to that part, and its CPU rehearsal (``--device cpu --tiny``) runs every part, so the
script cannot rot between GPU runs. Every child refuses the imports the GPU image lacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def check(
    tmp_path: Path, *args: str, faults: str = "", timeout: float = 900
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out)]
    cmd += ["--work", str(work), *args]
    env = os.environ | {"GPU_CHECK_FAULTS": faults, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    record = json.loads((out / "gpu_check.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log"]
    return done, record


def gone(pid: int) -> bool:
    """The process has ended (a zombie waiting for its reaper counts as ended)."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" in status.read_text()
    except FileNotFoundError:
        return True


def test_a_failing_dying_or_hanging_part_is_recorded_and_the_rest_still_run(tmp_path: Path):
    done, record = check(
        tmp_path,
        "--parts",
        "step-llama,step-qwen2,quantized,env",
        "--timeouts",
        "quantized=4",
        faults="step-llama:raise,step-qwen2:die,quantized:hang",
    )
    parts = record["parts"]
    assert list(parts) == ["step-llama", "step-qwen2", "quantized", "env"]
    assert parts["step-llama"]["status"] == "failed"
    assert parts["step-llama"]["error"] == "RuntimeError: planted failure"
    assert parts["step-qwen2"]["status"] == "failed"
    assert parts["step-qwen2"]["error"].startswith("died (exit code -9)")
    assert parts["quantized"]["status"] == "failed"
    assert parts["quantized"]["error"].startswith("timed out after 4 s")
    assert parts["quantized"]["seconds"] < 30
    # The hanging part's own child was killed with it (the part's process group).
    sleeper = int((tmp_path / "work" / "parts" / "quantized.pid").read_text())
    deadline = time.monotonic() + 10
    while not gone(sleeper) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gone(sleeper)
    env = parts["env"]
    assert env["status"] == "passed", env
    assert env["figures"]["versions"]["torch"] != "absent"
    assert record["summary"] == {"passed": 1, "failed": 3, "skipped": 0}
    assert done.returncode == 1
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "==== step-llama: failed" in log and "planted failure" in log
    assert "==== env: passed" in log


def test_a_part_with_no_time_left_is_skipped_and_bad_options_are_refused(tmp_path: Path):
    done, record = check(tmp_path, "--parts", "env,hotswap", "--budget-s", "5")
    assert done.returncode == 0
    assert {p["status"] for p in record["parts"].values()} == {"skipped"}
    assert "out of time" in record["parts"]["env"]["reason"]
    assert record["cpu_rehearsal"]["tune-torchrun"].startswith("gloo")
    for bad in (["--parts", "env,nope"], ["--timeouts", "env=soon"]):
        cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path / "o2"), *bad]
        refused = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_part(tmp_path: Path):
    """The whole check on tiny shapes (~3 min on 2 free cores, 6 on a loaded one)."""
    done, record = check(tmp_path, "--budget-s", "1500", "--timeout-scale", "4")
    parts = record["parts"]
    failed = {k: v.get("error") for k, v in parts.items() if v["status"] != "passed"}
    assert not failed, failed
    assert done.returncode == 0
    env = parts["env"]["figures"]
    assert env["versions"]["torchao"] != "absent"
    for name in ("step-llama", "step-qwen2"):
        figures = parts[name]["figures"]
        assert figures["counts"]["leantune"] == figures["counts"]["peft"]
        rows = figures["rows"]
        assert len(rows) == 5 and {r["loss_on"] for r in rows} == {"all", "answer"}
        assert {r["checkpointing"] for r in rows} == {True, False}
        for r in rows:
            assert r["loss_agrees"] and r["leantune"]["step_s"] > 0 and r["peft"]["step_s"] > 0
    modes = parts["quantized"]["figures"]["modes"]
    assert modes["int8"]["quantized_layers"] == modes["nf4"]["quantized_layers"] > 0
    assert modes["nf4"]["base_mib"] < modes["bf16"]["base_mib"]
    fp16 = parts["tune-fp16"]["figures"]
    assert fp16["fp16_loss_scale"] > 0 and fp16["fp16_skipped_steps"] < fp16["steps"]
    answers = parts["tune-bf16"]["figures"]["generate"]["answers"]
    assert len(answers) == 2
    assert parts["tune-torchrun"]["figures"]["device"] == "cpu"
    hot = parts["hotswap"]["figures"]
    assert hot["recompiles"] == 0 and hot["compiles_first_call"] >= 1
    table = "\n".join(record["tables"])
    assert "| llama | 2×32 | off | all |" in table and "| nf4 |" in table
