"""The Ray Serve deployment that hosts one text model (one per model; replicas set in config).

Each replica runs one decoding `Engine` (service/decoding.py) on a thread of its own: requests
from every client are admitted into its slots between steps and decoded together, one batched
forward pass per step (continuous batching). The thread steps the engine for as long as it has
work and hands each step's updates to the replica's event loop, which keeps accepting requests
meanwhile. (A hop to a worker thread and back for every step cost 0.1-0.5 ms a token on a loaded
2-core machine, a third of a small model's step.)

`generate` is an async generator: the Gateway streams it through the handle. Its first item says
the request was accepted (or raises, before any response has started, so errors become a 4xx);
then come the engine's updates for this request. A caller that goes away cancels the request,
which frees its slots at the next step.

A request the engine fails alone (service/decoding.py: NaN logits, a forward pass that raises for it) gets a
`RequestFailed` with the cause; the other requests decode on. Only a step that fails outside that isolation
fails every request of the replica (503, retry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field
from ray import serve

from genserve.models.lm import score_token_lists
from genserve.service.decoding import Engine, GenerationParams, SequenceOutput, Update
from genserve.service.isolation import ReplicaBusy, RequestFailed, finite_log_probs
from genserve.service.metrics import MetricsClient
from genserve.service.runtime_choice import RuntimeName
from genserve.service.text_runtime import (
    LoadedTextModel,
    load_text_model,
    resolve_text_runtime,
    text_knn_distances,
)

log = logging.getLogger("ray.serve")
SCORE_LOGITS_BUDGET = 256 * 1024 * 1024  # bytes of float32 logits one scoring forward pass may hold


class TextOptions(BaseModel):
    """Per-model settings, the deployment's `user_config` in the Serve config file."""

    runtime: RuntimeName = Field("auto", description="decoding runtime: torch, onnx (ONNX Runtime on the artifact's "
                                 "graphs), or auto: torch (scoring always runs in torch)")
    slots: int = Field(16, ge=1, le=1024, description="sequences decoded together (the KV cache is sized for them)")
    max_waiting: int = Field(256, ge=0, description="requests queued beyond the slots; more are refused with 503")


class TextModelReplica:
    def __init__(self, artifact_path: str):
        self.artifact_path = artifact_path
        self.options = TextOptions()
        self.loaded: LoadedTextModel = load_text_model(artifact_path, self.options.runtime)
        self.name = self.loaded.artifact.name
        self.engine = self._new_engine()
        self.queues: dict[int, asyncio.Queue] = {}
        self.final_only: set[int] = set()  # requests that want only their final update
        self.loop: asyncio.AbstractEventLoop | None = None  # the replica's event loop, where updates are delivered
        self.decoder: threading.Thread | None = None
        self.wakeup = threading.Event()  # set when the engine may have new work
        self.metrics = MetricsClient(version=self.loaded.artifact.version)
        self.replica = str(os.getpid())  # outside Serve (tests) the process id will do
        with contextlib.suppress(Exception):
            self.replica = serve.get_replica_context().replica_id.unique_id
        log.info("loaded %s v%s (%s on %s)", self.name, self.loaded.artifact.version, self.loaded.runtime_name,
                 self.loaded.device)

    def _new_engine(self) -> Engine:
        return Engine(self.loaded.model, self.loaded.tokenizer, slots=self.options.slots)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        options = TextOptions.model_validate(user_config or {})
        changed = (options.runtime, options.slots) != (self.options.runtime, self.options.slots)
        self.options = options
        if changed:
            if self.engine.has_work:
                log.warning("%s: runtime/slots change waits for a restart of the replica (requests running)",
                            self.name)
                return
            if resolve_text_runtime(options.runtime) != self.loaded.runtime_name:
                self.loaded = load_text_model(self.artifact_path, options.runtime)
            self.engine = self._new_engine()

    def info(self) -> dict[str, Any]:
        return {"runtime": self.loaded.runtime_name, "device": self.loaded.device, "slots": self.engine.n_slots,
                "max_len": self.engine.max_len}

    def ready(self) -> bool:
        return True

    # ---- generation ------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], params: dict[str, Any],
                       stream: bool = True) -> AsyncIterator[dict[str, Any]]:
        """Yields {"accepted": True}, then one dict per engine update for this request:
        {"deltas": [...], "finished": bool, "outputs": [...] (when finished)}; with stream=False only
        the final one (each item is an object sent between processes: one per token costs)."""
        gen_params = GenerationParams(**params)
        if self.engine.num_waiting >= self.options.max_waiting:
            raise ReplicaBusy(f"model {self.name!r} has {self.engine.num_waiting} requests waiting; retry shortly")
        queue: asyncio.Queue = asyncio.Queue()
        request = self.engine.submit(prompt_ids, gen_params)  # ValueError: a request that can never run
        self.queues[request.id] = queue
        if not stream:
            self.final_only.add(request.id)
        self._ensure_loop()
        try:
            yield {"accepted": True, "prompt_tokens": len(prompt_ids)}
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item["finished"]:
                    return
        finally:
            self.queues.pop(request.id, None)
            self.final_only.discard(request.id)
            if not request.finished:
                self.engine.cancel(request)
                self.wakeup.set()

    def _ensure_loop(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.wakeup.set()
        if self.decoder is None or not self.decoder.is_alive():
            self.decoder = threading.Thread(target=self._decode, name=f"genserve-decode-{self.name}", daemon=True)
            self.decoder.start()

    def _decode(self) -> None:
        """The decoding thread: step while there is work, else sleep until a request (or a cancel) arrives.
        A request is queued in the engine before `wakeup` is set, so checking for work after waking misses none."""
        last_gauge = 0.0
        while True:
            engine = self.engine
            if not engine.has_work:
                self._send_gauges()
                self.wakeup.wait()
                self.wakeup.clear()
                continue
            try:
                updates = engine.step()
            except Exception as e:  # a failed step fails its requests, never the replica
                log.exception("%s: decoding step failed", self.name)
                self.engine = self._new_engine()  # a clean cache; whatever was queued gets the error
                self.loop.call_soon_threadsafe(self._fail_all, e)
                continue
            # Only what someone waits for wakes the event loop: a non-streamed request's updates before its last
            # would be dropped there anyway, and each wake-up takes the GIL from this thread.
            wanted = [u for u in updates if u.finished or u.request.id not in self.final_only]
            if wanted:
                self.loop.call_soon_threadsafe(self._deliver_all, wanted)
            now = time.monotonic()
            if now - last_gauge > 0.25:
                self._send_gauges()
                last_gauge = now

    def _deliver_all(self, updates: list[Update]) -> None:
        for update in updates:
            self._deliver(update)

    def _deliver(self, update: Update) -> None:
        request = update.request
        if request.error is not None:
            queue = self.queues.get(request.id)
            if queue is not None:
                queue.put_nowait(RequestFailed(f"model {self.name!r} failed on this request: {request.error}"))
            return
        item: dict[str, Any] = {"deltas": [d.__dict__ for d in update.deltas], "finished": update.finished}
        if update.finished:
            item["outputs"] = [_output_dict(o) for o in request.outputs]
            self._record(request)
        queue = self.queues.get(request.id)
        if queue is not None:
            queue.put_nowait(item)

    def _fail_all(self, error: Exception) -> None:
        failure = RuntimeError(f"decoding failed: {type(error).__name__}: {error}")
        for queue in self.queues.values():
            queue.put_nowait(failure)

    def _record(self, request) -> None:
        labels = {"model": self.name}
        events = [
            ("genserve_prompt_tokens_total", labels, len(request.prompt_ids)),
            ("genserve_generated_tokens_total", labels, request.generated_tokens),
        ]
        if request.first_token_at is not None:
            events.append(("genserve_time_to_first_token_seconds", labels, request.first_token_at - request.arrived))
            per_seq = max((len(o.token_ids) for o in request.outputs), default=0)
            if per_seq > 1 and request.finished_at is not None:
                events.append(("genserve_time_per_output_token_seconds", labels,
                               (request.finished_at - request.first_token_at) / (per_seq - 1)))
        self.metrics.send(events)

    def _send_gauges(self) -> None:
        labels = {"model": self.name, "replica": self.replica}
        self.metrics.send([
            ("genserve_requests_running", labels, self.engine.num_running),
            ("genserve_requests_waiting", labels, self.engine.num_waiting),
        ])

    # ---- scoring ---------------------------------------------------------------------------

    async def score(self, token_lists: list[list[int]]) -> list[list[float]]:
        """log p(token t | tokens < t) for t >= 1 of each list (the first token is the context,
        BOS for a whole text); one padded forward pass for all."""
        return await asyncio.to_thread(self._score, token_lists)

    @torch.inference_mode()
    def _score(self, token_lists: list[list[int]]) -> list[list[float]]:
        # Finite for JSON: a token the model rules out is reported at the floor (service.isolation.LOG_PROB_FLOOR).
        return [finite_log_probs(lps).tolist()
                for lps in score_token_lists(self.loaded.scorer, token_lists, SCORE_LOGITS_BUDGET)]

    async def reference_log_prob(self, token_lists: list[list[int]]) -> list[float] | None:
        """log p_ref(tokens[1:] | tokens[0]) of each list under the artifact's reference model (the
        likelihood-ratio score's denominator); None when the artifact has none."""
        if self.loaded.reference is None:
            return None
        return await asyncio.to_thread(self._reference, token_lists)

    async def knn_distance(self, token_lists: list[list[int]]) -> np.ndarray | None:
        """Each list's distance to the k-th nearest training line in the model's hidden-state space (the text
        knn score); None when the artifact has no index. One pass of the model, off the event loop."""
        if self.loaded.neighbours is None:
            return None
        return await asyncio.to_thread(text_knn_distances, self.loaded, token_lists)

    @torch.inference_mode()
    def _reference(self, token_lists: list[list[int]]) -> list[float]:
        return finite_log_probs([sum(lps) for lps in score_token_lists(self.loaded.reference, token_lists,
                                                                       SCORE_LOGITS_BUDGET)]).tolist()


def _output_dict(o: SequenceOutput) -> dict[str, Any]:
    return {
        "index": o.index, "text": o.text, "token_ids": o.token_ids, "logprobs": o.logprobs,
        "top_logprobs": o.top_logprobs, "finish_reason": o.finish_reason, "stop": o.stop_string, "score": o.score,
        "cumulative_logprob": o.cumulative_logprob if o.logprobs else 0.0,
    }


TextDeployment = serve.deployment(
    TextModelReplica, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=512, health_check_period_s=10
)
