"""The image routes of the ingress: checking images, labels and limits, and asking the model's replica to
score, sample or complete. `ImageRoutes` is mixed into the Gateway (service/app.py), whose log_prob, anomaly
and sample routes hand image models to it; POST /v1/models/{name}/complete is its own route here.

Every check happens here, before a request reaches a replica: a bad image never joins a batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from genserve.artifacts import artifact as art
from genserve.models.registry import LATENT_KINDS
from genserve.service.errors import ERRORS, ApiError, model_kind_phrase, require_density
from genserve.service.image_codec import MAX_PNG_LEVELS, ImageInputError, decode_image, encode_png
from genserve.service.runtime import failure_message, is_over_limit, is_replica_busy, is_request_failure
from genserve.service.schemas import (
    AnomalyRequest,
    CompleteRequest,
    CompleteResponse,
    GeneratedImage,
    ImageSampleResponse,
    InterpolateRequest,
    InterpolateResponse,
    LogProbRequest,
    ReconstructRequest,
    ReconstructResponse,
    SampleRequest,
)

router = APIRouter()

def generated_images(result: dict[str, Any], format_: str, levels: int) -> list[GeneratedImage]:
    """A replica's sampled images (numpy: images, labels, log_prob) as the API's image objects."""
    labels = result["labels"]
    log_probs = [None] * len(result["images"]) if result.get("log_prob") is None else result["log_prob"].tolist()
    out = []
    for i, (image, log_prob) in enumerate(zip(result["images"], log_probs, strict=True)):
        label = None if labels is None else int(labels[i])
        if format_ == "png":
            out.append(GeneratedImage(label=label, log_prob=log_prob, png=encode_png(image, levels)))
        else:
            out.append(GeneratedImage(label=label, log_prob=log_prob, array=image.tolist()))
    return out


class ImageRoutes:
    """Mixed into the Gateway, which provides manifests, handles, limits and _manifest()."""

    def _image_manifest(self, name: str, endpoint: str) -> art.Manifest:
        manifest = self._manifest(name)
        if manifest.input.type != "image":
            images = ", ".join(n for n, m in sorted(self.manifests.items()) if m.input.type == "image") or "none"
            raise ApiError(400, "wrong_model_kind", f"{endpoint} is for image models; "
                           f"{model_kind_phrase(name, manifest)}; image models: {images}")
        return manifest

    def _images(self, name: str, images: list[Any], known: int | None = None) -> np.ndarray:
        spec = self.manifests[name].input
        limit = self.limits.max_images_per_request
        if len(images) > limit:
            raise ApiError(413, "limit_exceeded", f"{len(images)} images in one request; the limit is {limit} per "
                           "request (limits.max_images_per_request)")
        try:
            return np.stack([decode_image(image, f"images[{i}]", spec.height, spec.width, spec.levels, known)
                             for i, image in enumerate(images)])
        except ImageInputError as e:
            raise ApiError(400, e.type, f"{e.message} (model {name!r})") from None

    def _labels(self, name: str, labels: list[int] | None, n: int, field: str = "labels") -> np.ndarray | None:
        """Labels as given (checked against the model), or None."""
        if labels is None:
            return None
        spec = self.manifests[name].input
        if not spec.n_classes:
            raise ApiError(400, "invalid_label", f"model {name!r} is not class-conditional: give no {field}")
        if len(labels) != n:
            raise ApiError(400, "invalid_label", f"{field} has {len(labels)} entries; give one per image ({n})")
        for i, label in enumerate(labels):
            if not 0 <= label < spec.n_classes:
                where = field if field == "label" else f"{field}[{i}]"
                names = ""
                if spec.class_names:
                    shown = ", ".join(f"{j}={c}" for j, c in enumerate(spec.class_names[:12]))
                    names = f" ({shown}{', ...' if len(spec.class_names) > 12 else ''})"
                raise ApiError(400, "invalid_label", f"{where}={label} is out of range; model {name!r}'s labels are "
                               f"0..{spec.n_classes - 1}{names}")
        return np.asarray(labels, dtype=np.int64)

    def _check_sampling_cost(self, name: str, images: int, what: str) -> None:
        """Sampling costs about images x pixels model steps: a 400 past limits.max_image_pixels_per_request."""
        spec = self.manifests[name].input
        pixels = images * spec.height * spec.width
        limit = self.limits.max_image_pixels_per_request
        if pixels > limit:
            raise ApiError(400, "limit_exceeded", f"{what} x {spec.height}x{spec.width} pixels = {pixels} pixels to "
                           f"sample; the limit is {limit} per request (limits.max_image_pixels_per_request)")

    def _check_format(self, name: str, format_: str) -> None:
        levels = self.manifests[name].input.levels
        if format_ == "png" and levels > MAX_PNG_LEVELS:
            raise ApiError(400, "invalid_request", f"format png needs at most {MAX_PNG_LEVELS} levels; model "
                           f"{name!r} has {levels}: use format array")

    async def _image_call(self, name: str, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.handles[name], method).remote(*args)
        except Exception as e:
            raise self._replica_error(name, method.replace("_", " "), e) from e

    def _replica_error(self, name: str, action: str, e: Exception) -> ApiError:
        """A failed replica call as the API's error (for every kind of model): 500 model_error when the model
        failed on this request alone (its batch-mates were answered; a retry fails the same way), 503 overloaded
        when the replica's queue is over a limit (400 limit_exceeded when the request alone is), else 503
        model_unavailable (the replica failed or is gone; Serve retries elsewhere when it can)."""
        if is_replica_busy(e):  # first: a replica out of memory on one request is busy, not the request's fault
            return ApiError(503, "overloaded", f"{failure_message(e)}; retry shortly")
        if is_request_failure(e):
            return ApiError(500, "model_error", f"model {name!r} could not {action} this request: "
                            f"{failure_message(e)}")
        if is_over_limit(e):
            return ApiError(400, "limit_exceeded", failure_message(e))
        return ApiError(503, "model_unavailable", f"model {name!r} could not {action} this request: "
                        f"{type(e).__name__}; retry shortly")

    async def _image_log_prob(self, name: str, body: LogProbRequest | AnomalyRequest,
                              endpoint: str) -> tuple[np.ndarray, ...]:
        manifest = self._image_manifest(name, endpoint)
        if body.records is not None:
            raise ApiError(400, "wrong_model_kind", f"records are for models of records; "
                           f"{model_kind_phrase(name, manifest)}")
        if getattr(body, "responsibilities", False):
            raise ApiError(400, "wrong_model_kind", f"responsibilities is for GMMs; "
                           f"{model_kind_phrase(name, manifest)}")
        require_density(name, manifest, endpoint)
        per_pixel = bool(getattr(body, "per_pixel", False))
        samples, seed = getattr(body, "importance_samples", None), getattr(body, "seed", None)
        if manifest.kind in LATENT_KINDS:
            if per_pixel:
                raise ApiError(400, "wrong_model_kind", f"per_pixel needs a model that factorises p(x) over pixels; "
                               f"model {name!r} is a {manifest.kind} (a latent-variable model): its log_prob is a "
                               "bound on the whole image")
        elif samples is not None or seed is not None:
            raise ApiError(400, "wrong_model_kind", f"importance_samples and seed are for models whose density is a "
                           f"bound (VAEs); model {name!r} is a {manifest.kind}, whose log_prob is exact")
        images = self._images(name, body.images)
        labels = self._labels(name, body.labels, len(images))
        if manifest.kind in LATENT_KINDS:
            log_prob, pixels = await self._image_call(name, "score", images, labels, False, samples, seed)
        else:
            log_prob, pixels = await self._image_call(name, "score", images, labels, per_pixel)
        return images, log_prob, pixels

    async def _sample_images(self, name: str, m: art.Manifest, body: SampleRequest,
                             request: Request) -> ImageSampleResponse:
        spec = m.input
        limit = self.limits.max_images_per_request
        if body.n > limit:
            raise ApiError(413, "limit_exceeded", f"n={body.n} images asked for; the limit is {limit} per request "
                           "(limits.max_images_per_request)")
        self._check_sampling_cost(name, body.n, f"n={body.n} images")
        if body.label is not None:
            labels = self._labels(name, [body.label], 1, "label")
            labels = None if labels is None else np.repeat(labels, body.n)
        else:
            labels = self._labels(name, body.labels, body.n)
        self._check_format(name, body.format)
        result = await self._image_call(name, "sample", body.n, labels, body.seed)
        request.state.metric_events = [("genserve_samples_total", {"model": name}, body.n)]
        return ImageSampleResponse(model=name, version=m.version, height=spec.height, width=spec.width,
                                   levels=spec.levels, images=generated_images(result, body.format, spec.levels))

    @router.post("/v1/models/{name}/complete", name="complete", response_model=CompleteResponse,
              tags=["images"], responses=ERRORS)
    async def complete(self, name: str, body: CompleteRequest, request: Request) -> CompleteResponse:
        """Complete partial images: keep each image's top known_rows rows (or first known_pixels pixels in raster
        order) exactly and sample the rest from the model given them, n completions per image; the same seed
        gives the same completions. A class-conditional model given no labels draws each completion's label
        from p(label | known pixels), so completions come from the model's marginal."""
        m = self._image_manifest(name, "complete")
        if m.kind in LATENT_KINDS:
            raise ApiError(400, "wrong_model_kind", f"completion needs a model that factorises p(x) over pixels in "
                           f"raster order; model {name!r} is a {m.kind} (a latent-variable model): use sample")
        spec = m.input
        limit = self.limits.max_images_per_request
        total = len(body.images) * body.n
        if total > limit:
            raise ApiError(413, "limit_exceeded", f"{len(body.images)} images x n={body.n} = {total} completions; "
                           f"the limit is {limit} per request (limits.max_images_per_request)")
        self._check_sampling_cost(name, total, f"{total} completions")
        if body.known_rows is not None:
            if body.known_rows > spec.height:
                raise ApiError(400, "invalid_request", f"known_rows={body.known_rows} is out of range: model "
                               f"{name!r}'s images have {spec.height} rows; allowed 0..{spec.height}")
            known = body.known_rows * spec.width
        else:
            n_pixels = spec.height * spec.width
            if body.known_pixels > n_pixels:
                raise ApiError(400, "invalid_request", f"known_pixels={body.known_pixels} is out of range: model "
                               f"{name!r}'s images have {spec.height}x{spec.width} = {n_pixels} pixels; allowed "
                               f"0..{n_pixels}")
            known = body.known_pixels
        images = self._images(name, body.images, known)
        labels = self._labels(name, body.labels, len(images))
        self._check_format(name, body.format)
        result = await self._image_call(name, "complete", images, known, body.n, labels, body.seed)
        request.state.metric_events = [("genserve_samples_total", {"model": name}, total)]
        flat = generated_images(result, body.format, spec.levels)
        return CompleteResponse(model=name, version=m.version, height=spec.height, width=spec.width,
                                levels=spec.levels, known_pixels=known,
                                completions=[flat[i * body.n:(i + 1) * body.n] for i in range(len(images))])

    def _vae_manifest(self, name: str, endpoint: str) -> art.Manifest:
        manifest = self._image_manifest(name, endpoint)
        if manifest.kind != "vae":
            raise ApiError(400, "wrong_model_kind", f"{endpoint} needs an encoder: it is for VAEs; "
                           f"{model_kind_phrase(name, manifest)}")
        return manifest

    @router.post("/v1/models/{name}/reconstruct", name="reconstruct", response_model=ReconstructResponse,
                 tags=["images"], responses=ERRORS)
    async def reconstruct(self, name: str, body: ReconstructRequest, request: Request) -> ReconstructResponse:
        """VAEs: each image encoded to its posterior mean and decoded back (every pixel's most likely level)."""
        m = self._vae_manifest(name, "reconstruct")
        images = self._images(name, body.images)
        self._check_format(name, body.format)
        out = await self._image_call(name, "reconstruct", images)
        request.state.metric_events = [("genserve_samples_total", {"model": name}, len(images))]
        result = {"images": out, "labels": None, "log_prob": None}
        return ReconstructResponse(model=name, version=m.version,
                                   images=generated_images(result, body.format, m.input.levels))

    @router.post("/v1/models/{name}/interpolate", name="interpolate", response_model=InterpolateResponse,
                 tags=["images"], responses=ERRORS)
    async def interpolate(self, name: str, body: InterpolateRequest, request: Request) -> InterpolateResponse:
        """VAEs: `steps` images on the straight line in latent space between two images' posterior means, both
        ends included, each decoded to its most likely levels."""
        m = self._vae_manifest(name, "interpolate")
        images = self._images(name, body.images)
        self._check_format(name, body.format)
        out = await self._image_call(name, "interpolate", images[0], images[1], body.steps)
        request.state.metric_events = [("genserve_samples_total", {"model": name}, body.steps)]
        result = {"images": out, "labels": None, "log_prob": None}
        return InterpolateResponse(model=name, version=m.version,
                                   images=generated_images(result, body.format, m.input.levels))
