"""The Ray Serve application: a small FastAPI ingress (`Gateway`) and the `ModelRepository`, which serves each
model version as a Ray Serve application of its own (`<app>--<model>--v<version>`, service/repository.py).

`build_app` is the Serve application builder named by the Serve config file
(`import_path: genserve.service.app:build_app`), so `genserve serve`, `serve run`, `serve deploy` and a
KubeRay RayService all build the same application from the same file.

The ingress holds the ModelCatalog (service/catalog.py) and the services over it (service/services/); the routes
are the protocol routers of service/api/, and the edge (keys, limits, request ids, access log) is
service/middleware.py. The catalog follows the repository's routing table, so versions loaded, promoted or
unloaded while the server runs are routed without redeploying anything. Every input is checked at the ingress,
before it reaches a model replica: a bad request is answered with a 4xx there and never joins a batch with other
clients' requests.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field, ValidationError, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from genserve.artifacts.store import open_store
from genserve.service.api.builder import build_api
from genserve.service.catalog import ModelCatalog
from genserve.service.edge import (
    AccessLogConfig,
    AuthConfig,
    KeyRing,
    RateLimitConfig,
    RateLimiter,
    hashed_entries,
    shared_rate_limiter,
)
from genserve.service.limits import Limits
from genserve.service.metrics import MetricsClient
from genserve.service.middleware import GatewaySettings
from genserve.service.repository import ControlError, ManagementConfig, Repository
from genserve.service.services import Services


class AppArgs(BaseModel):
    """The `args` of the application in the Serve config file."""

    store: str | None = Field(None, description="model store: a directory, file:///path or s3://bucket/prefix; "
                                                "default $GENSERVE_STORE or ./model-store")
    models: list[str] | None = Field(
        None, description="models to serve, as NAME or NAME@VERSION; default every model in the store (its "
                          "version policy: the latest version)"
    )
    management: ManagementConfig = ManagementConfig()
    deployments: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Ray Serve deployment options per model name (num_replicas, "
        "max_ongoing_requests, ray_actor_options, user_config, autoscaling_config, ...), for each of its versions")
    default_deployment: dict[str, Any] = Field(
        default_factory=dict, description="deployment options of a model not in `deployments` (its family's "
        "defaults where unset)")
    limits: Limits = Limits()
    auth: AuthConfig = AuthConfig()
    rate_limits: RateLimitConfig = RateLimitConfig()
    access_log: AccessLogConfig = AccessLogConfig()

    @model_validator(mode="after")
    def deployment_options(self) -> AppArgs:
        """Each model's options as Serve would take them in a config file, so a typo fails the deploy."""
        from ray.serve.schema import DeploymentSchema

        for name, options in {**self.deployments, "default_deployment": self.default_deployment}.items():
            if "name" in options:
                raise ValueError(f"deployments.{name}: the deployment is named after the model; drop 'name'")
            unknown = sorted(set(options) - set(DeploymentSchema.model_fields))
            if unknown:
                allowed = ", ".join(sorted(set(DeploymentSchema.model_fields) - {"name"}))
                raise ValueError(f"deployments.{name}: unknown option(s) {', '.join(unknown)}; Ray Serve deployment "
                                 f"options are {allowed}")
            try:
                DeploymentSchema.model_validate({"name": name, **options})
            except ValidationError as e:
                raise ValueError(f"deployments.{name}: {e}") from None
        return self


# Above the Gateway class on purpose: Serve pickles the class when it is decorated, so the helpers its methods
# call must already exist by then.
def configure_edge(edge: dict[str, Any]) -> None:
    """Keys (as digests), rate limits and the access log, from `edge_args`."""
    GatewaySettings.auth = AuthConfig.model_validate(edge.get("auth", {}))
    GatewaySettings.keys = KeyRing(edge.get("keys", []))
    GatewaySettings.access_log = AccessLogConfig.model_validate(edge.get("access_log", {}))
    limits = RateLimitConfig.model_validate(edge.get("rate_limits", {}))
    GatewaySettings.rate_limit_config = limits
    GatewaySettings.limiter = GatewaySettings.shared_limiter = None
    if limits.requests_per_second is not None or limits.generated_tokens_per_minute is not None:
        if limits.mode == "shared":
            GatewaySettings.shared_limiter = shared_rate_limiter(limits, serve.get_replica_context().app_name)
        else:
            GatewaySettings.limiter = RateLimiter(limits, share=1.0 / max(1, edge.get("gateway_replicas", 1)))


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
class ModelRepository:
    """The one owner of what is served (service/repository.py): loads, unloads, promotes and splits versions, each
    in a Serve application of its own, and answers the gateways' long polls for the routing table."""

    async def __init__(self, store: str | None, models: list[str] | None, management: dict[str, Any],
                       deployments: dict[str, dict[str, Any]], default_deployment: dict[str, Any]):
        self.repository = Repository(store, serve.get_replica_context().app_name,
                                     ManagementConfig.model_validate(management), models, deployments,
                                     default_deployment, metrics=MetricsClient())
        self._start = asyncio.get_running_loop().create_task(self.repository.start())

    async def routes(self, gateway: str, known: int, inflight: dict[str, int]) -> dict[str, Any]:
        return await self.repository.routes(gateway, known, inflight)

    async def wait_started(self) -> dict[str, Any]:
        """Once every model served at start is READY or UNAVAILABLE: the index (for `genserve serve` to print)."""
        while not self.repository.started:
            await asyncio.sleep(0.2)
        return {"ok": await self.repository.index(), "error_at_start": self.repository.start_error}

    async def index(self) -> dict[str, Any]:
        return await self._answer(self.repository.index())

    async def status(self) -> dict[str, Any]:
        return {"ok": self.repository.status()}

    async def load(self, name: str, version: str | None) -> dict[str, Any]:
        return await self._answer(self.repository.load_model(name, version), lambda loaded: [e.version for e in loaded])

    async def unload(self, name: str, version: str | None) -> dict[str, Any]:
        return await self._answer(self.repository.unload_model(name, version))

    async def promote(self, name: str, version: str) -> dict[str, Any]:
        return await self._answer(self.repository.promote(name, version))

    async def set_traffic(self, name: str, split: dict[str, int]) -> dict[str, Any]:
        return await self._answer(self.repository.set_traffic(name, split))

    @staticmethod
    async def _answer(work: Any, shape: Any = None) -> dict[str, Any]:
        """{"ok": result} or {"error": kind, "message": ...}: a refusal travels as data, not as a Ray exception."""
        try:
            result = await work
        except ControlError as e:
            return {"error": e.kind, "message": str(e)}
        return {"ok": shape(result) if shape else result}


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=512)
@serve.ingress()
class Gateway:
    """The ingress: holds the catalog (which follows the repository's routing table) and the services over it,
    and configures the edge. Serve asks it for its FastAPI app once constructed (`__serve_build_asgi_app__`), so
    each replica's app carries its own services on its state, where the routers find them (service/api/common.py)."""

    async def __init__(self, repository: DeploymentHandle, limits: dict, edge: dict[str, Any] | None = None,
                       store: str | None = None):
        self.catalog = ModelCatalog(limits, store)
        self.services = Services.over(self.catalog, repository)
        self.metrics = MetricsClient()
        GatewaySettings.max_body_bytes = self.catalog.limits.max_body_bytes
        GatewaySettings.catalog = self.catalog
        GatewaySettings.metrics = self.metrics
        configure_edge(edge or {})
        gateway_id = serve.get_replica_context().replica_id.unique_id
        self.catalog.apply(await repository.routes.remote(gateway_id, -1, {}))
        self._follow = asyncio.get_running_loop().create_task(self.catalog.follow(repository, gateway_id))

    def __serve_build_asgi_app__(self) -> FastAPI:
        api = build_api()
        api.state.services, api.state.metrics = self.services, self.metrics
        return api


# ---- building the application ------------------------------------------------------------------

CONTROL_DEPLOYMENTS = ("Gateway", "ModelRepository")  # the application's own deployments; models are apart


def build(args: AppArgs, overrides: dict[str, dict[str, Any]] | None = None):
    """The application for `args`: the Gateway and the ModelRepository, which loads the models (each version an
    application of its own). `overrides` are the config file's options for those two deployments, which Serve
    applies by itself when it reads the config file (serve run/deploy, KubeRay)."""
    overrides = overrides or {}
    store = open_store(args.store)
    if args.models is not None and not args.models and args.management.control != "explicit":
        raise ValueError("args.models is empty: name at least one model, or use management.control: explicit "
                         "to start with none and load them through the API")
    if args.models is None and args.management.control == "none" and not store.list_models():
        raise ValueError(f"the model store {store} has no models; train one with `genserve train`")
    repository = ModelRepository.options(**overrides.get("ModelRepository", {})).bind(
        store.uri, args.models, args.management.model_dump(), args.deployments, args.default_deployment)
    gateway = Gateway.options(**overrides.get("Gateway", {}))
    return gateway.bind(repository, args.limits.model_dump(), edge=edge_args(args, overrides.get("Gateway", {})),
                        store=store.uri)


def edge_args(args: AppArgs, gateway_options: dict[str, Any]) -> dict[str, Any]:
    """What the Gateway needs for keys, limits and the access log. Keys travel as sha256 digests only, read here
    (on the node that builds the app: the head, in a RayService) from the config and the keys file."""
    replicas = args.rate_limits.gateway_replicas or gateway_options.get("num_replicas")
    if not isinstance(replicas, int):  # "auto" or autoscaling: the floor, so a caller never gets less than its limit
        replicas = (gateway_options.get("autoscaling_config") or {}).get("min_replicas", 1) or 1
    return {"keys": hashed_entries(args.auth), "auth": args.auth.model_dump(exclude={"api_keys", "api_keys_file"}),
            "rate_limits": args.rate_limits.model_dump(), "access_log": args.access_log.model_dump(),
            "gateway_replicas": replicas}


def build_app(args: dict[str, Any]):
    """Serve application builder: `import_path: genserve.service.app:build_app` in a Serve config file."""
    return build(AppArgs.model_validate(args or {}))
