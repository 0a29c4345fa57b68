"""Prometheus metrics that stay right however many replicas (and ingress replicas) there are.

Every replica is its own process, so a per-process prometheus_client registry would show one
replica's share on each scrape. Instead replicas send their increments, fire-and-forget, to one
named Ray actor that owns the registry; `GET /metrics` renders that actor's registry. The actor is
detached so counters survive redeployments of the application, as Prometheus expects.
"""

from __future__ import annotations

import logging
import logging.handlers
import threading
import time
from typing import Any

import ray
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

ACTOR_NAME = "genserve-metrics"
NAMESPACE = "genserve"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
RECORD_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)

log = logging.getLogger(__name__)

# name -> (type, help, labels, buckets)
DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...], tuple[float, ...] | None]] = {
    "genserve_requests_total": ("counter", "HTTP requests by model, endpoint and status code",
                                ("model", "endpoint", "status"), None),
    "genserve_request_latency_seconds": ("histogram", "Time from request to response at the ingress",
                                         ("model", "endpoint"), LATENCY_BUCKETS),
    "genserve_records_scored_total": ("counter", "Records scored by log_prob and anomaly",
                                      ("model", "endpoint"), None),
    "genserve_anomalies_flagged_total": ("counter", "Records flagged as anomalies", ("model",), None),
    "genserve_samples_total": ("counter", "Samples generated", ("model",), None),
    "genserve_batch_size_requests": ("histogram", "Requests per batched forward pass",
                                     ("model",), BATCH_BUCKETS),
    "genserve_batch_size_records": ("histogram", "Records per batched forward pass",
                                    ("model",), RECORD_BUCKETS),
    "genserve_prompt_tokens_total": ("counter", "Prompt tokens of finished generation requests", ("model",), None),
    "genserve_generated_tokens_total": ("counter", "Tokens generated, over all samples and returned beams",
                                        ("model",), None),
    "genserve_time_to_first_token_seconds": ("histogram", "From a generation request's arrival at the replica to "
                                             "its first token", ("model",), LATENCY_BUCKETS),
    "genserve_time_per_output_token_seconds": ("histogram", "Mean time between a request's output tokens after "
                                               "the first", ("model",), TOKEN_BUCKETS),
    "genserve_requests_running": ("gauge", "Generation requests being decoded, per replica", ("model", "replica"),
                                  None),
    "genserve_requests_waiting": ("gauge", "Generation requests queued for decoding slots, per replica",
                                  ("model", "replica"), None),
    "genserve_texts_scored_total": ("counter", "Texts scored", ("model",), None),
    "genserve_requests_rejected_total": ("counter", "Requests refused before reaching a model, by reason: "
                                         "unauthenticated, forbidden, requests_per_second, "
                                         "generated_tokens_per_minute, too_large, unsupported_media_type, "
                                         "unavailable", ("model", "reason"), None),
    "genserve_model_version_ready": ("gauge", "1 while a model version is READY (serving), else 0",
                                     ("model", "version"), None),
    "genserve_model_traffic_percent": ("gauge", "Percent of a model's unversioned requests sent to each version",
                                       ("model", "version"), None),
    "genserve_model_load_failures_total": ("counter", "Model versions that failed to load (corrupt, incompatible, "
                                           "out of memory, ...)", ("model", "version"), None),
}


def _labelled_by_version(definitions: dict[str, tuple]) -> None:
    """Every metric of a model's requests is labelled by the version that served them too, so a dashboard compares
    the versions of a canary split; events sent without one (a request that reached no model) have version ""."""
    for name, (kind, doc, labels, buckets) in list(definitions.items()):
        if "model" in labels and "version" not in labels and name != "genserve_requests_rejected_total":
            definitions[name] = (kind, doc, (*labels, "version"), buckets)


_labelled_by_version(DEFINITIONS)

Event = tuple[str, dict[str, str], float]  # metric name, labels, value (increment or observation)


@ray.remote(num_cpus=0, max_restarts=-1)
class MetricsAggregator:
    def __init__(self) -> None:
        disable_created_metrics()  # the _created series only double the exposition
        self.registry = CollectorRegistry()
        self.metrics: dict[str, Any] = {}
        for name, (kind, doc, labels, buckets) in DEFINITIONS.items():
            if kind == "counter":
                # prometheus_client appends _total itself.
                self.metrics[name] = Counter(name.removesuffix("_total"), doc, labels, registry=self.registry)
            elif kind == "gauge":
                self.metrics[name] = Gauge(name, doc, labels, registry=self.registry)
            else:
                self.metrics[name] = Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

    def record(self, events: list[Event]) -> None:
        for name, labels, value in events:
            if "version" in DEFINITIONS[name][2] and "version" not in labels:
                labels = {**labels, "version": ""}
            metric = self.metrics[name].labels(**labels)
            kind = DEFINITIONS[name][0]
            if kind == "counter":
                metric.inc(value)
            elif kind == "gauge":
                metric.set(value)
            else:
                metric.observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def aggregator() -> ray.actor.ActorHandle:
    """The cluster's one aggregator, created by whichever replica asks first."""
    return MetricsAggregator.options(
        name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


FLUSH_INTERVAL_S = 0.1  # how long a replica holds metric events before sending them, at most
LOG_FLUSH_INTERVAL_S = 1.0  # how long a replica's Serve log lines (the access log among them) wait, at most
_log_flusher: threading.Thread | None = None


def start_log_flusher(interval_s: float = LOG_FLUSH_INTERVAL_S) -> None:
    """Flush this process's Ray Serve log buffers every `interval_s`. Serve's throughput settings buffer log
    lines until 1000 are held (SERVE_ENV, RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE), which at low traffic would
    keep the access log and the replicas' request lines from the files for a long time; a flush a second keeps
    the writes batched and the logs at most a second behind. Idempotent per process."""
    global _log_flusher
    if _log_flusher is not None:
        return

    def flush_forever() -> None:
        serve_logger = logging.getLogger("ray.serve")
        while True:
            time.sleep(interval_s)
            for handler in serve_logger.handlers:
                if isinstance(handler, logging.handlers.MemoryHandler):
                    handler.flush()

    _log_flusher = threading.Thread(target=flush_forever, name="genserve-log-flush", daemon=True)
    _log_flusher.start()


class MetricsClient:
    """What replicas use: `send` never waits, and a metrics failure never fails a request.

    Events are held for up to FLUSH_INTERVAL_S and sent together from a background thread, one actor
    call per interval instead of one per request: on a loaded 2-core machine, a Gateway sending no
    metrics at all served 101 against 66 log_prob requests/s in a one-off A/B (bench/fixes.md).
    So the exposition lags the replicas by up to that long; `flush` sends what is held at once."""

    def __init__(self, flush_interval_s: float = FLUSH_INTERVAL_S, version: str | None = None) -> None:
        """`version`: a model replica's version, added to each of its events that names the model only."""
        start_log_flusher()
        self.version = version  # every replica has a MetricsClient: its logs are flushed as its metrics are
        self._actor: ray.actor.ActorHandle | None = None
        self.flush_interval_s = flush_interval_s
        self._pending: list[Event] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._sender: threading.Thread | None = None

    def _handle(self) -> ray.actor.ActorHandle:
        if self._actor is None:
            self._actor = aggregator()
        return self._actor

    def send(self, events: list[Event]) -> None:
        if not events:
            return
        if self.version is not None:
            events = [(n, {**labels, "version": self.version} if "model" in labels and "version" not in labels
                       and "version" in DEFINITIONS[n][2] else labels, v) for n, labels, v in events]
        with self._lock:
            self._pending.extend(events)
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_periodically, name="genserve-metrics", daemon=True)
                self._sender.start()
        self._wake.set()

    def flush(self) -> None:
        with self._lock:
            events, self._pending = self._pending, []
        if not events:
            return
        try:
            self._handle().record.remote(events)
        except Exception:  # the aggregator restarting: drop these increments, keep serving
            log.warning("could not record %d metric events", len(events), exc_info=True)
            self._actor = None

    def _send_periodically(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            time.sleep(self.flush_interval_s)  # let the interval's other events join these
            self.flush()

    async def render(self) -> bytes:
        self.flush()  # this replica's own events first (actor calls from one caller run in order)
        return await self._handle().render.remote()
