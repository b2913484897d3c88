"""Clocks, peak memory and robust statistics for the benchmark.

Every figure of the benchmark is a ratio of two things timed in the same process, interleaved step by
step (or rep by rep), and summarised by its median with the interquartile range: on a shared CPU
another job can slow any single measurement down, but not the median of paired ratios.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from pathlib import Path

import torch


class Clock:
    """`perf_counter` that first waits for the GPU, so a timestamp means the work before it is done."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def summary(values) -> dict:
    """Median, quartiles, min, max and count of `values` (empty -> all None)."""
    values = sorted(float(v) for v in values)
    if not values:
        return {"median": None, "p25": None, "p75": None, "min": None, "max": None, "n": 0}
    return {
        "median": statistics.median(values), "p25": _quantile(values, 0.25), "p75": _quantile(values, 0.75),
        "min": values[0], "max": values[-1], "n": len(values),
    }


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without numpy."""
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def ratios(numerators, denominators) -> list[float]:
    """Paired ratios of two equally long series (measurement i of each was taken back to back)."""
    return [a / b for a, b in zip(numerators, denominators) if b]


# ------------------------------------------------------------------ memory
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def rss_mb() -> float | None:
    return _status_kb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident memory of this process since it started or since the last `reset_peak_memory`."""
    peak = _status_kb("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; never reset


def _status_kb(field: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device | str) -> bool:
    """Restart peak tracking (CPU: Linux's VmHWM via /proc/self/clear_refs; GPU: the allocator's peak).

    Returns False when the CPU peak could not be reset (then it counts from the process start).
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device | str) -> dict:
    out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if torch.device(device).type == "cuda":
        out["peak_gpu_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["peak_gpu_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return out


def timed(fn, clock: Clock, reps: int = 1) -> list[float]:
    """Wall seconds of `reps` calls of `fn()`."""
    out = []
    for _ in range(reps):
        start = clock()
        fn()
        out.append(clock() - start)
    return out
