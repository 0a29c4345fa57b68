"""The Ray Serve deployment that hosts one model of records (the records family: GMM, RealNVP, MADE-MoG on
continuous tabular data; one deployment per model, replicas set in config).

Requests from all clients are batched with `@serve.batch`: the records of every waiting request
are stacked into one forward pass and split back per request. The forward pass is row-wise, so a
record's result does not depend on what it was batched with; and if the pass raises, the batch's requests are
rerun one at a time, so only a request the model fails on gets the error (`RequestFailed`: 500 model_error).

Log-densities come back finite (JSON has no infinities): a record whose density underflows float64 or that the
model cannot evaluate (NaN) gets log p = LOG_PROB_FLOOR (-1e300), so it scores as maximally anomalous, and a
mixture's responsibilities for it are uniform (service.isolation.finite_log_probs, finite_responsibilities).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from pydantic import BaseModel, Field
from ray import serve

from genserve.service.devices import make_generator
from genserve.service.isolation import (
    RequestFailed,
    finite_log_probs,
    finite_responsibilities,
    knn_distances,
    reference_log_probs,
    run_isolated,
)
from genserve.service.metrics import MetricsClient
from genserve.service.records_runtime import load_model
from genserve.service.runtime_choice import RuntimeName, needs_reload, runtime_info

log = logging.getLogger("ray.serve")


class RecordsOptions(BaseModel):
    """Per-model settings, given as the deployment's `user_config` in the Serve config file;
    changing them on a running application takes effect without restarting replicas."""

    runtime: RuntimeName = Field(
        "auto", description="torch, onnx, or auto: the faster of the two for this model, timed at load "
        "(torch when the artifact has no graph)"
    )
    max_batch_size: int = Field(32, ge=1, description="most requests stacked into one forward pass")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="how long a batch waits to fill; 0: a batch "
                                         "is what queued while the last one ran, and a lone request never waits")
    score_in_gateway_below_ms: float = Field(
        1.0, ge=0, description="score in each Gateway replica itself, one Ray Serve hop fewer per request, when "
        "a CPU model there scores a batch of 32 records in less than this (ms); 0: always in this model's "
        "replicas (service/hosted.py)")


ScoreResult = tuple[np.ndarray, np.ndarray]  # log p(x) (N,), responsibilities (N, K)


class RecordsModelReplica:
    def __init__(self, artifact_path: str, runtime: RuntimeName | None = None, device: str | None = None):
        """Serve gives the artifact only; the Gateway, hosting a copy (service/hosted.py), the runtime and device
        the replica chose, so that both give the same numbers."""
        self.artifact_path = artifact_path
        self.options = RecordsOptions() if runtime is None else RecordsOptions(runtime=runtime)
        self.loaded = load_model(artifact_path, self.options.runtime, device)
        self.name = self.loaded.artifact.name
        self.metrics = MetricsClient(version=self.loaded.artifact.version)
        log.info("loaded %s v%s (%s on %s)", self.name, self.loaded.artifact.version,
                 self.loaded.runtime.name, self.loaded.runtime.device)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        options = RecordsOptions.model_validate(user_config or {})
        # Serve calls this right after __init__: reload only when the runtime really changes.
        if needs_reload(options.runtime, self.loaded.choice):
            self.loaded = load_model(self.artifact_path, options.runtime)
        self._score_batch.set_max_batch_size(options.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)
        self.options = options

    def info(self) -> dict[str, Any]:
        return {**runtime_info(self.loaded), "options": self.options.model_dump()}

    def ready(self) -> bool:
        return True

    async def score(self, records: np.ndarray) -> ScoreResult:
        """log p(x) and responsibilities for (N, D) records; batched with concurrent callers. Raises
        RequestFailed if the model fails on these records (and only then: not for its batch-mates')."""
        result = await self._score_batch(records)
        if isinstance(result, RequestFailed):
            raise result
        return result

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _score_batch(self, requests: list[np.ndarray]) -> list[ScoreResult | RequestFailed]:
        self.metrics.send([
            ("genserve_batch_size_requests", {"model": self.name}, len(requests)),
            ("genserve_batch_size_records", {"model": self.name}, sum(len(r) for r in requests)),
        ])
        return run_isolated(self.score_records, requests)

    def score_records(self, requests: list[np.ndarray]) -> list[ScoreResult]:
        """One forward pass for the records of all `requests`, split back per request."""
        log_prob, resp = self.loaded.runtime.log_prob(np.concatenate(requests))
        log_prob, resp = finite_log_probs(log_prob), finite_responsibilities(resp)
        bounds = np.cumsum([len(r) for r in requests])[:-1]
        return list(zip(np.split(log_prob, bounds), np.split(resp, bounds), strict=True))

    def reference_log_prob(self, records: np.ndarray) -> np.ndarray | None:
        """log p_ref(x) of (N, D) records under the artifact's reference Gaussian (likelihood-ratio scores);
        None when the artifact has none. Closed form and cheap: not batched."""
        return reference_log_probs(self.loaded.reference, records, np.float64)

    async def knn_distance(self, records: np.ndarray) -> np.ndarray | None:
        """Each record's distance to its k-th nearest training record (the knn score); None when the artifact
        has no neighbour index. A brute-force search over the stored records: off the event loop."""
        return await knn_distances(self.loaded.neighbours, records)

    def sample(self, n: int, seed: int | None) -> np.ndarray:
        return self.loaded.module.sample(n, make_generator("cpu", seed)).numpy()


RecordsDeployment = serve.deployment(
    RecordsModelReplica, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256, health_check_period_s=5
)
