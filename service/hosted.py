"""Models of records scored in the Gateway itself: one Ray Serve hop fewer for the cheapest models.

A request normally crosses two hops: Serve's proxy to the Gateway, then the Gateway to the model's replica (a
handle call: the records pickled, sent over gRPC, routed, answered back). For a Gaussian mixture the second hop
costs far more than the model: about 7 ms against 0.03 ms for one record on 2 cores (docs/benchmarks.md). So when
a version of a records model is READY, each Gateway replica asks its replica which runtime and device it chose
(`info()`), loads the same artifact with that runtime, and times a batch of 32 records. If the runtime is on the
CPU and that batch takes less than the model's `score_in_gateway_below_ms` (its `user_config`, default 1 ms), the
Gateway answers `score`, `reference_log_prob`, `knn_distance` and `sample` for that version itself; otherwise, or
if anything in that fails, the replica does, as before.

The same runtime, the same artifact and the same row-wise pass give the same numbers as the replica (tests compare
them bit for bit). What changes:

- Hosted calls are not batched: a call costs less than batching's own bookkeeping, and each request is scored as
  it arrives. Calls of more than INLINE_ITEMS records run in a worker thread (both runtimes release the GIL), so
  a large request never holds the Gateway's event loop for long.
- A failure is still the request's alone (`run_isolated`, then the catalog's one mapping of failures).
- The Gateway holds the version's weights, neighbour index and reference model (small by the rule above) until
  the version leaves the routing table. It takes the options its replica reported when the version became READY.
- The replica stays: it answers readiness and `info()`, serves the version from other ingresses, and takes over
  if the Gateway replica restarts.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from genserve.service.isolation import RequestFailed, run_isolated

if TYPE_CHECKING:  # the catalog imports this module; Ray Serve and torch load with the first hosted model
    from genserve.service.records import RecordsModelReplica, ScoreResult

log = logging.getLogger("ray.serve")

HOSTED_METHODS = frozenset({"score", "reference_log_prob", "knn_distance", "sample"})
INLINE_ITEMS = 256  # larger calls go to a worker thread
PROBE_BATCH = 32
PROBE_CALLS = 7


class HostedRecordsModel:
    """A records model's replica methods, run in this (the Gateway's) process."""

    def __init__(self, replica: RecordsModelReplica, call_ms: float):
        self.replica = replica
        self.call_ms = call_ms  # the median time of a batch of PROBE_BATCH records here

    async def score(self, records: np.ndarray) -> ScoreResult:
        [result] = await _run(len(records), run_isolated, self.replica.score_records, [records])
        if isinstance(result, RequestFailed):
            raise result
        return result

    async def reference_log_prob(self, records: np.ndarray) -> np.ndarray | None:
        return await _run(len(records), self.replica.reference_log_prob, records)

    async def knn_distance(self, records: np.ndarray) -> np.ndarray | None:
        return await self.replica.knn_distance(records)  # a worker thread already

    async def sample(self, n: int, seed: int | None) -> np.ndarray:
        return await _run(n, self.replica.sample, n, seed)


async def _run(items: int, fn: Any, *args: Any) -> Any:
    if items > INLINE_ITEMS:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def probe_ms(replica: RecordsModelReplica) -> float:
    """The median milliseconds of a batch of PROBE_BATCH records (drawn from the model) through the full pass."""
    from genserve.service.records_runtime import probe_records

    records = probe_records(replica.loaded.module, PROBE_BATCH)
    replica.score_records([records])  # warm-up: first calls allocate
    times = []
    for _ in range(PROBE_CALLS):
        started = time.perf_counter()
        replica.score_records([records])
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def hosting_limit(info: dict[str, Any]) -> float | None:
    """The replica's `score_in_gateway_below_ms` when its `info()` allows a copy here (a CPU runtime, the option
    above 0), else None."""
    limit = float((info.get("options") or {}).get("score_in_gateway_below_ms") or 0)
    if limit <= 0 or info.get("device") != "cpu" or info.get("runtime") not in ("torch", "onnx"):
        return None
    return limit


async def host_records_model(handle: Any, location: str) -> HostedRecordsModel | None:
    """The version at `location` hosted here when its replica's runtime is on the CPU and a batch of 32 records
    scores here in less than its `score_in_gateway_below_ms`; else None (the replica scores it)."""
    from genserve.service.records import RecordsModelReplica

    info = await handle.info.remote()
    limit = hosting_limit(info)
    if limit is None:
        return None
    replica = await asyncio.to_thread(RecordsModelReplica, location, info["runtime"], "cpu")
    call_ms = await asyncio.to_thread(probe_ms, replica)
    what = f"{replica.name} v{replica.loaded.artifact.version}: a batch of {PROBE_BATCH} records takes " \
           f"{call_ms:.3f} ms here (limit {limit:g} ms)"
    if call_ms >= limit:
        log.info("%s; its replicas score it", what)
        return None
    log.info("%s; this Gateway scores it", what)
    return HostedRecordsModel(replica, call_ms)
