"""/v1 routes about the server and its models: health, readiness, metrics, the model list and each model's
description (manifest, calibration, limits, runtime), and the pictures of its artifact."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from genserve.artifacts.scores import DEFAULT_SCORE
from genserve.service.api.common import ServicesDep
from genserve.service.api.errors import AUTH, REQUEST_ID_HEADER, responses
from genserve.service.api.fast_json import FastJSONRoute
from genserve.service.api.v1.schemas import (
    CalibrationInfo,
    ErrorResponse,
    Health,
    InputInfo,
    ModelInfo,
    ModelList,
    OpenAIModel,
    Readiness,
    RuntimeChoiceInfo,
)
from genserve.service.catalog import ModelCatalog
from genserve.service.errors import NotFound
from genserve.service.metrics import CONTENT_TYPE

router = APIRouter(route_class=FastJSONRoute)
GET_ERRORS = responses(ErrorResponse, 404, *AUTH)  # GET /v1/models/{name}
AUTH_ERRORS = responses(ErrorResponse, *AUTH)  # other protected /v1 GET routes
QUANTILE_LEVELS = np.linspace(0.0, 1.0, 101)  # what /v1/models reports of each held-out score distribution


def quantiles(levels: list[float], values: list[float]) -> list[float]:
    """A calibration's held-out score quantiles at QUANTILE_LEVELS (0, 0.01, ..., 1), rounded to 6 significant
    digits: enough for a histogram of the held-out distribution, small enough for every model listing."""
    return [float(f"{v:.6g}") for v in np.interp(QUANTILE_LEVELS, levels, values)]


def timestamp(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0


def model_info(catalog: ModelCatalog, name: str, replica: dict[str, Any]) -> ModelInfo:
    """The model's manifest and calibration with what its replica reports (runtime, how it was chosen)."""
    m = catalog.manifest(name)
    choice = replica.get("runtime_choice")
    cals = catalog.calibration(name)
    default = (cals and cals.default) or DEFAULT_SCORE[m.input.type]
    cal = None if cals is None else (cals.get(default) or next(iter(cals.scores.values())))
    return ModelInfo(
        name=m.name, version=m.version, kind=m.kind, created=m.created, runtime=replica["runtime"],
        density=m.density,
        runtime_choice=None if choice is None else RuntimeChoiceInfo.model_validate(choice),
        scored_in=replica.get("scored_in", "replica"),
        input=InputInfo.model_validate(m.input.model_dump(exclude={"dtype", "bos_token_id", "eos_token_id"})),
        config=m.config, metrics=m.metrics, training=m.training,
        calibration=None if cal is None else CalibrationInfo(
            score=cal.score, why=cals.why, ensemble_members=cals.members,
            ensemble_primary=cals.primary(), n_heldout=cal.n,
            false_positive_rate=cal.false_positive_rate,
            threshold=cal.threshold, thresholds={k: c.threshold for k, c in cals.scores.items()},
            quantiles={k: quantiles(c.levels, c.values) for k, c in cals.scores.items()}),
        limits=catalog.limits, pictures=sorted(catalog.pictures(name)),
    )


@router.get("/healthz", name="healthz", response_model=Health, tags=["health"], responses=responses(ErrorResponse))
async def healthz() -> Health:
    """Liveness: the ingress is up."""
    return Health()


@router.get("/readyz", name="readyz", response_model=Readiness, tags=["health"],
            responses={**responses(ErrorResponse), 503: {"model": Readiness, "headers": REQUEST_ID_HEADER,
                                                         "description": "some model is not loaded yet"}})
async def readyz(services: ServicesDep) -> JSONResponse:
    """Readiness: the models served at start are loaded (or failed), and every model's default version has a
    replica that has loaded it."""
    states = await services.catalog.readiness()
    body = Readiness(ready=services.catalog.started and all(states.values()), models=states)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("/metrics", name="metrics", tags=["health"], response_class=Response,
            responses=responses(ErrorResponse, 401, 429, s401="auth.protect_metrics is on and the request carries "
                                "no valid key", ok={"description": "Prometheus text format",
                                                    "content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}))
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of genserve's metrics, summed over all replicas."""
    return Response(await request.app.state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models", name="list_models", response_model=ModelList, tags=["models"], responses=AUTH_ERRORS)
async def list_models(services: ServicesDep) -> ModelList:
    catalog = services.catalog
    names = catalog.names()
    replicas = await asyncio.gather(*(catalog.replica_info(n) for n in names))
    infos = [model_info(catalog, n, r) for n, r in zip(names, replicas, strict=True)]
    data = [OpenAIModel(id=info.name, created=timestamp(info.created)) for info in infos]
    return ModelList(models=infos, data=data)


@router.get("/v1/models/{name}", name="get_model", response_model=ModelInfo, tags=["models"], responses=GET_ERRORS)
async def get_model(name: str, services: ServicesDep) -> ModelInfo:
    services.catalog.manifest(name)
    return model_info(services.catalog, name, await services.catalog.replica_info(name))


@router.get("/v1/models/{name}/files/{filename}", name="model_file", tags=["models"], response_class=Response,
            responses=responses(ErrorResponse, 404, *AUTH, ok={
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                "description": "the PNG, as the artifact holds it (its sha256 is the manifest's)"},
                s404="unknown model, or no such picture in its artifact (only the PNG files its manifest lists are "
                "served)"))
async def model_file(name: str, filename: str, services: ServicesDep) -> Response:
    """A picture from the model's artifact: loss_curve.png (gradient-trained models), samples.png (image models),
    as listed in the model's `pictures`. Read-only; no other file of the artifact is served."""
    services.catalog.manifest(name)
    files = services.catalog.pictures(name)
    if filename not in files:
        shown = ", ".join(sorted(files)) or "none"
        raise NotFound(f"model {name!r} has no picture {filename!r}; its pictures: {shown}", type_="file_not_found")
    return Response(files[filename], media_type="image/png", headers={"Cache-Control": "no-cache"})
