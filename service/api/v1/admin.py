"""/v1/admin: genserve's model management API (the admin role when API keys are on). What is served, loading and
unloading versions, the default version (promote, which is also a rollback) and the canary traffic split; the
Triton-compatible subset is /v2/repository (service/api/v2/router.py). Both ask the management service, which asks
the ModelRepository deployment (service/repository.py)."""

from __future__ import annotations

from fastapi import APIRouter

from genserve.service.api.common import ServicesDep
from genserve.service.api.errors import AUTH, POST, responses
from genserve.service.api.fast_json import FastJSONRoute
from genserve.service.api.v1.schemas import (
    ErrorResponse,
    ManagedModel,
    ManagementStatus,
    PromoteRequest,
    StoreVersion,
    TrafficRequest,
    VersionRequest,
)
from genserve.service.errors import NotFound
from genserve.service.services import Services

router = APIRouter(prefix="/v1/admin", tags=["admin"], route_class=FastJSONRoute)
ADMIN_403 = "API keys are on and the key's role is not admin"
GET_ERRORS = responses(ErrorResponse, 503, *AUTH, s403=ADMIN_403)
CHANGE_ERRORS = responses(
    ErrorResponse, 400, 404, 409, *POST, 503, *AUTH, s403=ADMIN_403,
    s400="invalid request; the model control mode does not allow this change (none allows none, poll allows "
         "promote and traffic); or the version failed to load (the message says why)",
    s404="no such model or version in the store (or loaded, to unload or split)",
    s409="the version is unloading; retry once it is UNLOADED")


async def model_status(services: Services, name: str) -> ManagedModel:
    status = ManagementStatus.model_validate(await services.management.status())
    for model in status.models:
        if model.name == name:
            return model
    raise NotFound(f"model {name!r} is not managed by this server")


@router.get("/models", name="admin_models", response_model=ManagementStatus, responses=GET_ERRORS)
async def models(services: ServicesDep) -> ManagementStatus:
    """The control mode and every managed model: its versions' states, default version and traffic split."""
    return ManagementStatus.model_validate(await services.management.status())


@router.get("/repository", name="admin_repository", response_model=list[StoreVersion], responses=GET_ERRORS)
async def repository(services: ServicesDep) -> list[StoreVersion]:
    """Every model version in the store or served, with its state and the reason it is not READY (the same
    index as Triton's POST /v2/repository/index)."""
    return [StoreVersion.model_validate(row) for row in await services.management.index()]


@router.post("/models/{name}/load", name="admin_load", response_model=ManagedModel, responses=CHANGE_ERRORS)
async def load(name: str, body: VersionRequest, services: ServicesDep) -> ManagedModel:
    """Load a version (or those the model's version policy selects) and answer once READY; a version that fails
    stays UNAVAILABLE with its reason and never replaces the one serving. Explicit mode only."""
    await services.management.load(name, body.version)
    return await model_status(services, name)


@router.post("/models/{name}/unload", name="admin_unload", response_model=ManagedModel, responses=CHANGE_ERRORS)
async def unload(name: str, body: VersionRequest, services: ServicesDep) -> ManagedModel:
    """Unload a version (or every loaded one): it takes no new request at once, the requests it accepted finish
    (streams included), then its replicas stop. Explicit mode only."""
    await services.management.unload(name, body.version)
    return await model_status(services, name)


@router.put("/models/{name}/default", name="admin_promote", response_model=ManagedModel, responses=CHANGE_ERRORS)
async def promote(name: str, body: PromoteRequest, services: ServicesDep) -> ManagedModel:
    """Make a version the default with all the unversioned traffic, loading it first when it is not loaded:
    promote a canary, or roll back to an older version. Explicit and poll modes."""
    await services.management.promote(name, body.version)
    return await model_status(services, name)


@router.put("/models/{name}/traffic", name="admin_traffic", response_model=ManagedModel, responses=CHANGE_ERRORS)
async def traffic(name: str, body: TrafficRequest, services: ServicesDep) -> ManagedModel:
    """Split the unversioned requests between READY versions by percent (a canary: {"3": 90, "4": 10}). Each
    response names its version in the Genserve-Model-Version header; metrics carry a version label. Explicit and
    poll modes."""
    await services.management.set_traffic(name, body.split)
    return await model_status(services, name)
