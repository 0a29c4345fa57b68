"""The Ray Serve application: a small FastAPI ingress (`Gateway`) in front of one deployment per model.

`build_app` is the Serve application builder named by the Serve config file
(`import_path: genserve.service.app:build_app`), so `genserve serve`, `serve run`, `serve deploy` and a
KubeRay RayService all build the same application from the same file.

The ingress holds the ModelCatalog (service/catalog.py) and the services over it (service/services/); the routes
are the protocol routers of service/api/, and the edge (keys, limits, request ids, access log) is
service/middleware.py. Every input is checked at the ingress, before it reaches a model replica: a bad request is
answered with a 4xx there and never joins a batch with other clients' requests.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from genserve.artifacts import artifact as art
from genserve.artifacts.families import TEXT
from genserve.artifacts.store import load_artifact_at, open_store
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
from genserve.service.families import serving_family
from genserve.service.limits import Limits
from genserve.service.metrics import MetricsClient
from genserve.service.middleware import GatewaySettings
from genserve.service.services import Services
from genserve.service.ui import picture_files


class AppArgs(BaseModel):
    """The `args` of the application in the Serve config file."""

    store: str | None = Field(None, description="model store: a directory, file:///path or s3://bucket/prefix; "
                                                "default $GENSERVE_STORE or ./model-store")
    models: list[str] | None = Field(
        None, description="models to serve, as NAME or NAME@VERSION; default every model in the store (latest)"
    )
    limits: Limits = Limits()
    auth: AuthConfig = AuthConfig()
    rate_limits: RateLimitConfig = RateLimitConfig()
    access_log: AccessLogConfig = AccessLogConfig()


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


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=512)
@serve.ingress()
class Gateway:
    """The ingress: holds the catalog and the services over it, and configures the edge. Serve asks it for its
    FastAPI app once constructed (`__serve_build_asgi_app__`), so each replica's app carries its own services on
    its state, where the routers find them (service/api/common.py)."""

    def __init__(
        self,
        models: dict[str, DeploymentHandle],
        manifests: dict[str, dict],
        calibrations: dict[str, dict],
        limits: dict,
        tokenizers: dict[str, str] | None = None,
        pictures: dict[str, dict[str, bytes]] | None = None,
        edge: dict[str, Any] | None = None,
        store: str | None = None,
    ):
        catalog = ModelCatalog(models, manifests, calibrations, limits, tokenizers, pictures, store)
        self.services = Services.over(catalog)
        self.metrics = MetricsClient()
        GatewaySettings.max_body_bytes = catalog.limits.max_body_bytes
        GatewaySettings.known_models = frozenset(models)
        GatewaySettings.metrics = self.metrics
        GatewaySettings.versions = {name: m.version for name, m in catalog.manifests.items()}
        configure_edge(edge or {})

    def __serve_build_asgi_app__(self) -> FastAPI:
        api = build_api()
        api.state.services, api.state.metrics = self.services, self.metrics
        return api


# ---- building the application ------------------------------------------------------------------


def parse_model_ref(ref: str) -> tuple[str, str]:
    name, _, version = ref.partition("@")
    return name, version or "latest"


def build(args: AppArgs, overrides: dict[str, dict[str, Any]] | None = None):
    """The application for `args`; `overrides` are the config file's per-deployment options, which
    Serve applies by itself when it reads the config file (serve run/deploy, KubeRay)."""
    overrides = overrides or {}
    store = open_store(args.store)
    refs = args.models if args.models is not None else list(store.list_models())
    if not refs:
        raise ValueError(f"the model store {store} has no models; train one with `genserve train`")
    handles, manifests, calibrations, tokenizers, pictures = {}, {}, {}, {}, {}
    for ref in refs:
        name, version = parse_model_ref(ref)
        # A path, or a URI each replica fetches on its own node: a store on a volume every node mounts, or in S3.
        location = store.location(name, version)
        loaded = load_artifact_at(location)  # verify here, so a bad artifact fails the deploy loudly
        manifests[name] = loaded.manifest.model_dump()
        pictures[name] = picture_files(loaded.contents)
        if art.CALIBRATION in loaded.contents:  # optional: without it, anomaly answers 400 not_calibrated
            calibrations[name] = loaded.json(art.CALIBRATION)
        family = serving_family(loaded.manifest)  # ArtifactError for a kind no family has with this input type
        if family.family is TEXT:
            tokenizers[name] = loaded.contents[art.TOKENIZER].decode()
        handles[name] = family.deployment().options(name=name, **overrides.get(name, {})).bind(location)
    gateway = Gateway.options(**overrides.get("Gateway", {}))
    return gateway.bind(handles, manifests, calibrations, args.limits.model_dump(), tokenizers, pictures=pictures,
                        edge=edge_args(args, overrides.get("Gateway", {})), store=store.uri)


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
