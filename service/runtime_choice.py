"""Which runtime (inference engine) evaluates an artifact: torch eager or ONNX Runtime.

The runtime is 'torch', 'onnx' or 'auto'. 'auto' is torch when the artifact has no graph; when it has one, both
runtimes are loaded and timed on the same dummy batches (`choose_faster`), and the one with the lower total time
serves: which is faster depends on the model and the machine (ONNX Runtime wins on per-call overhead, torch can win
on large convolutions), so it is measured rather than assumed."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from genserve.artifacts import artifact as art

RuntimeName = Literal["torch", "onnx", "auto"]
R = TypeVar("R")  # a runtime object of one family


def check_runtime_name(runtime: str) -> None:
    if runtime not in ("torch", "onnx", "auto"):
        raise ValueError(f"unknown runtime {runtime!r}; use 'torch', 'onnx' or 'auto'")


PROBE_BATCHES = (1, 32)  # a lone request and a full default micro-batch (max_batch_size 32)
PROBE_REPEATS = 3  # timed calls per runtime and batch size, after one warm-up call; the median counts
PROBE_BUDGET_S = 0.25  # fewer timed calls (at least one) once a runtime has spent this long at a batch size


@dataclass
class RuntimeChoice:
    """How the serving runtime was chosen: asked for, served, and for 'auto' the measured times."""

    requested: str  # torch | onnx | auto
    runtime: str  # torch | onnx: the one serving
    # 'auto' with both runtimes: median seconds per call, per runtime and batch size (str keys: JSON-ready)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    rule: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "runtime": self.runtime, "seconds": self.seconds, "rule": self.rule}


def choose_faster(runtimes: dict[str, R], call: Callable[[R, int], Sequence[np.ndarray]],
                  batches: Sequence[int] = PROBE_BATCHES, repeats: int = PROBE_REPEATS,
                  budget_s: float = PROBE_BUDGET_S, atol: float = 1e-4) -> RuntimeChoice:
    """Time `call(runtime, batch)` (the runtime scoring `batch` dummy inputs) for every runtime, in turns so
    that a change in load affects all alike, and choose the lowest total over the batch sizes of the median
    seconds per call. The runtimes must agree on every output (to atol, relative to the values past 1):
    the chosen one then answers as any other would."""
    seconds: dict[str, dict[str, float]] = {name: {} for name in runtimes}
    for batch in batches:
        outputs = {name: call(rt, batch) for name, rt in runtimes.items()}  # warm-up, and the agreement check
        _check_agreement(outputs, batch, atol)
        times: dict[str, list[float]] = {name: [] for name in runtimes}
        for i in range(repeats):
            for name, rt in runtimes.items():
                if i and sum(times[name]) >= budget_s:
                    continue
                started = time.perf_counter()
                call(rt, batch)
                times[name].append(time.perf_counter() - started)
        for name, ts in times.items():
            seconds[name][str(batch)] = statistics.median(ts)
    chosen = min(runtimes, key=lambda name: sum(seconds[name].values()))
    rule = (f"lower total of the median seconds per call at batch sizes {', '.join(map(str, batches))}, "
            "measured at load")
    return RuntimeChoice(requested="auto", runtime=chosen, seconds=seconds, rule=rule)


def _check_agreement(outputs: dict[str, Sequence[np.ndarray]], batch: int, atol: float) -> None:
    (first, want), *others = outputs.items()
    for name, got in others:
        for w, g in zip(want, got, strict=True):
            w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
            worst = float(np.max(np.abs(w - g) / np.maximum(1.0, np.abs(w)))) if w.size else 0.0
            if not worst <= atol:
                raise RuntimeError(f"runtimes {first} and {name} disagree by {worst:.3g} (> {atol}) on a batch "
                                   f"of {batch}: the artifact's graph does not compute what its weights do")


def load_runtime(requested: str, has_onnx: bool, build: dict[str, Callable[[], R]],
                 call: Callable[[R, int], Sequence[np.ndarray]], where: Path) -> tuple[R, RuntimeChoice]:
    """The runtime to serve with, and how it was chosen; one rule for every kind of model.

    `build` makes each runtime ('torch', 'onnx'), `call(runtime, batch)` scores a batch of dummy inputs."""
    check_runtime_name(requested)
    if requested == "onnx" and not has_onnx:
        raise art.ArtifactError(f"{where}: runtime 'onnx' asked for, but the artifact has no {art.ONNX}")
    if requested != "auto" or not has_onnx:
        name = requested if requested != "auto" else "torch"
        rule = "asked for" if requested != "auto" else f"the artifact has no {art.ONNX}"
        return build[name](), RuntimeChoice(requested=requested, runtime=name, rule=rule)
    runtimes = {name: make() for name, make in build.items()}
    choice = choose_faster(runtimes, call)
    return runtimes[choice.runtime], choice


def needs_reload(requested: str, choice: RuntimeChoice | None) -> bool:
    """Whether a reconfigured runtime differs from the loaded one: 'auto' keeps an automatic choice."""
    check_runtime_name(requested)
    if choice is None:
        return True
    if requested == "auto":
        return choice.requested != "auto"
    return requested != choice.runtime


def runtime_info(loaded: Any) -> dict[str, Any]:
    """What a records or image replica's info() reports of its loaded model: the serving runtime, its device, and
    how 'auto' chose it."""
    return {"runtime": loaded.runtime.name, "device": loaded.runtime.device,
            "runtime_choice": None if loaded.choice is None else loaded.choice.as_dict()}
