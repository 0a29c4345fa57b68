"""What every gradient-trained run shares: the device, CPU threads, a progress bar and plots as PNG."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch


def pick_device(requested: str | None) -> torch.device:
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} asked for, but torch sees no CUDA GPU")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(device: torch.device, threads: int | None) -> int:
    """On CPU, `threads` intra-op threads, else one per core this process may use (unless OMP_NUM_THREADS says
    otherwise); returns the previous number, to restore."""
    previous = torch.get_num_threads()
    if device.type == "cpu":
        if threads is None and not os.environ.get("OMP_NUM_THREADS"):
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if threads:
            torch.set_num_threads(max(1, threads))
    return previous


@contextlib.contextmanager
def threads_for(device: torch.device, threads: int | None) -> Iterator[None]:
    """`set_threads` for the duration of a run, restored after it."""
    previous = set_threads(device, threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def progress_bar(enabled: bool, description: str, total: int, fields: dict[str, tuple[str, str]],
                 completed: int = 0) -> Iterator[Callable[[int, dict[str, float | None]], None]]:
    """A rich progress bar when enabled; yields `update(completed, values)`.

    `fields` maps each value's key to how it is shown: a template and a number format, e.g.
    {"loss": ("loss {}", ".3f"), "tok/s": ("{} tok/s", ",.0f")}. A value of None keeps the last one shown."""
    if not enabled:
        yield lambda done, values: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    slots = {key: f"f{i}" for i, key in enumerate(fields)}  # rich field names must be identifiers
    shown = {slot: "-" for slot in slots.values()}
    text = " ".join(template.format(f"{{task.fields[{slots[key]}]}}") for key, (template, _) in fields.items())
    with Progress(TextColumn("{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(), TextColumn(text),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()) as bar:
        task = bar.add_task(description, total=total, completed=completed, **shown)

        def update(done: int, values: dict[str, float | None]) -> None:
            for key, value in values.items():
                if value is not None:
                    shown[slots[key]] = format(value, fields[key][1])
            bar.update(task, completed=done, **shown)

        yield update


def figure_png(draw: Callable[[Any], None], size: tuple[float, float] = (7, 4.2)) -> bytes:
    """One matplotlib axes drawn by `draw(ax)`, as PNG bytes (no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    draw(fig.add_subplot())
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
