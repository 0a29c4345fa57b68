"""One training run, shared by every family: prepare -> fit -> evaluate -> calibrate -> export.

A family (text_pipeline.py, image_pipeline.py, records_pipeline.py, gmm_pipeline.py, vae_pipeline.py,
image_flow_pipeline.py, gan_pipeline.py) supplies the pieces as the methods of one object (`Family`): its data and,
on --resume, the checkpoint it continues from; the fit (its loss and optimiser); the evaluation on held-out data;
the calibration of its anomaly scores; and the artifact it writes. `run_family` calls them in that order. What the
gradient-trained fits share is here too: the device and CPU threads, a cosine schedule, the best epoch's weights,
what a checkpoint's settings must match to resume, and Ctrl-C as "checkpoint and stop".
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from genserve.artifacts import artifact
from genserve.artifacts.calibration import CalibrationSet
from genserve.artifacts.neighbours import NeighbourIndex, neighbour_files
from genserve.artifacts.reference import reference_files


@dataclass
class Fitted:
    """What a fit hands on: the trained module (the best epoch's weights where a family keeps them), the history
    written to training_log.json, and the seconds spent training."""

    module: nn.Module
    history: dict[str, Any]
    seconds: float


class Family(Protocol):
    """The pieces of one family's run, called by `run_family` in this order."""

    def prepare(self) -> None:
        """Load the data; on --resume, read the checkpoint and check that it matches the settings."""

    def fit(self) -> Fitted:
        """Train (or fit) the model, from the checkpoint when resuming."""

    def evaluate(self, fitted: Fitted) -> dict[str, Any]:
        """The manifest's metrics on held-out data."""

    def calibrate(self, fitted: Fitted, metrics: dict[str, Any]) -> dict[str, bytes]:
        """Calibrate the anomaly scores; their files (calibration, reference model), thresholds into `metrics`."""

    def export(self, fitted: Fitted, metrics: dict[str, Any], files: dict[str, bytes]) -> Path:
        """Write the artifact (weights, `files`, the logs, ONNX where the family has it); its directory."""


class FamilyRun:
    """What a family's pieces start from: its resolved settings, the store, the device it trains on, whether to
    show progress, and the clock of the whole run (the manifest's `total_seconds`)."""

    def __init__(self, cfg: Any, store: Path, device: torch.device, progress: bool) -> None:
        self.cfg, self.store, self.device, self.progress = cfg, store, device, progress
        self.started = time.perf_counter()


def run_family(family: Family) -> Path:
    """One run of a family, from its data to its artifact; returns the artifact's directory."""
    family.prepare()
    fitted = family.fit()
    fitted.module.eval()
    metrics = family.evaluate(fitted)
    files = family.calibrate(fitted, metrics)
    return family.export(fitted, metrics, files)


def calibration_files(calibration: CalibrationSet, reference: nn.Module, metrics: dict[str, Any],
                      neighbours: NeighbourIndex | None = None, extra: dict[str, bytes] | None = None
                      ) -> dict[str, bytes]:
    """The files of a fitted calibration, its likelihood-ratio reference model, its knn index and any `extra`
    files of other score types; each score type's threshold goes into `metrics` as `anomaly_thresholds`, the
    default score type and why it is the default as `anomaly_default_score`."""
    metrics["anomaly_thresholds"] = {k: c.threshold for k, c in calibration.scores.items()}
    if calibration.default is not None:
        metrics["anomaly_default_score"] = {"score": calibration.default, "why": calibration.why}
    files = {artifact.CALIBRATION: json.dumps(calibration.to_dict()).encode(), **reference_files(reference)}
    return files | (neighbour_files(neighbours) if neighbours is not None else {}) | (extra or {})


# ---- device and threads -------------------------------------------------------------------------------------------


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


# ---- fitting ------------------------------------------------------------------------------------------------------


def cosine_decay(optimizer: torch.optim.Optimizer, total_steps: int,
                 floor: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate from its initial value down a half cosine to `floor` times it at `total_steps`, then
    constant."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, parameters: Iterator[nn.Parameter],
                   grad_clip: float | None) -> None:
    """Backpropagate `loss` (distributed: the gradients are averaged over the processes here), clip the gradient
    norm to `grad_clip` (None: no clipping) and step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()


class BestEpoch:
    """The best epoch so far by its validation value, and a copy of its weights: what an epoch-based fit ends
    with. `history["best_epoch"]` follows it. `keep_first`: the first epoch offered is kept whatever its value
    (NaN included), so a run always ends with weights; without it a value that never beats the start (infinity,
    or minus infinity when maximising) leaves none."""

    def __init__(self, history: dict[str, Any], maximise: bool = False, keep_first: bool = False) -> None:
        self.history = history
        self.maximise, self.keep_first = maximise, keep_first
        self.value = -math.inf if maximise else math.inf
        self.state: dict[str, torch.Tensor] | None = None

    def offer(self, model: nn.Module, epoch: int, value: float) -> None:
        better = value > self.value if self.maximise else value < self.value  # NaN never is
        if better or (self.keep_first and self.state is None):
            self.value, self.history["best_epoch"] = value, epoch
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def stale(self, epoch: int, patience: int) -> bool:
        """`patience` epochs (0: never) since the best one: an early stop."""
        return bool(patience) and epoch - self.history["best_epoch"] >= patience

    def restore(self, model: nn.Module) -> None:
        """Load the best epoch's weights into `model`, if one was kept (only a distributed run's evaluating process
        keeps any)."""
        if self.state is not None:
            model.load_state_dict(self.state)


# ---- checkpoints and resuming -------------------------------------------------------------------------------------


def comparable_settings(cfg: Any, may_differ: frozenset[str]) -> dict[str, Any]:
    """The settings a checkpoint records and a resumed run must match: all but `may_differ`, as JSON gives them
    back (tuples as lists)."""
    return {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k not in may_differ}


def refuse_other_settings(name: str, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """ValueError naming every setting in which a run differs from the checkpoint it would resume."""
    differ = [f"{k} (checkpoint {saved.get(k)!r}, now {now.get(k)!r})" for k in sorted(set(saved) | set(now))
              if saved.get(k) != now.get(k)]
    if differ:
        raise ValueError(f"cannot resume {name!r}: the configuration differs from the checkpoint's in "
                         f"{'; '.join(differ)}. Run with the checkpoint's settings, or without --resume to start over")


@contextlib.contextmanager
def stop_on_sigint() -> Iterator[threading.Event]:
    """The first Ctrl-C asks the loop to checkpoint and stop after the current iteration; a second one interrupts
    at once. Only in the main thread (signal handlers cannot be set elsewhere)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
