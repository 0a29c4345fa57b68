"""Image models, autoregressive over pixels (PixelCNN, MADE, NADE, FVSBN) or latent (VAE, GAN, a flow on
dequantised images): checking images, labels and every limit, then exact log p(x) (a bound for latent models),
sampling, completion, and a VAE's reconstruction and interpolation. Every check happens here, before a request
reaches a replica: a bad image never joins a batch. Protocol-neutral: /v1 and /v2 both call it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from genserve.artifacts import artifact as art
from genserve.artifacts.families import LATENT
from genserve.service.catalog import ModelCatalog, kind_phrase
from genserve.service.errors import InvalidInput, LimitExceeded, TooLarge, WrongKind
from genserve.service.image_codec import MAX_PNG_LEVELS, ImageInputError, decode_image


@dataclass
class ImageScores:
    images: np.ndarray  # (N, H, W) int64 levels, as scored
    log_prob: np.ndarray  # (N,) nats: exact, or a latent model's bound
    per_pixel: np.ndarray | None  # (N, H, W) conditionals log p(x_i | x_<i [, y]) when asked


@dataclass
class GeneratedImages:
    images: np.ndarray  # (N, H, W) int64 levels
    labels: np.ndarray | None
    log_prob: np.ndarray | None  # None where the model gives none (a GAN; reconstructions)


def generated(result: dict[str, Any]) -> GeneratedImages:
    return GeneratedImages(np.asarray(result["images"]), result.get("labels"), result.get("log_prob"))


class ImageService:
    def __init__(self, catalog: ModelCatalog):
        self.catalog = catalog

    # ---- checks ----------------------------------------------------------------------------------------

    def images(self, name: str, images: Sequence[Any] | np.ndarray, known: int | None = None) -> np.ndarray:
        """Arrays of levels or PNGs as int64 (N, H, W), each checked against the model; `known`: only the first
        `known` pixels in raster order matter (completion)."""
        spec = self.catalog.manifest(name).input
        limit = self.catalog.limits.max_images_per_request
        if len(images) > limit:
            raise TooLarge(f"{len(images)} images in one request; the limit is {limit} per request "
                           "(limits.max_images_per_request)")
        if isinstance(images, np.ndarray):  # binary tensors, already whole numbers: checked whole when they fit
            if (known is None and images.shape[1:] == (spec.height, spec.width) and len(images)
                    and images.min() >= 0 and images.max() < spec.levels):
                return images.astype(np.int64, copy=False)
            images = images.tolist()  # item by item, so the error names the image, row and column
        try:
            return np.stack([decode_image(image, f"images[{i}]", spec.height, spec.width, spec.levels, known)
                             for i, image in enumerate(images)])
        except ImageInputError as e:
            raise InvalidInput(f"{e.message} (model {name!r})", type_=e.type) from None

    def labels(self, name: str, labels: Sequence[int] | None, n: int, field: str = "labels") -> np.ndarray | None:
        """Labels as given (checked against the model), or None."""
        if labels is None:
            return None
        spec = self.catalog.manifest(name).input
        if not spec.n_classes:
            raise InvalidInput(f"model {name!r} is not class-conditional: give no {field}", type_="invalid_label")
        if len(labels) != n:
            raise InvalidInput(f"{field} has {len(labels)} entries; give one per image ({n})", type_="invalid_label")
        for i, label in enumerate(labels):
            if not 0 <= label < spec.n_classes:
                where = field if field == "label" else f"{field}[{i}]"
                names = ""
                if spec.class_names:
                    shown = ", ".join(f"{j}={c}" for j, c in enumerate(spec.class_names[:12]))
                    names = f" ({shown}{', ...' if len(spec.class_names) > 12 else ''})"
                raise InvalidInput(f"{where}={label} is out of range; model {name!r}'s labels are "
                                   f"0..{spec.n_classes - 1}{names}", type_="invalid_label")
        return np.asarray(labels, dtype=np.int64)

    def check_format(self, name: str, format_: str) -> None:
        levels = self.catalog.manifest(name).input.levels
        if format_ == "png" and levels > MAX_PNG_LEVELS:
            raise InvalidInput(f"format png needs at most {MAX_PNG_LEVELS} levels; model {name!r} has {levels}: use "
                               "format array")

    def check_sampling_cost(self, name: str, images: int, what: str) -> None:
        """Sampling costs about images x pixels model steps: LimitExceeded past max_image_pixels_per_request."""
        spec = self.catalog.manifest(name).input
        pixels = images * spec.height * spec.width
        limit = self.catalog.limits.max_image_pixels_per_request
        if pixels > limit:
            raise LimitExceeded(f"{what} x {spec.height}x{spec.width} pixels = {pixels} pixels to sample; the limit "
                                f"is {limit} per request (limits.max_image_pixels_per_request)")

    def _is_latent(self, name: str) -> bool:
        return self.catalog.family(name) is LATENT

    # ---- log p(x) --------------------------------------------------------------------------------------

    async def log_prob(self, name: str, images: Sequence[Any], labels: Sequence[int] | None = None,
                       per_pixel: bool = False, samples: int | None = None, seed: int | None = None,
                       endpoint: str = "log_prob") -> ImageScores:
        """log p(x | label), or a class-conditional model's marginal without labels; a latent model's bound with
        `samples` importance samples (its default K) and `seed`; per-pixel conditionals when asked."""
        manifest = self.catalog.image_model(name, endpoint)
        self.catalog.require_density(name, endpoint)
        if self._is_latent(name):
            if per_pixel:
                raise WrongKind(f"per_pixel needs a model that factorises p(x) over pixels; model {name!r} is a "
                                f"{manifest.kind} (a latent-variable model): its log_prob is a bound on the whole "
                                "image")
        elif samples is not None or seed is not None:
            raise WrongKind(f"importance_samples and seed are for models whose density is a bound (VAEs); model "
                            f"{name!r} is a {manifest.kind}, whose log_prob is exact")
        x = self.images(name, images)
        y = self.labels(name, labels, len(x))
        log_prob, pixels = await self.catalog.call(name, "score", x, y, per_pixel, samples, seed)
        return ImageScores(x, np.asarray(log_prob), None if pixels is None else np.asarray(pixels))

    # ---- sampling --------------------------------------------------------------------------------------

    async def sample(self, name: str, n: int, labels: Sequence[int] | None, label: int | None, seed: int | None,
                     format_: str = "array") -> GeneratedImages:
        """n images; labels (one per image) or label (one for all) for a class-conditional model, else labels
        from its class prior."""
        self.catalog.image_model(name, "sample")
        limit = self.catalog.limits.max_images_per_request
        if n > limit:
            raise TooLarge(f"n={n} images asked for; the limit is {limit} per request "
                           "(limits.max_images_per_request)")
        self.check_sampling_cost(name, n, f"n={n} images")
        if label is not None:
            given = self.labels(name, [label], 1, "label")
            y = None if given is None else np.repeat(given, n)
        else:
            y = self.labels(name, labels, n)
        self.check_format(name, format_)
        return generated(await self.catalog.call(name, "sample", n, y, seed))

    def known_pixels(self, name: str, known_rows: int | None, known_pixels: int | None) -> int:
        """The pixels kept exactly, in raster order, from known_rows or known_pixels."""
        spec = self.catalog.manifest(name).input
        if known_rows is not None:
            if known_rows > spec.height:
                raise InvalidInput(f"known_rows={known_rows} is out of range: model {name!r}'s images have "
                                   f"{spec.height} rows; allowed 0..{spec.height}")
            return known_rows * spec.width
        n_pixels = spec.height * spec.width
        if known_pixels is None or known_pixels > n_pixels:
            raise InvalidInput(f"known_pixels={known_pixels} is out of range: model {name!r}'s images have "
                               f"{spec.height}x{spec.width} = {n_pixels} pixels; allowed 0..{n_pixels}")
        return known_pixels

    async def complete(self, name: str, images: Sequence[Any], known: int, n: int, labels: Sequence[int] | None,
                       seed: int | None, format_: str = "array") -> GeneratedImages:
        """n completions of each image (flat, image by image), its first `known` pixels kept exactly."""
        manifest = self.catalog.image_model(name, "complete")
        if self._is_latent(name):
            raise WrongKind(f"completion needs a model that factorises p(x) over pixels in raster order; model "
                            f"{name!r} is a {manifest.kind} (a latent-variable model): use sample")
        limit = self.catalog.limits.max_images_per_request
        total = len(images) * n
        if total > limit:
            raise TooLarge(f"{len(images)} images x n={n} = {total} completions; the limit is {limit} per request "
                           "(limits.max_images_per_request)")
        self.check_sampling_cost(name, total, f"{total} completions")
        x = self.images(name, images, known)
        y = self.labels(name, labels, len(x))
        self.check_format(name, format_)
        return generated(await self.catalog.call(name, "complete", x, known, n, y, seed))

    # ---- VAEs ------------------------------------------------------------------------------------------

    def _vae(self, name: str, endpoint: str) -> art.Manifest:
        manifest = self.catalog.image_model(name, endpoint)
        if manifest.kind != "vae":
            raise WrongKind(f"{endpoint} needs an encoder: it is for VAEs; {kind_phrase(name, manifest)}")
        return manifest

    async def reconstruct(self, name: str, images: Sequence[Any], format_: str = "array") -> GeneratedImages:
        """Each image encoded to its posterior mean and decoded back (every pixel's most likely level)."""
        self._vae(name, "reconstruct")
        x = self.images(name, images)
        self.check_format(name, format_)
        return GeneratedImages(np.asarray(await self.catalog.call(name, "reconstruct", x)), None, None)

    async def interpolate(self, name: str, images: Sequence[Any], steps: int,
                          format_: str = "array") -> GeneratedImages:
        """`steps` images on the line in latent space between two images' posterior means, both ends included."""
        self._vae(name, "interpolate")
        x = self.images(name, images)
        self.check_format(name, format_)
        return GeneratedImages(np.asarray(await self.catalog.call(name, "interpolate", x[0], x[1], steps)),
                               None, None)
