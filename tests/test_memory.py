"""Each run's peak memory is its own: the process peak can be reset between runs."""

from __future__ import annotations

import gc

import pytest
import torch

from leantune.core.memory import peak_memory_mb, reset_peak_memory


def test_reset_starts_a_new_peak() -> None:
    big = torch.ones(300 * 2**20 // 4)  # 300 MB, touched
    high = peak_memory_mb()
    del big
    gc.collect()
    if not reset_peak_memory():
        pytest.skip("this system cannot reset the peak RSS")
    after = peak_memory_mb()
    assert after < high - 200, (high, after)
