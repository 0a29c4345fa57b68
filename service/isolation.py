"""A request fails alone: the failure types a replica raises for one request (answered by the catalog as
model_error, overloaded or limit_exceeded), rerunning a failed batch one request at a time, and log-probabilities
made finite (JSON has no infinities)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

from genserve.artifacts.class_gaussians import ClassGaussians
from genserve.artifacts.neighbours import NeighbourIndex

log = logging.getLogger("ray.serve")
T = TypeVar("T")
R = TypeVar("R")


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


async def knn_distances(index: NeighbourIndex | ClassGaussians | None, inputs: np.ndarray) -> np.ndarray | None:
    """The raw distances of `inputs` under an artifact's neighbour index (the knn score, artifacts/neighbours.py)
    or class Gaussians (mahalanobis, artifacts/class_gaussians.py), on the CPU, in a worker thread (an exact
    search costs O(stored items) per input); None when the artifact has none."""
    if index is None:
        return None
    return await asyncio.to_thread(index.distance, inputs)


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

