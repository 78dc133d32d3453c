"""Timing helpers shared by the bench scripts (they import it as a sibling: ``python bench/X.py`` puts bench/ on
sys.path)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work: CUDA calls return before the kernels finish."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_runs(fn: Callable[[], object], device: torch.device | str, repeat: int) -> list[float]:
    """Seconds of each of ``repeat`` calls of ``fn``, after one untimed warm-up call (allocations, autotuning)."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times
