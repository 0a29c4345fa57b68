"""Runtimes that evaluate a loaded artifact: torch eager or ONNX Runtime, on CPU or CUDA.

The device is chosen at load time: CUDA when this process was given a GPU and the runtime can use
it, the CPU otherwise. One code path for both.

The runtime is 'torch', 'onnx' or 'auto'. 'auto' is torch when the artifact has no graph; when it has
one, both runtimes are loaded and timed on the same dummy batches (`choose_faster`), and the one with
the lower total time serves: which is faster depends on the model and the machine (ONNX Runtime wins
on per-call overhead, torch can win on large convolutions), so it is measured rather than assumed.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from genserve.artifacts import artifact as art
from genserve.artifacts.calibration import CalibrationSet, read_calibration
from genserve.artifacts.families import RECORDS
from genserve.artifacts.reference import load_reference
from genserve.artifacts.store import load_artifact_at
from genserve.models.registry import build_records_model as build_records_model_of_kind
from genserve.service.families import require_family
from genserve.service.onnx_session import open_session, session_device

log = logging.getLogger("ray.serve")
RuntimeName = Literal["torch", "onnx", "auto"]
RecordsModel = Any  # models.gmm.GaussianMixture, models.flow.RealNVP, models.made_mog.MADEMoG
T = TypeVar("T")
R = TypeVar("R")


# ---- isolation: one request's failure is that request's alone ------------------------------------------------

# log p reported for an item whose density underflows float64 (-inf), or that the model cannot evaluate (NaN):
# JSON has no infinities. Far enough from float64's limit (1.8e308) that sums over tokens, conversions to bits
# (/ ln 2) and differences of floored values stay finite too. +inf (a degenerate density) is reported as
# -LOG_PROB_FLOOR.
LOG_PROB_FLOOR = -1e300


class RequestFailed(RuntimeError):
    """The model failed on this request alone (an exception, or a numerical failure such as NaN logits); the
    requests it was batched with were answered as if it had not been there. The Gateway answers 500 model_error
    naming the cause: retrying the same request fails the same way."""


class OverLimit(ValueError):
    """A request a replica can never take: over a limit of the deployment's own (named in the message). 400."""


def is_over_limit(error: BaseException) -> bool:
    return isinstance(error, OverLimit) or isinstance(getattr(error, "cause", None), OverLimit)


class ReplicaBusy(RuntimeError):
    """The replica's queue is over a configured limit (named in the message); the Gateway answers 503."""


class OutOfResources(RequestFailed, ReplicaBusy):
    """The replica ran out of memory on this request alone: not the request's fault (a retry, or another replica,
    may serve it), so the Gateway answers 503 overloaded rather than 500; its batch-mates were still answered."""


RESOURCE_ERRORS: tuple[type[BaseException], ...] = (MemoryError, torch.OutOfMemoryError)


def is_replica_busy(error: BaseException) -> bool:
    return isinstance(error, ReplicaBusy) or isinstance(getattr(error, "cause", None), ReplicaBusy)


def is_request_failure(error: BaseException) -> bool:
    """Whether an error from a replica call is a `RequestFailed` (Ray wraps it, keeping the class)."""
    return isinstance(error, RequestFailed) or isinstance(getattr(error, "cause", None), RequestFailed)


def failure_message(error: BaseException) -> str:
    """A replica error's own message, without Ray's traceback wrapping."""
    cause = getattr(error, "cause", None) or error
    return str(cause.args[0]) if getattr(cause, "args", None) else str(cause)


def finite_log_probs(values: np.ndarray) -> np.ndarray:
    """log-probabilities as finite float64: NaN and -inf become LOG_PROB_FLOOR, +inf -LOG_PROB_FLOOR."""
    values = np.asarray(values, dtype=np.float64)
    if np.isfinite(values).all():
        return values
    return np.clip(np.nan_to_num(values, nan=LOG_PROB_FLOOR), LOG_PROB_FLOOR, -LOG_PROB_FLOOR)


def finite_responsibilities(resp: np.ndarray) -> np.ndarray:
    """Mixture responsibilities (N, K) with a row the model could not evaluate (NaN: every component's density
    underflowed) made uniform, 1/K each: no component explains the record better than another."""
    resp = np.asarray(resp, dtype=np.float64)
    if resp.size == 0 or np.isfinite(resp).all():
        return resp
    bad = ~np.isfinite(resp).all(axis=1)
    resp = resp.copy()
    resp[bad] = 1.0 / resp.shape[1]
    return resp


def reference_log_probs(reference: torch.nn.Module | None, inputs: np.ndarray, dtype: type) -> np.ndarray | None:
    """log p_ref(x) of `inputs` (as `dtype`) under an artifact's likelihood-ratio reference model
    (artifacts/reference.py, on the CPU), finite as every served log-probability; None when the artifact has none.
    Cheap (closed form, or a table lookup): never batched."""
    if reference is None:
        return None
    with torch.inference_mode():
        return finite_log_probs(reference.log_prob(torch.as_tensor(np.asarray(inputs, dtype))).numpy())


def run_isolated(fn: Callable[[list[T]], list[R]], requests: list[T]) -> list[R | RequestFailed]:
    """`fn` on the whole batch of requests, one result per request; if it raises, each request again alone, so
    that only a request the model fails on gets the error (as its RequestFailed result) and every other request
    exactly its alone-result (every batched pass here is row-wise: a row's result does not depend on the rest)."""
    try:
        return list(fn(requests))
    except Exception as e:
        if len(requests) == 1:
            log.warning("a request failed alone in its batch: %s: %s", type(e).__name__, e)
            if isinstance(e, RESOURCE_ERRORS):
                return [OutOfResources(f"the replica ran out of memory on this request ({type(e).__name__})")]
            return [RequestFailed(f"the model failed on this request: {type(e).__name__}: {e}")]
    return [result for request in requests for result in run_isolated(fn, [request])]


class RecordsRuntime(Protocol):
    name: str
    device: str

    def log_prob(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) raw records -> log p(x) (N,), responsibilities (N, K)."""
        ...


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    """A generator on `device` seeded with `seed`, or from fresh entropy when None (the same seed gives the same
    draws on the same device)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def check_runtime_name(runtime: str) -> None:
    if runtime not in ("torch", "onnx", "auto"):
        raise ValueError(f"unknown runtime {runtime!r}; use 'torch', 'onnx' or 'auto'")


# ---- 'auto': time both runtimes at load and keep the faster --------------------------------------------------

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


def build_records_model(loaded: art.Artifact) -> RecordsModel:
    """The artifact's model of records (a GMM, RealNVP or MADE-MoG), weights loaded, in eval mode."""
    require_family(loaded, RECORDS)
    try:
        model = build_records_model_of_kind(loaded.manifest.kind, loaded.manifest.config)
        model.load_state_dict(load_safetensors(loaded.contents[art.WEIGHTS]))
    except (TypeError, RuntimeError, ValueError, SafetensorError) as e:
        raise art.ArtifactError(f"{loaded.path / art.WEIGHTS}: does not fit the manifest's config ({e})") from None
    return model.eval()


class TorchRecordsRuntime:
    name = "torch"

    def __init__(self, model: RecordsModel, device: str):
        self.device = device
        # A copy: the caller's module stays on the CPU, where seeded sampling is reproducible.
        self.model = copy.deepcopy(model).to(device)
        self.dtype = model.feature_mean.dtype

    @torch.inference_mode()
    def log_prob(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.as_tensor(records, dtype=self.dtype, device=self.device)
        log_prob, resp = self.model(x)
        return log_prob.cpu().numpy(), resp.cpu().numpy()


class OnnxRecordsRuntime:
    name = "onnx"

    def __init__(self, onnx_bytes: bytes, device: str):
        # As many threads as torch has (one per core unless this process was given fewer): the two runtimes
        # share a replica's CPU budget alike, and 'auto' compares them on equal terms.
        self.session = open_session(onnx_bytes, device, threads=torch.get_num_threads())
        self.device = session_device(self.session)
        self.input_name = self.session.get_inputs()[0].name

    def log_prob(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(records, np.float64)})
        log_prob = outputs[0]
        # A mixture's graph also gives responsibilities; others have none, (N, 0) as in torch.
        resp = outputs[1] if len(outputs) > 1 else np.zeros((len(log_prob), 0))
        return log_prob, resp


@dataclass
class LoadedRecordsModel:
    artifact: art.Artifact
    module: RecordsModel  # always loaded: sampling runs in torch
    runtime: RecordsRuntime
    calibration: CalibrationSet | None
    reference: torch.nn.Module | None = None  # likelihood-ratio reference model (one Gaussian)
    choice: RuntimeChoice | None = None  # how the runtime was chosen (timings, for 'auto')

    @property
    def n_features(self) -> int:
        return self.artifact.manifest.input.n_features


def load_model(path: str, runtime: RuntimeName = "auto", device: str | None = None) -> LoadedRecordsModel:
    """Verify and load an artifact directory into the requested runtime."""
    loaded = load_artifact_at(str(path))
    device = device or pick_device()
    module = build_records_model(loaded)
    build: dict[str, Callable[[], RecordsRuntime]] = {
        "torch": lambda: TorchRecordsRuntime(module, device),
        "onnx": lambda: OnnxRecordsRuntime(loaded.contents[art.ONNX], device),
    }
    rt, choice = load_runtime(runtime, art.ONNX in loaded.contents, build, records_probe(module), loaded.path)
    return LoadedRecordsModel(artifact=loaded, module=module, runtime=rt, calibration=read_calibration(loaded),
                       reference=load_reference(loaded), choice=choice)


def records_probe(module: RecordsModel) -> Callable[[RecordsRuntime, int], tuple[np.ndarray, np.ndarray]]:
    """Scores `batch` records drawn from the model itself: valid inputs of the right shape and scale."""
    records = module.sample(max(PROBE_BATCHES), torch.Generator().manual_seed(0)).numpy()
    return lambda rt, batch: rt.log_prob(np.resize(records, (batch, records.shape[1])))
