"""Small helpers every benchmark shares: best-of-N timing and a description of the machine.

Best-of-N (the minimum) is what ``timeit`` recommends for CPU-bound code: the slower runs
measure other processes and the allocator, not the code under test.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Callable

CLOCKS: dict[str, Callable[[], float]] = {
    # CPU time of this thread (user + system, page faults included): what single-threaded
    # code costs, unaffected by other processes preempting it on a busy machine.
    "cpu": time.thread_time,
    # Wall-clock time: the right clock on an idle machine, noisy on a shared one.
    "wall": time.perf_counter,
}


def best_of(function: Callable[[], object], repeats: int = 7, warmup: int = 1, clock: str = "wall") -> float:
    """The fastest of ``repeats`` timed calls of ``function``, in seconds."""
    now = CLOCKS[clock]
    for _ in range(warmup):
        function()
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = now()
        function()
        best = min(best, now() - start)
    return best


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    """What a figure in docs/PERFORMANCE.md must be read against."""
    import numpy

    info = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "nproc": str(os.cpu_count()),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "kernel": platform.release(),
    }
    return info


def machine_line() -> str:
    info = machine_info()
    return (f"{info['date']} · {info['cpu']} · nproc {info['nproc']} · Python {info['python']}"
            f" · numpy {info['numpy']} · Linux {info['kernel']}")


def claim(claim: str, target: str, measured: str, met: bool) -> str:
    """One speed claim as a hidden markdown line that ``bench.run_all`` collects into the
    summary table ``make bench`` prints (claim, target, measured, met/MISSED)."""
    import json

    record = {"claim": claim, "target": target, "measured": measured, "met": bool(met)}
    return f"<!-- claim: {json.dumps(record, ensure_ascii=False)} -->"
