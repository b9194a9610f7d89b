"""Timing and peak-memory helpers for the demo and the benchmarks (not for tests), and the
plain table they print (:func:`table`).

Peak memory is the kernel's resident-set high-water mark (``VmHWM``) over the block, above
the resident size at its start. Before the block, freed heap memory is handed back to the
OS (``malloc_trim``) and the high-water mark is reset (``/proc/self/clear_refs``), so runs
measured one after another in one process do not hide behind memory an earlier run freed.
Linux only; elsewhere the peak reads 0.
"""

from __future__ import annotations

import ctypes
import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass


def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _release_and_reset() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_rss_delta: int = 0  # bytes of resident memory above the level at the start


@contextmanager
def measure():
    """Wall time and peak resident memory of a block."""
    result = Measurement()
    _release_and_reset()
    start_rss = _status_kib("VmRSS")
    start = time.perf_counter()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - start
        result.peak_rss_delta = max(_status_kib("VmHWM") - start_rss, 0) * 1024


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def table(rows, headers) -> str:
    """``rows`` under ``headers`` as text: tabulate's grid when tabulate is installed, else
    plain columns."""
    try:
        from tabulate import tabulate

        return tabulate(rows, headers=headers, floatfmt=".3g")
    except ImportError:  # tabulate is optional: plain columns
        lines = ["  ".join(str(h) for h in headers)] + [
            "  ".join(str(c) for c in row) for row in rows
        ]
        return "\n".join(lines)
