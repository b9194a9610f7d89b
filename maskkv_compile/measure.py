"""Timing and peak-memory helpers for the demo and the benchmark (not for tests)."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_rss_delta: int = 0  # peak resident memory above the level at the start, bytes


@contextmanager
def measure(interval: float = 0.005):
    """Wall time and peak RSS (sampled every ``interval`` s by a thread) of a block."""
    result = Measurement()
    start_rss = rss_bytes()
    peak = [start_rss]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            done.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - start
        done.set()
        thread.join()
        result.peak_rss_delta = max(peak[0], rss_bytes()) - start_rss


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
