"""Peak memory and time, as every run and benchmark reports them: the process's peak resident
memory (VmHWM), CUDA's peak allocation, the time since the process started, and a run's
phases."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak CUDA memory allocated on ``device``, else this process's peak resident memory.

    On Linux that is VmHWM, not ru_maxrss: ru_maxrss is carried across exec, so a child started
    by a big parent would report the parent's peak.
    """
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory(device: torch.device | None = None) -> bool:
    """Start a new peak: CUDA's peak statistics, or the process's peak RSS (Linux: writing 5 to
    /proc/self/clear_refs resets VmHWM). Several runs in one process (compare, sweep) then each
    report their own peak. Returns False where the peak cannot be reset."""
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def host_peak_mb() -> float:
    """This process's peak resident memory (VmHWM on Linux), whatever the device."""
    return peak_memory_mb(None)


def process_seconds() -> float | None:
    """Seconds since this process started (Linux: /proc), or None where it cannot be read:
    what ``/usr/bin/time`` calls the elapsed time, imports included."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))


class Phases:
    """Wall time of a run's phases, in the order they first ran: ``with phases("test"): ...``;
    a phase entered again adds to its time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.seconds.items()}
