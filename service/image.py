"""The Ray Serve deployment that hosts one image model of the image family, autoregressive over pixels (one per
model; replicas set in config). Latent-variable image models have theirs in service/latent.py.

Scoring is batched with `@serve.batch`: the images of every waiting request are stacked into one pass
(requests that gave labels in one, requests that did not in another: a conditional model scores those
for the marginal over classes) and split back per request. Scoring is row-wise, so an image's result does
not depend on what it was batched with; if a batch's pass raises, its requests are rerun one at a time, so only
a request the model fails on gets the error (service.isolation.run_isolated). Log-probabilities come back
finite (an underflow or NaN at service.isolation.LOG_PROB_FLOOR): JSON has no infinities.

Sampling and completion run the torch sampler in a worker thread, one job at a time, so the replica keeps
answering health checks and scoring requests meanwhile; all images of one request are drawn in one batch,
seeded with a torch.Generator on the module's device (the same seed gives the same images on the same device).
Jobs are budgeted in pixels (`SamplingBudget`: images x height x width held per replica, `max_queued_pixels`), a
job whose caller goes away (a client that disconnects) stops at its next pixel, and a job that fails fails
alone (`RequestFailed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field
from ray import serve

from genserve.models.image import ImageModel, SamplingCancelled, cancellable
from genserve.service.devices import make_generator
from genserve.service.image_runtime import ImageScore, LoadedImageModel, image_class_scores, load_image_model
from genserve.service.isolation import (
    OverLimit,
    ReplicaBusy,
    RequestFailed,
    finite_log_probs,
    knn_distances,
    reference_log_probs,
    run_isolated,
)
from genserve.service.metrics import MetricsClient
from genserve.service.runtime_choice import RuntimeName, needs_reload, runtime_info

log = logging.getLogger("ray.serve")
DEFAULT_QUEUED_PIXELS = 1 << 20  # four requests at the default limits.max_image_pixels_per_request
QUEUED_PIXELS_DESCRIPTION = (
    "sampling budget of one replica: pixels (images x height x width) of the sample and complete jobs it holds, "
    "running and waiting; a job over the whole budget is refused with 400 limit_exceeded, one that does not fit "
    "beside those already held with 503 overloaded (retry)")


class SamplingBudget:
    """The pixels of the sampling jobs a replica holds (running and waiting) against its `max_queued_pixels`:
    sampling costs about images x pixels sequential steps, so a budget in pixels bounds the work queued."""

    def __init__(self, name: str, limit: int = DEFAULT_QUEUED_PIXELS):
        self.name, self.limit, self.held = name, limit, 0

    @contextlib.contextmanager
    def hold(self, images: int, pixels_each: int) -> Iterator[None]:
        pixels = images * pixels_each
        if pixels > self.limit:
            raise OverLimit(f"{images} images x {pixels_each} pixels = {pixels} pixels to sample exceed model "
                            f"{self.name!r}'s sampling budget of {self.limit} pixels per replica (deployment option "
                            "max_queued_pixels); ask for fewer images")
        if self.held + pixels > self.limit:
            raise ReplicaBusy(f"model {self.name!r} is sampling {self.held} pixels; {pixels} more would exceed its "
                              f"sampling budget of {self.limit} pixels per replica (deployment option "
                              "max_queued_pixels)")
        self.held += pixels
        try:
            yield
        finally:
            self.held -= pixels


async def run_sampling_job(lock: asyncio.Lock, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a worker thread once `lock` is free (one job at a time per replica). If the caller goes
    away (Serve cancels the call when the HTTP client disconnects), the job stops at its next pixel and the
    lock is held until it has; if the job raises, the request fails alone (RequestFailed)."""
    cancel = threading.Event()

    def job() -> Any:
        with cancellable(cancel):
            return fn(*args)

    async with lock:
        running = asyncio.ensure_future(asyncio.to_thread(job))
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            cancel.set()
            with contextlib.suppress(BaseException):
                await running
            log.info("a sampling job was cancelled: its caller went away")
            raise
        except SamplingCancelled:
            raise
        except Exception as e:
            log.warning("a sampling job failed alone: %s: %s", type(e).__name__, e)
            raise RequestFailed(f"sampling failed: {type(e).__name__}: {e}") from None


class ImageOptions(BaseModel):
    """Per-model settings, the deployment's `user_config` in the Serve config file; changes take effect
    without restarting replicas."""

    runtime: RuntimeName = Field("auto", description="scoring runtime: torch, onnx, or auto (the faster of the "
                                 "two for this model, timed at load; torch when the artifact has no model.onnx); "
                                 "sampling always runs in torch")
    max_batch_size: int = Field(32, ge=1, description="most scoring requests stacked into one pass")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="how long a scoring batch waits to fill; 0: a "
                                         "batch is what queued while the last one ran, and a lone request never waits")
    max_queued_pixels: int = Field(DEFAULT_QUEUED_PIXELS, ge=1, description=QUEUED_PIXELS_DESCRIPTION)


def draw_images(module: ImageModel, n: int, labels: np.ndarray | None, seed: int | None,
                prefix: np.ndarray | None = None, known: int = 0) -> dict[str, Any]:
    """Sample `n` images (or complete the `prefix` images, keeping their first `known` raster-order pixels),
    all in one batch. A conditional model given no labels draws them (`ImageModel.sample`): from the class
    prior for samples, from the posterior given the known pixels for completions. Returns numpy images
    (N, H, W), labels (N,) or None, and each image's exact log p(x | label) (log p(x) if unconditional)."""
    device = module.class_log_prior.device
    generator = make_generator(device, seed)
    with torch.inference_mode():
        y = None if labels is None else torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
        x = None if prefix is None else torch.as_tensor(np.asarray(prefix, dtype=np.int64), device=device)
        images, y = module.sample(n=n, labels=y, generator=generator, prefix=x, known=known)
        log_prob, _ = module.score(images, y)
        return {"images": images.cpu().numpy().astype(np.int64),
                "labels": None if y is None else y.cpu().numpy().astype(np.int64),
                "log_prob": finite_log_probs(log_prob.double().cpu().numpy())}


def score_requests(loaded: LoadedImageModel, requests: list[tuple[np.ndarray, np.ndarray | None]]) -> list[ImageScore]:
    """Score a batch of requests: those with labels in one pass, those without in another."""
    results: list[ImageScore | None] = [None] * len(requests)
    for with_labels in (True, False):
        group = [i for i, (_, labels) in enumerate(requests) if (labels is not None) == with_labels]
        if not group:
            continue
        images = np.concatenate([requests[i][0] for i in group])
        labels = np.concatenate([requests[i][1] for i in group]) if with_labels else None
        log_prob, pixels = loaded.runtime.score(images, labels)
        log_prob, pixels = finite_log_probs(log_prob), finite_log_probs(pixels)
        bounds = np.cumsum([len(requests[i][0]) for i in group])[:-1]
        for i, lp, px in zip(group, np.split(log_prob, bounds), np.split(pixels, bounds), strict=True):
            results[i] = (lp, px)
    return results  # type: ignore[return-value]


class PixelImageReplica:
    def __init__(self, artifact_path: str):
        self.artifact_path = artifact_path
        self.options = ImageOptions()
        self.loaded = load_image_model(artifact_path, self.options.runtime)
        self.name = self.loaded.artifact.name
        self.metrics = MetricsClient(version=self.loaded.artifact.version)
        # One sampling job at a time per replica: each already uses every thread torch has, and jobs run
        # side by side would only slow each other; the others wait their turn (max_ongoing_requests bounds them).
        self._sampling = asyncio.Lock()
        self.budget = SamplingBudget(self.name)
        log.info("loaded image model %s v%s (%s on %s)", self.name, self.loaded.artifact.version,
                 self.loaded.runtime.name, self.loaded.device)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        options = ImageOptions.model_validate(user_config or {})
        # Serve calls this right after __init__: reload only when the runtime really changes.
        if needs_reload(options.runtime, self.loaded.choice):
            self.loaded = load_image_model(self.artifact_path, options.runtime)
        self._score_batch.set_max_batch_size(options.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)
        self.budget.limit = options.max_queued_pixels
        self.options = options

    def info(self) -> dict[str, Any]:
        return runtime_info(self.loaded)

    def ready(self) -> bool:
        return True

    async def score(self, images: np.ndarray, labels: np.ndarray | None, per_pixel: bool = False,
                    samples: int | None = None, seed: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """log p(x [| y]) (N,) and, if `per_pixel`, the per-pixel conditionals (N, H, W) of int64 images
        (N, H, W) (else None: not shipped back); labels None: the marginal over classes for a conditional
        model. Batched with concurrent callers; RequestFailed if the model fails on these images (alone).
        `samples` and `seed` are a bound's (service/replicas.py's one call shape for image models): log p(x) is
        exact here, and the API refuses them before."""
        result = await self._score_batch((images, labels))
        if isinstance(result, RequestFailed):
            raise result
        log_prob, pixels = result
        return log_prob, pixels if per_pixel else None

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _score_batch(self, requests: list[tuple[np.ndarray, np.ndarray | None]]
                           ) -> list[ImageScore | RequestFailed]:
        loaded = self.loaded
        results = await asyncio.to_thread(run_isolated, lambda batch: score_requests(loaded, batch), requests)
        self.metrics.send([
            ("genserve_batch_size_requests", {"model": self.name}, len(requests)),
            ("genserve_batch_size_records", {"model": self.name}, sum(len(r[0]) for r in requests)),
        ])
        return results

    def reference_log_prob(self, images: np.ndarray) -> np.ndarray | None:
        """log p_ref(x) of int64 images (N, H, W) under the artifact's local-neighbourhood reference model
        (likelihood-ratio scores); None when the artifact has none. A table lookup: not batched."""
        return reference_log_probs(self.loaded.reference, images, np.int64)

    async def knn_distance(self, images: np.ndarray) -> np.ndarray | None:
        """Each image's distance to its k-th nearest training image (the knn score); None when the artifact has
        no neighbour index. A brute-force search over the stored images: off the event loop."""
        return await knn_distances(self.loaded.neighbours, images)

    async def mahalanobis_distance(self, images: np.ndarray) -> np.ndarray | None:
        """Each image's distance to the nearest training class's Gaussian (the mahalanobis score); None when the
        artifact has no class Gaussians. Off the event loop."""
        return await knn_distances(self.loaded.gaussians, images)

    async def class_scores(self, images: np.ndarray) -> dict[str, np.ndarray] | None:
        """The class-conditional evidence scores (class_evidence, class_entropy) of int64 images (N, H, W): one
        pass of the model per class, off the event loop, not batched; None when the model is not
        class-conditional. RequestFailed if the model fails on these images (alone)."""
        loaded = self.loaded
        if not loaded.module.n_classes:
            return None
        try:
            return await asyncio.to_thread(image_class_scores, loaded, images)
        except Exception as e:
            log.warning("class scores failed alone: %s: %s", type(e).__name__, e)
            raise RequestFailed(f"the model failed on this request: {type(e).__name__}: {e}") from None

    async def sample(self, n: int, labels: np.ndarray | None, seed: int | None) -> dict[str, Any]:
        """n images in one batch; see `draw_images`."""
        with self.budget.hold(n, self.loaded.module.n_pixels):
            return await run_sampling_job(self._sampling, draw_images, self.loaded.module, n, labels, seed)

    async def complete(self, images: np.ndarray, known: int, n: int, labels: np.ndarray | None,
                       seed: int | None) -> dict[str, Any]:
        """n completions of each image (its first `known` raster-order pixels kept), all in one batch: each
        input (and its label) is repeated n times in a row, so completion j of image i is row i * n + j."""
        prefix = np.repeat(images, n, axis=0)
        repeated = None if labels is None else np.repeat(labels, n)
        with self.budget.hold(len(prefix), self.loaded.module.n_pixels):
            return await run_sampling_job(self._sampling, draw_images, self.loaded.module, len(prefix), repeated,
                                          seed, prefix, known)


ImageDeployment = serve.deployment(
    PixelImageReplica, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256, health_check_period_s=5
)
