"""Timing and peak-memory helpers shared by every benchmark.

Wall time: `timed` (median of repeated calls after a warm-up) and `paired` (two functions measured alternately, so
that load on the machine hits both alike; every benchmark reports the ratio of the two medians).

Peak memory: on CUDA the allocator's `max_memory_allocated`; on the CPU the resident memory of the process, polled
every millisecond by `RssMonitor`. The CPU figure is only meaningful in a fresh process started with glibc's mmap
threshold fixed (`FRESH_PROCESS_ENV`): then freed tensor memory goes back to the system and resident memory follows
live memory; with glibc's adaptive threshold it mostly measures heap fragmentation.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable

import torch

# glibc returns allocations above 64 KiB to the system when freed (see the module docstring).
FRESH_PROCESS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
BENCH_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench.py")


def synchronize() -> None:
    """Wait for queued CUDA work, so that a timer reads the work's end (a no-op on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired(baseline: Callable[[], object], ours: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median times of two functions measured alternately (after one warm-up call of each)."""
    baseline()
    ours()
    t_base, t_ours = [], []
    for _ in range(repeats):
        t_base.append(timed(baseline, 1))
        t_ours.append(timed(ours, 1))
    return statistics.median(t_base), statistics.median(t_ours)


def current_rss() -> int:
    """This process's resident memory in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class RssMonitor:
    """Polls this process's resident memory every millisecond in a thread and keeps the maximum."""

    def __init__(self) -> None:
        self.peak = current_rss()
        self._running = True
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while self._running:
            self.peak = max(self.peak, current_rss())
            time.sleep(0.001)

    def stop(self) -> int:
        self._running = False
        self._thread.join()
        return max(self.peak, current_rss())


class PeakMemory:
    """Peak memory of a block above the memory at its start: CUDA's allocator on a GPU, polled resident memory on
    the CPU (meaningful in a fresh process with `FRESH_PROCESS_ENV`). Use as `with PeakMemory() as peak: ...`, then
    read `peak.bytes` and `peak.method`."""

    def __enter__(self) -> "PeakMemory":
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated above the start"
        else:
            self.start = current_rss()
            self.monitor = RssMonitor()
            self.method = "peak RSS above the start (fresh process, polled every ms, MALLOC_MMAP_THRESHOLD_=65536)"
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.bytes = self.monitor.stop() - self.start


def run_child(function: str, **kwargs) -> dict:
    """Call `function` ("module:name" under scripts/benchmarks, e.g. "benchmarks.memory:draft_step") with `kwargs`
    in a fresh Python process started with `FRESH_PROCESS_ENV` and this process's torch thread count, and return the
    dict it returns (how the memory benchmarks measure each setting on its own; `scripts/bench.py --child` is the
    child's entry point)."""
    env = {**os.environ, **FRESH_PROCESS_ENV}
    command = [sys.executable, BENCH_SCRIPT, "--threads", str(torch.get_num_threads()), "--child", function,
               json.dumps(kwargs)]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark child {function}({kwargs}) failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
