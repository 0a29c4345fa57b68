"""What every benchmark shares: timing as medians, machine facts, Markdown tables, and goals.

Each area of the performance suite (bench/decoding.py, bench/scoring.py, bench/served.py) has
`run(quick: bool = False) -> Report`; `python -m bench` runs them in turn and writes
docs/benchmarks.md. Comparisons are measured side by side in the same run (interleaved where
they can be, so a noisy neighbour slows both) and reported as ratios next to the absolute numbers.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cores()} CPU cores ({cpu_name()}), {device}; torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, Python {platform.python_version()}")


def load_note(before: float, after: float) -> str:
    """The 1-minute load average around a run, and what it means for the times measured."""
    note = f"Load average (1 min) at the start {before:.2f}, at the end {after:.2f}"
    if max(before, after) > cores():
        return note + (f": above the {cores()} cores, other processes shared them, and the times are longer than on "
                       "an idle machine.")
    return note + f", within the {cores()} cores."


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def median_seconds(fn: Callable[[], object], repeats: int = 7, min_time: float = 0.05) -> float:
    """Median over repeats of the time per call, each repeat looping until min_time has passed."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        calls, started = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - started
            if elapsed >= min_time:
                break
        times.append(elapsed / calls)
    return statistics.median(times)


def interleaved_seconds(fns: dict[str, Callable[[], object]], repeats: int = 5,
                        min_time: float = 0.0, warmup: bool = True, settle_s: float = 0.0) -> dict[str, float]:
    """Median seconds per call of each function, timed in turns (a, b, a, b, ...) so that a change
    in the machine's load during the run affects all of them alike. One warm-up call each unless
    `warmup` is False (the caller warmed them up already); each repeat loops until min_time has passed.

    settle_s: an untimed pause before each turn, for functions on different thread pools (numpy's
    OpenBLAS against torch's OpenMP): a pool's threads spin for a while after their last task (OpenBLAS
    for about 0.1 s), and would otherwise take the cores from the next turn's pool."""
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if settle_s:
                time.sleep(settle_s)
            calls, started = 0, time.perf_counter()
            while True:
                fn()
                calls += 1
                elapsed = time.perf_counter() - started
                if elapsed >= min_time:
                    break
            times[name].append(elapsed / calls)
    return {name: statistics.median(ts) for name, ts in times.items()}


def table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> list[str]:
    """Markdown table lines. align: one character per column, 'l' or 'r' (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}x" if y > 0 else "n/a"


@dataclass
class Goal:
    """One goal of the performance issue, as measured in this run."""

    name: str  # "greedy decoding, batch 1"
    target: str  # ">= 1.5x transformers generate()"
    measured: str  # "1.72x (median of 4 sizes)"
    met: bool
    note: str = ""  # when missed: by how much and why


@dataclass
class Report:
    """One area's part of docs/benchmarks.md: Markdown sections (each starting with '## ') and goals."""

    markdown: list[str]
    goals: list[Goal] = field(default_factory=list)
