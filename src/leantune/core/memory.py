"""Peak memory, as every run and benchmark reports it."""

from __future__ import annotations

import resource
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
