"""What a training run shows and keeps besides the model: its progress bar, loss curves, sample grids and log.

Every artifact of a trained family carries `loss_curve.png` and `training_log.json` (the run's history, as JSON);
the image families also a grid of samples, and during training a grid every few epochs in
`STORE/.training/NAME/`. The loss curves take the history and a title, never a family's configuration, so
this module imports no pipeline.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

LOSS_CURVE = "loss_curve.png"
TRAINING_LOG = "training_log.json"
TRAINING_DIR = ".training"  # STORE/.training/NAME/: sample grids written during training


def training_dir(store: Path, name: str) -> Path:
    return store / TRAINING_DIR / name


def log_files(history: dict[str, Any], loss_curve: bytes) -> dict[str, bytes]:
    """The artifact files that record how a model was trained: its loss curve (PNG) and its history (JSON)."""
    return {LOSS_CURVE: loss_curve, TRAINING_LOG: json.dumps(history, indent=1).encode()}


# ---- progress -----------------------------------------------------------------------------------------------------


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


# ---- sample grids -------------------------------------------------------------------------------------------------


def grid_png(images: np.ndarray, levels: int, columns: int, scale: int | None = None, pad: int = 2) -> bytes:
    """(N, H, W) grey levels as one PNG: a grid `columns` wide, white ink on black, pixels enlarged."""
    from PIL import Image

    n, h, w = images.shape
    scale = scale or max(1, 84 // max(h, w))
    rows = math.ceil(n / columns)
    canvas = np.full((rows * (h * scale + pad) + pad, columns * (w * scale + pad) + pad), 96, dtype=np.uint8)
    grey = np.rint(images.astype(np.float64) * 255 / (levels - 1)).astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        top, left = pad + r * (h * scale + pad), pad + c * (w * scale + pad)
        canvas[top:top + h * scale, left:left + w * scale] = np.kron(grey[i], np.ones((scale, scale), np.uint8))
    buffer = io.BytesIO()
    Image.fromarray(canvas, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def class_grid_png(sample: Callable[[int, Tensor | None], Tensor], n_classes: int, levels: int, grid_size: int,
                   device: torch.device) -> bytes:
    """`sample(n, labels)` drawn as a grid: grid_size x grid_size images, or for a class-conditional model one
    column per class, grid_size rows."""
    columns = n_classes or grid_size
    n = columns * grid_size
    labels = torch.arange(n, device=device) % n_classes if n_classes else None
    return grid_png(sample(n, labels).cpu().numpy(), levels, columns)


def write_epoch_samples(out_dir: Path | None, epoch: int, epochs: int, every: int, draw: Callable[[], bytes]) -> None:
    """Every `every` epochs (0: never) but the last, whose grid goes into the artifact: `draw()` into
    `out_dir/samples-epoch-NNN.png`. No `out_dir`: a run that writes none (a distributed worker)."""
    if out_dir is not None and every and epoch % every == 0 and epoch < epochs:
        (out_dir / f"samples-epoch-{epoch:03d}.png").write_bytes(draw())


# ---- loss curves --------------------------------------------------------------------------------------------------


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


def _label(ax: Any, xlabel: str, ylabel: str, title: str, legend_size: int | None = None) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def _per_batch(ax: Any, rows: list[list[float]], column: int = 1, scale: float = 1.0, **style: Any) -> None:
    """A history's per-batch rows ([step, value, ...]) as a thin line: `column`'s value times `scale`."""
    if rows:
        values = np.array(rows, dtype=float)
        ax.plot(values[:, 0], values[:, column] * scale, lw=0.6, **style)


def _per_evaluation(ax: Any, rows: list[dict[str, Any]], x: str, y: str, scale: float = 1.0, **style: Any) -> None:
    """A history's evaluation rows (dicts) as dots joined by a line: `y` times `scale` against `x`."""
    ax.plot([r[x] for r in rows], [r[y] * scale for r in rows], "o-", ms=3, **style)


def text_loss_curve(history: dict[str, Any], title: str) -> bytes:
    """A text network's training loss per batch and its train and validation estimates, nats/token."""

    def draw(ax: Any) -> None:
        evals = history["evaluations"]
        _per_batch(ax, history["train"], alpha=0.35, color="C0", label="train (batch)")
        _per_evaluation(ax, evals, "iter", "train_loss", color="C0", label="train (estimate)")
        _per_evaluation(ax, evals, "iter", "validation_loss", color="C1", label="validation (estimate)")
        _label(ax, "iteration", "loss (nats/token)", title)

    return figure_png(draw)


def ngram_loss_curve(history: dict[str, Any], title: str) -> bytes:
    """The "curve" of a counting model: train and validation loss (nats/token) by n-gram order."""

    def draw(ax: Any) -> None:
        rows = history["by_order"]
        _per_evaluation(ax, rows, "order", "train_loss", label="train")
        _per_evaluation(ax, rows, "order", "validation_loss", label="validation")
        ax.set_xticks([r["order"] for r in rows])
        _label(ax, f"n-gram order (first {history['sample_tokens']:,} tokens of each split)", "loss (nats/token)",
               title)

    return figure_png(draw)


def image_loss_curve(history: dict[str, Any], title: str) -> bytes:
    """Training NLL per batch and per epoch and validation NLL per epoch, in bits/dim."""
    to_bpd = 1 / (history["n_pixels"] * math.log(2))

    def draw(ax: Any) -> None:
        epochs = history["epochs"]
        _per_batch(ax, history["train"], scale=to_bpd, alpha=0.35, color="C0", label="train (batch)")
        _per_evaluation(ax, epochs, "step", "train_nll", to_bpd, color="C0", label="train (epoch mean)")
        _per_evaluation(ax, epochs, "step", "validation_nll", to_bpd, color="C1", label="validation")
        _label(ax, "step", "bits/dim", title)

    return figure_png(draw)


def records_loss_curve(history: dict[str, Any], title: str) -> bytes:
    """Training and validation NLL (nats per record) by epoch, the best epoch marked."""

    def draw(ax: Any) -> None:
        rows = history["epochs"]
        epochs = [r["epoch"] for r in rows]
        ax.plot(epochs, [r["train_nll"] for r in rows], label="train")
        ax.plot(epochs, [r["validation_nll"] for r in rows], label="validation")
        ax.axvline(history["best_epoch"], color="grey", lw=0.8, ls="--", label="best epoch")
        _label(ax, "epoch", "NLL (nats per record)", title)

    return figure_png(draw)


def vae_loss_curve(history: dict[str, Any], title: str) -> bytes:
    """The two terms of the ELBO by step (-E_q log p(x|z) and the KL, nats per image), the validation ELBO's
    negative by epoch, and where the KL warm-up ends."""

    def draw(ax: Any) -> None:
        _per_batch(ax, history["train"], 1, -1.0, alpha=0.6, label="reconstruction -E log p(x|z)")
        _per_batch(ax, history["train"], 2, alpha=0.6, label="KL(q(z|x) || p(z))")
        _per_evaluation(ax, history["epochs"], "step", "validation_elbo", -1.0, label="validation -ELBO")
        if history["warmup_steps"]:
            ax.axvline(history["warmup_steps"], color="grey", lw=0.8, ls="--", label="KL warm-up ends")
        _label(ax, "step", "nats per image", title, legend_size=8)

    return figure_png(draw)


def flow_loss_curve(history: dict[str, Any], title: str) -> bytes:
    """Training bits/dim by step (one dequantisation draw per batch) and validation bits/dim by epoch."""

    def draw(ax: Any) -> None:
        _per_batch(ax, history["train"], alpha=0.6, label="train (dequantised)")
        _per_evaluation(ax, history["epochs"], "step", "validation_bits_per_dim", label="validation (dequantised)")
        _label(ax, "step", "bits/dim", title, legend_size=8)

    return figure_png(draw)


def gan_loss_curve(history: dict[str, Any], title: str) -> bytes:
    """Both GAN losses per step and their epoch means, with the discriminator's loss at the equilibrium."""
    steps = history["steps"]

    def draw(ax: Any) -> None:
        for key, color, label in (("generator_loss", "C0", "generator"), ("discriminator_loss", "C1",
                                                                           "discriminator")):
            ax.plot(steps["step"], steps[key], lw=0.6, alpha=0.35, color=color, label=f"{label} (batch)")
            _per_evaluation(ax, history["epochs"], "step", key, color=color, label=f"{label} (epoch mean)")
        ax.axhline(2 * math.log(2), color="grey", lw=0.8, ls=":", label="D at equilibrium (2 log 2)")
        _label(ax, "step", "non-saturating GAN loss (nats)", title, legend_size=8)

    return figure_png(draw)
