"""The Ray Serve deployment that hosts one latent-variable image model: a VAE (density `bound`) or a GAN (`none`).

Neither factorises p(x) over pixels, so neither completes images or gives per-pixel conditionals; the Gateway
answers those requests with a 400 before they get here (service/services/images.py), and a GAN's log_prob and anomaly
too. What they do:
- VAE: `score` gives the importance-weighted lower bound on log p(x) with K samples per image (the request's K,
  else the model's `score_samples`, the K its calibration used), from a seeded generator so that the same request
  gives the same bound; `sample` draws z ~ N(0, I) and every pixel from p(x | z); `reconstruct` and `interpolate`
  decode posterior means;
- GAN: `sample` only.
Each request is scored on its own (no cross-request batching: the bound's noise is drawn per request, so one
request's answer never depends on what it was batched with), in a worker thread, one job at a time per replica.
torch only: these models have no ONNX graph. As for the other image models (service/image.py): bounds come back
finite (service.isolation.LOG_PROB_FLOOR), sampling is budgeted in pixels per replica (`max_queued_pixels`), a
job whose caller went away stops at its next pixel (VAE), and a job that fails fails alone (`RequestFailed`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from ray import serve

from genserve.artifacts import artifact as art
from genserve.artifacts.class_gaussians import ClassGaussians, load_class_gaussians
from genserve.artifacts.families import LATENT
from genserve.artifacts.neighbours import NeighbourIndex, load_neighbours
from genserve.artifacts.reference import load_reference
from genserve.artifacts.store import load_artifact_at
from genserve.models.registry import build_latent_model
from genserve.service.devices import make_generator, pick_device
from genserve.service.families import require_family
from genserve.service.image import (
    DEFAULT_QUEUED_PIXELS,
    QUEUED_PIXELS_DESCRIPTION,
    SamplingBudget,
    run_sampling_job,
)
from genserve.service.isolation import finite_log_probs, knn_distances, reference_log_probs
from genserve.service.metrics import MetricsClient
from genserve.service.runtime_choice import load_runtime

log = logging.getLogger("ray.serve")


class LatentOptions(BaseModel):
    """The deployment's `user_config`."""

    runtime: Literal["torch", "auto"] = Field("auto", description="torch (auto is torch: no ONNX graph)")
    max_queued_pixels: int = Field(DEFAULT_QUEUED_PIXELS, ge=1, description=QUEUED_PIXELS_DESCRIPTION)


class TorchLatentRuntime:
    """The bound on log p(x) of a latent-variable model's images, in torch (these models have no ONNX graph)."""

    name = "torch"

    def __init__(self, module: torch.nn.Module, device: str, score_samples: int):
        self.module, self.device, self.score_samples = module, device, score_samples

    def bound(self, images: np.ndarray, samples: int | None = None, seed: int | None = None) -> np.ndarray:
        """The importance-weighted bound with `samples` (K) per image, default the model's `score_samples` (the K
        its calibration used), drawn from `seed` (default 0): the same request gives the same bound."""
        generator = make_generator(self.device, 0 if seed is None else seed)
        x = torch.as_tensor(np.asarray(images, np.int64), device=self.device)
        with torch.inference_mode():
            bound = self.module.importance_bound(x, samples or self.score_samples, generator)
        return finite_log_probs(bound.double().cpu().numpy())

    def score(self, images: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, None]:
        """The bound at the model's K and seed 0, as the served default and the calibration; no per-pixel values."""
        return self.bound(images), None


@dataclass
class LoadedLatentModel:
    artifact: art.Artifact
    module: torch.nn.Module  # on `device`: a VAE, a GAN's generator, a flow on dequantised images
    runtime: TorchLatentRuntime
    device: str
    reference: torch.nn.Module | None = None  # likelihood-ratio reference model, on the CPU
    neighbours: NeighbourIndex | None = None  # the knn score's index of training images, on the CPU
    gaussians: ClassGaussians | None = None  # the mahalanobis score's class Gaussians, on the CPU

    @property
    def manifest(self) -> art.Manifest:
        return self.artifact.manifest


def load_latent_model(path: str, runtime: str = "auto", device: str | None = None) -> LoadedLatentModel:
    """Verify a latent-variable image artifact and load it on `device` (default CUDA when available, else the CPU),
    for serving or for in-process scoring (`genserve score --local`); torch only, as 'auto' is ('onnx' is refused:
    the artifact has no graph)."""
    loaded = load_artifact_at(path)
    require_family(loaded, LATENT)
    device = device or pick_device()
    kind = loaded.manifest.kind
    try:
        module = build_latent_model(kind, loaded.manifest.config)
    except (TypeError, ValueError) as e:
        raise art.ArtifactError(f"{loaded.path / art.MANIFEST}: invalid {kind} config ({e})") from None
    art.load_module_weights(module, loaded.contents[art.WEIGHTS], loaded.path / art.WEIGHTS)
    module = module.to(device).eval()
    score_samples = int(loaded.manifest.metrics.get("score_samples", 16))
    build = {"torch": lambda: TorchLatentRuntime(module, device, score_samples)}
    rt, _ = load_runtime(runtime, False, build, lambda rt, batch: (), loaded.path)  # no graph: no timing either
    return LoadedLatentModel(artifact=loaded, module=module, runtime=rt, device=device,
                             reference=load_reference(loaded), neighbours=load_neighbours(loaded),
                             gaussians=load_class_gaussians(loaded))


class LatentImageReplica:
    def __init__(self, artifact_path: str):
        self.loaded = load_latent_model(artifact_path)
        self.manifest = self.loaded.manifest
        self.name = self.manifest.name
        self.device = self.loaded.device
        self.module = self.loaded.module
        self.reference = self.loaded.reference
        self.score_samples = self.loaded.runtime.score_samples
        self.metrics = MetricsClient(version=self.manifest.version)
        self._busy = asyncio.Lock()  # one job at a time: each uses every thread torch has
        self.budget = SamplingBudget(self.name)
        log.info("loaded %s %s v%s (density %s, torch on %s)", self.manifest.kind, self.name,
                 self.manifest.version, self.manifest.density, self.device)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        options = LatentOptions.model_validate(user_config or {})  # refuses unknown or wrong settings
        self.budget.limit = options.max_queued_pixels

    def info(self) -> dict[str, Any]:
        return {"runtime": "torch", "device": self.device, "runtime_choice": None}

    def ready(self) -> bool:
        return True

    async def _run(self, fn, *args: Any) -> Any:
        """One job at a time; a failure is this request's alone (RequestFailed), a cancelled caller stops it."""
        return await run_sampling_job(self._busy, fn, *args)

    def _tensor(self, images: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(images, np.int64), device=self.device)

    async def score(self, images: np.ndarray, labels: np.ndarray | None, per_pixel: bool = False,
                    samples: int | None = None, seed: int | None = None) -> tuple[np.ndarray, None]:
        """The importance-weighted bound on log p(x) (N,) with `samples` (K) per image from `seed`
        (`TorchLatentRuntime.bound`); no per-pixel values, whatever `per_pixel` (the API refuses it before)."""
        result = await self._run(self.loaded.runtime.bound, images, samples, seed)
        self.metrics.send([("genserve_batch_size_requests", {"model": self.name}, 1),
                           ("genserve_batch_size_records", {"model": self.name}, len(images))])
        return result, None

    def reference_log_prob(self, images: np.ndarray) -> np.ndarray | None:
        return reference_log_probs(self.reference, images, np.int64)

    async def knn_distance(self, images: np.ndarray) -> np.ndarray | None:
        return await knn_distances(self.loaded.neighbours, images)

    async def mahalanobis_distance(self, images: np.ndarray) -> np.ndarray | None:
        return await knn_distances(self.loaded.gaussians, images)

    async def class_scores(self, images: np.ndarray) -> None:
        """Latent-variable image models are not class-conditional: no class evidence scores."""
        return None

    async def sample(self, n: int, labels: np.ndarray | None, seed: int | None) -> dict[str, Any]:
        """n images; a VAE's come with the bound on their log p(x) (at the model's K), a GAN's with none."""

        def draw() -> dict[str, Any]:
            generator = make_generator(self.device, seed)
            with torch.inference_mode():
                y = None if labels is None else torch.as_tensor(labels, device=self.device)
                if self.manifest.density == "none":  # a GAN's generator: labels from its class prior if not given
                    if y is None and self.module.n_classes:
                        y = self.module.draw_labels(n, generator)
                    images = self.module.sample(n, labels=y, generator=generator)
                    log_prob = None
                else:
                    images = self.module.sample(n, generator)
                    log_prob = self.module.importance_bound(images, self.score_samples, generator).double()
                return {"images": images.cpu().numpy().astype(np.int64),
                        "labels": None if y is None else y.cpu().numpy().astype(np.int64),
                        "log_prob": None if log_prob is None else finite_log_probs(log_prob.cpu().numpy())}

        with self.budget.hold(n, self.manifest.input.height * self.manifest.input.width):
            return await self._run(draw)

    async def reconstruct(self, images: np.ndarray) -> np.ndarray:
        """Each image through its posterior mean and back (the decoder's most likely levels)."""
        return await self._run(lambda: self.module.reconstruct(self._tensor(images)).cpu().numpy())

    async def interpolate(self, a: np.ndarray, b: np.ndarray, steps: int) -> np.ndarray:
        """`steps` images decoded from the posterior means on the line from a's to b's, both ends included."""
        return await self._run(lambda: self.module.interpolate(self._tensor(a), self._tensor(b), steps).cpu().numpy())


LatentImageDeployment = serve.deployment(
    LatentImageReplica, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64, health_check_period_s=5
)
