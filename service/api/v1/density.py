"""/v1 routes of the models that give densities or images: log p(x) and samples (records and images), calibrated
anomaly scores (records, images, texts), and image completion, reconstruction and interpolation. Each route checks
the fields that do not fit the model's family, calls one service, and shapes its answer."""

from __future__ import annotations

import math

from fastapi import APIRouter, Request

from genserve.artifacts import artifact as art
from genserve.artifacts.families import GMM_KIND
from genserve.service.api.common import ServicesDep, record_metrics
from genserve.service.api.errors import AUTH, POST, responses
from genserve.service.api.fast_json import FastJSONRoute
from genserve.service.api.v1.schemas import (
    AnomalyRequest,
    AnomalyResponse,
    CompleteRequest,
    CompleteResponse,
    ErrorResponse,
    GeneratedImage,
    ImageSampleResponse,
    InterpolateRequest,
    InterpolateResponse,
    LogProbRequest,
    LogProbResponse,
    ReconstructRequest,
    ReconstructResponse,
    SampleRequest,
    SampleResponse,
)
from genserve.service.catalog import kind_phrase
from genserve.service.errors import WrongKind
from genserve.service.image_codec import encode_png
from genserve.service.services import Services
from genserve.service.services.anomaly import AnomalyInputs
from genserve.service.services.images import GeneratedImages

LN2 = math.log(2.0)
ERRORS = responses(ErrorResponse, 400, 404, *POST, 500, 503, *AUTH)  # /v1 POST routes of a model
router = APIRouter(route_class=FastJSONRoute)


def image_objects(result: GeneratedImages, format_: str, levels: int) -> list[GeneratedImage]:
    """Generated images as the API's image objects: arrays of levels, or PNGs."""
    n = len(result.images)
    log_probs = [None] * n if result.log_prob is None else result.log_prob.tolist()
    out = []
    for i, (image, log_prob) in enumerate(zip(result.images, log_probs, strict=True)):
        label = None if result.labels is None else int(result.labels[i])
        if format_ == "png":
            out.append(GeneratedImage(label=label, log_prob=log_prob, png=encode_png(image, levels)))
        else:
            out.append(GeneratedImage(label=label, log_prob=log_prob, array=image.tolist()))
    return out


def refuse_fields(manifest: art.Manifest, name: str, body: object, fields: tuple[str, ...], what: str) -> None:
    """WrongKind for the first of `fields` the request sets that is not for this model's family."""
    for field in fields:
        value = getattr(body, field, None)
        if value is not None and value is not False:
            raise WrongKind(f"{field} {what}; {kind_phrase(name, manifest)}")


# ---- log p(x) ---------------------------------------------------------------------------------------------


@router.post("/v1/models/{name}/log_prob", name="log_prob", response_model=LogProbResponse, tags=["density"],
             responses=ERRORS)
async def log_prob(name: str, body: LogProbRequest, request: Request, services: ServicesDep) -> LogProbResponse:
    """Exact log p(x) in nats and bits per dimension for a batch of raw records, or of images (image models: with
    labels, log p(x | label); without, a conditional model's exact marginal over classes; per_pixel adds each
    pixel's conditional log p(x_i | x_<i [, y]), which sum to log_prob)."""
    manifest = services.catalog.manifest(name)
    if manifest.input.type == "image":
        return await _image_log_prob(services, name, manifest, body, request)
    manifest = services.catalog.records_model(name)
    refuse_fields(manifest, name, body, ("images", "labels"), "is for image models")
    refuse_fields(manifest, name, body, ("per_pixel",), "is for image models")
    x = services.records.records(name, body.records)
    if body.importance_samples is not None or body.seed is not None:
        raise WrongKind(f"importance_samples and seed are for models whose density is a bound (VAEs); "
                        f"{kind_phrase(name, manifest)}")
    if body.responsibilities and manifest.kind != GMM_KIND:
        raise WrongKind(f"responsibilities is for Gaussian mixtures; {kind_phrase(name, manifest)}")
    scored = await services.records.log_prob(name, x)
    record_metrics(request, ("genserve_records_scored_total", {"model": name, "endpoint": "log_prob"}, len(x)))
    return LogProbResponse(
        model=name, version=manifest.version, log_prob=scored.log_prob.tolist(),
        bits_per_dim=(-scored.log_prob / (x.shape[1] * LN2)).tolist(),
        responsibilities=scored.responsibilities.tolist() if body.responsibilities else None,
        density=manifest.density,
    )


async def _image_log_prob(services: Services, name: str, manifest: art.Manifest, body: LogProbRequest,
                          request: Request) -> LogProbResponse:
    refuse_fields(manifest, name, body, ("records",), "are for models of records")
    refuse_fields(manifest, name, body, ("responsibilities",), "is for GMMs")
    scored = await services.images.log_prob(name, body.images, body.labels, body.per_pixel, body.importance_samples,
                                            body.seed)
    record_metrics(request, ("genserve_records_scored_total", {"model": name, "endpoint": "log_prob"},
                             len(scored.images)))
    n_pixels = scored.images.shape[1] * scored.images.shape[2]
    return LogProbResponse(model=name, version=manifest.version, log_prob=scored.log_prob.tolist(),
                           bits_per_dim=(-scored.log_prob / (n_pixels * LN2)).tolist(), density=manifest.density,
                           per_pixel=scored.per_pixel.tolist() if body.per_pixel else None)


# ---- samples ----------------------------------------------------------------------------------------------


@router.post("/v1/models/{name}/sample", name="sample", response_model=SampleResponse | ImageSampleResponse,
             tags=["density"], responses=ERRORS)
async def sample(name: str, body: SampleRequest, request: Request,
                 services: ServicesDep) -> SampleResponse | ImageSampleResponse:
    """n samples drawn from the model; the same seed gives the same samples. Models of records: records in raw
    feature units. Image models: images (arrays of levels or PNGs) with their labels and exact log-probabilities;
    a class-conditional model draws labels from its class prior unless labels (one per image) or label (one for
    all) is given."""
    manifest = services.catalog.manifest(name)
    if manifest.input.type == "image":
        result = await services.images.sample(name, body.n, body.labels, body.label, body.seed, body.format)
        record_metrics(request, ("genserve_samples_total", {"model": name}, body.n))
        spec = manifest.input
        return ImageSampleResponse(model=name, version=manifest.version, height=spec.height, width=spec.width,
                                   levels=spec.levels, images=image_objects(result, body.format, spec.levels))
    manifest = services.catalog.records_model(name)
    for field in ("labels", "label", "format"):
        if field in body.model_fields_set:
            raise WrongKind(f"{field} is for image models; {kind_phrase(name, manifest)}")
    samples = await services.records.sample(name, body.n, body.seed)
    record_metrics(request, ("genserve_samples_total", {"model": name}, body.n))
    return SampleResponse(model=name, version=manifest.version, feature_names=manifest.input.feature_names,
                          samples=samples.tolist())


# ---- anomaly scores ---------------------------------------------------------------------------------------


@router.post("/v1/models/{name}/anomaly", name="anomaly", response_model=AnomalyResponse, tags=["density"],
             responses=ERRORS)
async def anomaly(name: str, body: AnomalyRequest, request: Request, services: ServicesDep) -> AnomalyResponse:
    """Calibrated anomaly scores for records, images or texts: each item's score (the requested score type,
    default the model's own: the ensemble for models trained since it exists), log p, percentile among held-out
    normal items, and a flag at the calibrated threshold for a 1% false-positive rate unless the request gives
    `threshold` or `false_positive_rate`. GMMs add the most likely component and its responsibility; texts can be
    scored per line; `batch_test` adds a typicality test of all the items together."""
    inputs = AnomalyInputs(records=body.records, images=body.images, labels=body.labels, texts=body.texts)
    response, n = await services.anomaly.score(name, inputs, body.score, body.threshold, body.false_positive_rate,
                                               body.per_line, body.batch_test)
    flagged = sum(r.is_anomaly for r in response.results)
    record_metrics(request, ("genserve_records_scored_total", {"model": name, "endpoint": "anomaly"}, n),
                   ("genserve_anomalies_flagged_total", {"model": name}, flagged))
    return response


# ---- images -----------------------------------------------------------------------------------------------


@router.post("/v1/models/{name}/complete", name="complete", response_model=CompleteResponse, tags=["images"],
             responses=ERRORS)
async def complete(name: str, body: CompleteRequest, request: Request, services: ServicesDep) -> CompleteResponse:
    """Complete partial images: keep each image's top known_rows rows (or first known_pixels pixels in raster
    order) exactly and sample the rest from the model given them, n completions per image; the same seed gives
    the same completions. A class-conditional model given no labels draws each completion's label from
    p(label | known pixels), so completions come from the model's marginal."""
    manifest = services.catalog.image_model(name, "complete")
    known = services.images.known_pixels(name, body.known_rows, body.known_pixels)
    result = await services.images.complete(name, body.images, known, body.n, body.labels, body.seed, body.format)
    total = len(body.images) * body.n
    record_metrics(request, ("genserve_samples_total", {"model": name}, total))
    spec = manifest.input
    flat = image_objects(result, body.format, spec.levels)
    return CompleteResponse(model=name, version=manifest.version, height=spec.height, width=spec.width,
                            levels=spec.levels, known_pixels=known,
                            completions=[flat[i * body.n:(i + 1) * body.n] for i in range(len(body.images))])


@router.post("/v1/models/{name}/reconstruct", name="reconstruct", response_model=ReconstructResponse,
             tags=["images"], responses=ERRORS)
async def reconstruct(name: str, body: ReconstructRequest, request: Request,
                      services: ServicesDep) -> ReconstructResponse:
    """VAEs: each image encoded to its posterior mean and decoded back (every pixel's most likely level)."""
    result = await services.images.reconstruct(name, body.images, body.format)
    record_metrics(request, ("genserve_samples_total", {"model": name}, len(result.images)))
    manifest = services.catalog.manifest(name)
    return ReconstructResponse(model=name, version=manifest.version,
                               images=image_objects(result, body.format, manifest.input.levels))


@router.post("/v1/models/{name}/interpolate", name="interpolate", response_model=InterpolateResponse,
             tags=["images"], responses=ERRORS)
async def interpolate(name: str, body: InterpolateRequest, request: Request,
                      services: ServicesDep) -> InterpolateResponse:
    """VAEs: `steps` images on the straight line in latent space between two images' posterior means, both ends
    included, each decoded to its most likely levels."""
    result = await services.images.interpolate(name, body.images, body.steps, body.format)
    record_metrics(request, ("genserve_samples_total", {"model": name}, body.steps))
    manifest = services.catalog.manifest(name)
    return InterpolateResponse(model=name, version=manifest.version,
                               images=image_objects(result, body.format, manifest.input.levels))
