"""The Ray Serve application: a FastAPI ingress (`Gateway`) in front of one deployment per model.

`build_app` is the Serve application builder named by the Serve config file
(`import_path: genserve.service.app:build_app`), so `genserve serve`, `serve run`, `serve deploy` and a
KubeRay RayService all build the same application from the same file.

Every input is checked at the ingress, before it reaches a model replica: a bad request is
answered with a 4xx there and never joins a batch with other clients' requests.
"""


import asyncio
import dataclasses
import json
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from genserve.artifacts import artifact as art
from genserve.artifacts.calibration import CalibrationSet
from genserve.artifacts.scores import DEFAULT_SCORE
from genserve.artifacts.store import load_artifact_at, open_store
from genserve.artifacts.tokenizer import TextTokenizer
from genserve.models.registry import IMAGE_KINDS, LATENT_KINDS
from genserve.service.anomaly_api import AnomalyRoutes
from genserve.service.anomaly_api import router as anomaly_router
from genserve.service.density import DensityModel
from genserve.service.edge import (
    GENERATED_TOKENS,
    REQUEST_ID,
    REQUEST_ID_RULE,
    AccessLogConfig,
    AuthConfig,
    KeyRing,
    RateLimitConfig,
    RateLimiter,
    access_record,
    access_rule,
    allows,
    caller_address,
    format_access,
    hashed_entries,
    presented_key,
    route_path,
    shared_rate_limiter,
    valid_request_id,
)
from genserve.service.errors import (
    AUTH_ERRORS,
    ERRORS,
    GET_ERRORS,
    REQUEST_ID_HEADER,
    ApiError,
    error_body,
    model_kind_phrase,
    render_error,
    responses,
)
from genserve.service.image import ImageModelDeployment
from genserve.service.image_api import ImageRoutes
from genserve.service.image_api import router as image_router
from genserve.service.latent import LatentImageDeployment
from genserve.service.metrics import CONTENT_TYPE, MetricsClient
from genserve.service.openapi import install as install_openapi
from genserve.service.schemas import (
    AnomalyRequest,
    CalibrationInfo,
    ErrorResponse,
    Health,
    ImageSampleResponse,
    InputInfo,
    Limits,
    LogProbRequest,
    LogProbResponse,
    ModelInfo,
    ModelList,
    OpenAIModel,
    Readiness,
    RuntimeChoiceInfo,
    SampleRequest,
    SampleResponse,
)
from genserve.service.text import TextModelDeployment
from genserve.service.text_api import TextError, TextLimits, TextRoutes, router, text_error_response
from genserve.service.text_runtime import TEXT_KINDS
from genserve.service.ui import UIRoutes, mount_ui, picture_files, quantiles
from genserve.service.ui import router as ui_router
from genserve.service.v2_api import V2Routes
from genserve.service.v2_api import router as v2_router

LN2 = math.log(2.0)
log = logging.getLogger(__name__)


class LimitsConfig(TextLimits):
    max_records_per_request: int = Field(10_000, ge=1)
    max_samples_per_request: int = Field(10_000, ge=1)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_images_per_request: int = Field(256, ge=1, description="image models: images per log_prob/anomaly request, "
                                        "n per sample request, len(images) * n per complete request")
    max_image_pixels_per_request: int = Field(262_144, ge=1, description="image models: the sampling cost of one "
                                              "sample or complete request, images x height x width (each replica "
                                              "also budgets what it holds: its max_queued_pixels)")


class AppArgs(BaseModel):
    """The `args` of the application in the Serve config file."""

    store: str | None = Field(None, description="model store: a directory, file:///path or s3://bucket/prefix; "
                                                "default $GENSERVE_STORE or ./model-store")
    models: list[str] | None = Field(
        None, description="models to serve, as NAME or NAME@VERSION; default every model in the store (latest)"
    )
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    rate_limits: RateLimitConfig = RateLimitConfig()
    access_log: AccessLogConfig = AccessLogConfig()


def describe_validation_error(err: dict[str, Any]) -> str:
    """One pydantic/FastAPI error as 'where: what (got X)'."""
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    where = ""
    for part in loc:
        where += f"[{part}]" if part.isdigit() else (f".{part}" if where else part)
    got = err.get("input")
    shown = f" (got {got!r})" if isinstance(got, (str, int, float, bool)) or got is None else ""
    if isinstance(got, str) and len(got) > 40:
        shown = f" (got {got[:40]!r}...)"
    return f"{where or 'body'}: {err.get('msg', 'invalid')}{shown}"


# ---- the ASGI middleware: body limit, request metrics -------------------------------------------


class GatewaySettings:
    """What the middleware needs from the Gateway; one Gateway per replica process, as the
    FastAPI app itself is per process."""

    max_body_bytes: int = 16 * 1024 * 1024
    known_models: frozenset[str] = frozenset()
    versions: dict[str, str] = {}  # noqa: RUF012 (set once by the Gateway)
    metrics: MetricsClient | None = None
    auth: AuthConfig = AuthConfig()
    keys: KeyRing = KeyRing([])
    limiter: RateLimiter | None = None
    shared_limiter: Any = None  # the RateLimiterActor handle in rate_limits.mode 'shared'
    access_log: AccessLogConfig = AccessLogConfig()
    rate_limit_config: RateLimitConfig = RateLimitConfig()


DISCONNECTED = object()  # what _read_body returns when the client leaves mid-body
SHARED_LIMITER_TIMEOUT_S = 1.0  # past this the shared rate limiter is taken as down, and requests admitted
GENERATION_ROUTES = re.compile(r"^/v1/(completions|models/[^/]+/generate)$")
# Why a request was refused before reaching a model, for genserve_requests_rejected_total.
REJECTION_REASONS = {401: "unauthenticated", 403: "forbidden", 413: "too_large", 415: "unsupported_media_type",
                     429: "rate_limited", 503: "unavailable"}
access_log = logging.getLogger("ray.serve")  # Serve's replica logger: lines carry the replica and request id


@dataclass
class Rejection:
    status: int
    type: str
    message: str
    headers: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)


@dataclass
class RequestEdge:
    """What the middleware learnt about one request, for its checks, its metrics and its access log line."""

    request_id: str
    path: str  # as the routes see it (service.edge.route_path)
    rule: str  # what the path needs when keys are on (service.edge.access_rule)
    caller: str = ""
    key_id: str | None = None
    reason: str | None = None
    generated: list[int] = dataclasses.field(default_factory=lambda: [0])  # tokens, counted by count_generated


class GatewayMiddleware:
    """The edge of every request, in order: a valid X-Request-ID (Serve's proxy sets one when the client sends
    none), the API key and its role, the caller's rate limits, then the body up to its limit (413 past it) and
    JSON bodies only (415). Every request's status and latency is recorded, labelled by route and model, however
    it ended, with one access log line."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500
        headers = dict(scope.get("headers") or [])
        # Serve's proxy puts one in every request's headers (the client's, or one it made up).
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id_ok = not request_id or valid_request_id(request_id)
        path = route_path(scope)
        edge = RequestEdge(request_id=request_id if request_id and request_id_ok else uuid.uuid4().hex, path=path,
                           rule=access_rule(path, GatewaySettings.auth))
        REQUEST_ID.set(edge.request_id)
        GENERATED_TOKENS.set(edge.generated)

        async def tracking_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            rejection = None if request_id_ok else Rejection(
                400, "invalid_request", f"X-Request-ID {request_id[:40]!r} is not a valid request id: use "
                f"{REQUEST_ID_RULE}, or send none and one is generated")
            rejection = rejection or self._authorize(scope, headers, edge)
            if rejection is None or rejection.status == 401:
                # A failed key check spends its address's requests too, so keys cannot be guessed at full speed.
                rejection = await self._admit(edge) or rejection
            if rejection is None and scope["method"] in ("POST", "PUT", "PATCH"):
                rejection, receive = await self._read_json_body(edge.path, headers, receive)
                if receive is None:
                    status = 499  # the client went away mid-body: nobody to answer
                    return
            if rejection is not None:
                edge.reason = REJECTION_REASONS.get(rejection.status)
                await self._send_error(edge.path, tracking_send, rejection)
            else:
                await self.app(scope, receive, tracking_send)
        finally:
            self._record(scope, status, started, edge)

    # ---- keys and limits --------------------------------------------------------------------------------------

    @staticmethod
    def _authorize(scope, headers: dict[bytes, bytes], edge: RequestEdge) -> Rejection | None:
        edge.caller = caller_address(scope, headers, GatewaySettings.rate_limit_config.trust_forwarded_for)
        keys = GatewaySettings.keys
        if not keys.enabled:
            return None
        needed = edge.rule
        key = presented_key(headers)
        principal = None if key is None else keys.authenticate(key)
        if principal is not None:
            edge.key_id, edge.caller = principal.key_id, f"key:{principal.key_id}"
        if needed == "open":
            return None
        challenge = [(b"www-authenticate", b'Bearer realm="genserve"')]
        if key is None:
            return Rejection(401, "authentication_error", "this server needs an API key: send it as "
                             "'Authorization: Bearer KEY' (or X-API-Key: KEY)", challenge)
        if principal is None:
            return Rejection(401, "authentication_error", "the API key is not valid (keys are compared in full; "
                             "check for a missing or extra character)", challenge)
        if not allows(principal, needed):
            return Rejection(403, "permission_error", f"key {principal.key_id!r} has role {principal.role!r}; "
                             f"{scope['method']} {edge.path} needs role {needed!r}")
        return None

    @staticmethod
    async def _admit(edge: RequestEdge) -> Rejection | None:
        if edge.rule == "open" or not edge.caller:
            return None
        generates = GENERATION_ROUTES.match(edge.path) is not None
        if GatewaySettings.shared_limiter is not None:
            try:
                refusal = await asyncio.wait_for(GatewaySettings.shared_limiter.admit.remote(edge.caller, generates),
                                                 SHARED_LIMITER_TIMEOUT_S)
            except Exception:  # the limiter actor restarting: serve rather than refuse (or hold) everyone
                log.warning("rate limiter unavailable; admitting request %s", edge.request_id, exc_info=True)
                refusal = None
        elif GatewaySettings.limiter is not None:
            refusal = GatewaySettings.limiter.admit(edge.caller, generates)
        else:
            return None
        if refusal is None:
            return None
        edge.reason = refusal.limit
        return Rejection(429, "rate_limit_exceeded", refusal.message,
                         [(b"retry-after", str(refusal.retry_after_s).encode())])

    @staticmethod
    def _charge(edge: RequestEdge, tokens: int) -> None:
        if tokens <= 0 or not edge.caller:
            return
        if GatewaySettings.shared_limiter is not None:
            GatewaySettings.shared_limiter.charge_tokens.remote(edge.caller, tokens)
        elif GatewaySettings.limiter is not None:
            GatewaySettings.limiter.charge_tokens(edge.caller, tokens)

    # ---- the body ---------------------------------------------------------------------------------------------

    async def _read_json_body(self, path: str, headers: dict[bytes, bytes], receive):
        """(rejection, receive): a 415/413 rejection, or the buffered body replayed; receive None if the client
        left mid-body."""
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        # /v2 (Open Inference Protocol) bodies may be JSON then binary tensors; tritonclient sends none.
        v2_body = path.startswith("/v2/") and content_type in (b"", b"application/octet-stream")
        if content_type != b"application/json" and not v2_body:
            shown = content_type.decode("latin-1") or "none"
            return Rejection(415, "unsupported_media_type", f"Content-Type must be application/json, got {shown} "
                             "(with curl: -H 'Content-Type: application/json')"), receive
        body = await self._read_body(receive)
        if body is DISCONNECTED:
            return None, None
        if body is None:
            return Rejection(413, "body_too_large",
                             f"request body exceeds the limit of {GatewaySettings.max_body_bytes} bytes "
                             "(limits.max_body_bytes)"), receive
        return None, self._replay(body, receive)

    @staticmethod
    async def _read_body(receive) -> bytes | object | None:
        """The whole body; None as soon as it passes the limit; DISCONNECTED if the client left."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return DISCONNECTED
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > GatewaySettings.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes, receive):
        """The buffered body once, then the client's own channel (for disconnects)."""
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    @staticmethod
    async def _send_error(path: str, send, rejection: Rejection) -> None:
        body = json.dumps(render_error(path, rejection.type, rejection.message)).encode()
        await send({"type": "http.response.start", "status": rejection.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *rejection.headers]})
        await send({"type": "http.response.body", "body": body})

    # ---- what happened ----------------------------------------------------------------------------------------

    def _record(self, scope, status: int, started: float, edge: RequestEdge) -> None:
        latency = time.perf_counter() - started
        route = scope.get("route")
        endpoint = getattr(route, "name", None) or "unmatched"
        name = (scope.get("path_params") or {}).get("name")
        model = "" if name is None else (name if name in GatewaySettings.known_models else "unknown")
        tokens = edge.generated[0]
        self._charge(edge, tokens)
        metric_events = (scope.get("state") or {}).get("metric_events", [])
        if GatewaySettings.metrics is not None:
            labels = {"model": model, "endpoint": endpoint}
            events = [
                ("genserve_requests_total", {**labels, "status": str(status)}, 1),
                ("genserve_request_latency_seconds", labels, latency),
                *metric_events,
            ]
            if status in REJECTION_REASONS:
                reason = edge.reason or REJECTION_REASONS[status]
                events.append(("genserve_requests_rejected_total", {"model": model, "reason": reason}, 1))
            GatewaySettings.metrics.send(events)
        config = GatewaySettings.access_log
        if config.enabled:
            record = access_record(
                method=scope["method"], route=getattr(route, "path", None) or edge.path, model=model or None,
                version=GatewaySettings.versions.get(model), status=status, latency_ms=round(latency * 1000, 2),
                items=int(sum(e[2] for e in metric_events)) or None, tokens=tokens or None,
                request_id=edge.request_id, key_id=edge.key_id, reason=edge.reason)
            access_log.info(format_access(record, config.format))


def _timestamp(iso: str) -> int:
    # Above the Gateway class on purpose: Serve pickles the class when it is decorated, so the
    # helpers its methods call must already exist by then.
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0


# ---- the FastAPI app ----------------------------------------------------------------------------

api = FastAPI(
    title="genserve",
    version="0.1.0",
    docs_url=None,  # service.ui.mount_ui serves /docs from a vendored Swagger UI, not a CDN
    description="Exact-likelihood generative models served on Ray Serve: log-densities, calibrated "
    "anomaly scores and samples. Errors are JSON: {\"error\": {\"type\", \"message\"}}.",
)
api.add_middleware(GatewayMiddleware)
api.include_router(router)
api.include_router(image_router)
api.include_router(anomaly_router)
api.include_router(v2_router)
api.include_router(ui_router)
install_openapi(api)  # the X-Request-ID parameter; no 422 that is never sent (service/openapi.py)
mount_ui(api)  # the playground at /ui (static files; GET / redirects there)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.type, exc.message), status_code=exc.status)


@api.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not bad input: still a JSON body, so clients parse one error format.
    return JSONResponse(error_body("internal_error", f"unexpected {type(exc).__name__} while handling "
                                   f"{request.method} {request.url.path}; this is a bug, please report it"),
                        status_code=500)


@api.exception_handler(TextError)
async def _text_error(request: Request, exc: TextError) -> JSONResponse:
    return text_error_response(exc)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # In the shape of the route's protocol (OpenAI's on /v1/completions), like every other error.
    path, errors = route_path(request.scope), exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        ctx = detail.get("ctx", {}).get("error", "")
        return JSONResponse(render_error(path, "malformed_json", f"request body is not valid JSON: {ctx}".strip()),
                            status_code=400)
    if any(e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",) for e in errors):
        return JSONResponse(render_error(path, "invalid_request", "request body is empty; send a JSON object "
                                         "as described at /docs"), status_code=400)
    shown = [describe_validation_error(e) for e in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return JSONResponse(render_error(path, "invalid_request", "; ".join(shown) + more), status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; see /docs for the API"
    # exc.headers: a 405's Allow, which RFC 9110 requires.
    return JSONResponse(render_error(route_path(request.scope), type_, message), status_code=exc.status_code,
                        headers=exc.headers)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=512)
@serve.ingress(api)
class Gateway(TextRoutes, ImageRoutes, AnomalyRoutes, V2Routes, UIRoutes):
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
        self.handles = models
        self.store_uri = store  # what /v2/repository/index lists
        self.pictures = pictures or {}  # the artifacts' PNGs, for GET /v1/models/{name}/files/{filename}
        self.manifests = {name: art.Manifest.model_validate(m) for name, m in manifests.items()}
        self.calibrations = {name: CalibrationSet.from_dict(c) for name, c in calibrations.items()}
        self.limits = LimitsConfig.model_validate(limits)
        self.text_limits = self.limits
        self.tokenizers = {}
        for name, data in (tokenizers or {}).items():
            spec = self.manifests[name].input
            self.tokenizers[name] = TextTokenizer.from_json(data, spec.tokenizer, spec.bos_token_id, spec.eos_token_id)
        self.metrics = MetricsClient()
        GatewaySettings.max_body_bytes = self.limits.max_body_bytes
        GatewaySettings.known_models = frozenset(models)
        GatewaySettings.metrics = self.metrics
        self._configure_edge(edge or {})

    def _configure_edge(self, edge: dict[str, Any]) -> None:
        """Keys (as digests), rate limits and the access log, from `edge_args`."""
        GatewaySettings.versions = {name: m.version for name, m in self.manifests.items()}
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

    # ---- helpers -------------------------------------------------------------------------------

    def _manifest(self, name: str) -> art.Manifest:
        if name not in self.manifests:
            available = ", ".join(sorted(self.manifests)) or "none"
            raise ApiError(404, "model_not_found", f"no model named {name!r}; available models: {available}")
        return self.manifests[name]

    def _density_manifest(self, name: str) -> art.Manifest:
        manifest = self._manifest(name)
        if manifest.input.type == "image":
            raise ApiError(400, "wrong_model_kind", model_kind_phrase(name, manifest))
        if manifest.input.type != "records":
            density = ", ".join(n for n, m in sorted(self.manifests.items()) if m.input.type == "records") or "none"
            raise ApiError(400, "wrong_model_kind",
                           f"model {name!r} is a text model: use /v1/models/{name}/generate or /score; models of "
                           f"records: {density}")
        return manifest

    def _records(self, name: str, body: LogProbRequest | AnomalyRequest) -> np.ndarray:
        manifest = self._density_manifest(name)
        for field in ("images", "labels"):
            if getattr(body, field) is not None:
                raise ApiError(400, "wrong_model_kind", f"{field} is for image models; "
                               f"{model_kind_phrase(name, manifest)}")
        if getattr(body, "per_pixel", False):
            raise ApiError(400, "wrong_model_kind",
                           f"per_pixel is for image models; {model_kind_phrase(name, manifest)}")
        records = body.records
        limit = self.limits.max_records_per_request
        if len(records) > limit:
            raise ApiError(413, "limit_exceeded",
                           f"{len(records)} records in one request; the limit is {limit} per request")
        expected = manifest.input.n_features
        for i, record in enumerate(records):
            if len(record) != expected:
                names = manifest.input.feature_names
                shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                raise ApiError(400, "wrong_feature_count",
                               f"records[{i}] has {len(record)} features; model {name!r} expects "
                               f"{expected} ({shown}), in that order")
        return np.asarray(records, dtype=np.float64)

    def _text_model(self, name: str, param: str | None = None):
        # TextRoutes' check, with image models named as such.
        manifest = self.manifests.get(name)
        if manifest is not None and manifest.input.type == "image":
            texts = ", ".join(sorted(self.tokenizers)) or "none"
            raise TextError(400, "wrong_model_kind", f"{model_kind_phrase(name, manifest)}; it is not a text "
                            f"model; text models: {texts}", param)
        return TextRoutes._text_model(self, name, param)

    async def _score(self, name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        try:
            return await self.handles[name].score.remote(x)
        except Exception as e:  # 500 if the model failed on these records alone, else 503 (ImageRoutes)
            raise self._replica_error(name, "score", e) from e

    def _info(self, name: str, replica: dict[str, Any]) -> ModelInfo:
        """The model's manifest and calibration with what its replica reports (`_replica_info`)."""
        m = self._manifest(name)
        choice = replica.get("runtime_choice")
        cals = self.calibrations.get(name)
        default = DEFAULT_SCORE[m.input.type]
        cal = None if cals is None else (cals.get(default) or next(iter(cals.scores.values())))
        return ModelInfo(
            name=m.name, version=m.version, kind=m.kind, created=m.created, runtime=replica["runtime"],
            density=m.density,
            runtime_choice=None if choice is None else RuntimeChoiceInfo.model_validate(choice),
            input=InputInfo.model_validate(m.input.model_dump(exclude={"dtype", "bos_token_id", "eos_token_id"})),
            config=m.config, metrics=m.metrics, training=m.training,
            calibration=None if cal is None else CalibrationInfo(
                score=cal.score, n_heldout=cal.n, false_positive_rate=cal.false_positive_rate,
                threshold=cal.threshold, thresholds={k: c.threshold for k, c in cals.scores.items()},
                quantiles={k: quantiles(c.levels, c.values) for k, c in cals.scores.items()}),
            limits=Limits(**self.limits.model_dump()), pictures=sorted(self.pictures.get(name, {})),
        )

    async def _runtime(self, name: str) -> str:
        return (await self._replica_info(name))["runtime"]

    async def _replica_info(self, name: str) -> dict[str, Any]:
        """A replica's info(): its runtime, device and (density, image models) how the runtime was chosen."""
        try:
            return await asyncio.wait_for(self.handles[name].info.remote(), timeout=5)
        except Exception:
            return {"runtime": "unavailable"}

    # ---- routes --------------------------------------------------------------------------------

    @api.get("/healthz", name="healthz", response_model=Health, tags=["health"], responses=responses(ErrorResponse))
    async def healthz(self) -> Health:
        """Liveness: the ingress is up."""
        return Health()

    @api.get("/readyz", name="readyz", response_model=Readiness, tags=["health"],
             responses={**responses(ErrorResponse), 503: {"model": Readiness, "headers": REQUEST_ID_HEADER,
                                                          "description": "some model is not loaded yet"}})
    async def readyz(self) -> JSONResponse:
        """Readiness: every model has a replica that has loaded it."""

        async def ready(handle: DeploymentHandle) -> bool:
            try:
                return bool(await asyncio.wait_for(handle.ready.remote(), timeout=2))
            except Exception:
                return False

        names = sorted(self.handles)
        states = await asyncio.gather(*(ready(self.handles[n]) for n in names))
        body = Readiness(ready=all(states), models=dict(zip(names, states, strict=True)))
        return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)

    @api.get("/metrics", name="metrics", tags=["health"], response_class=Response,
             responses=responses(ErrorResponse, 401, 429, s401="auth.protect_metrics is on and the request carries "
                                 "no valid key", ok={"description": "Prometheus text format",
                                                     "content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}))
    async def metrics(self) -> Response:
        """Prometheus text exposition of genserve's metrics, summed over all replicas."""
        return Response(await self.metrics.render(), media_type=CONTENT_TYPE)

    @api.get("/v1/models", name="list_models", response_model=ModelList, tags=["models"], responses=AUTH_ERRORS)
    async def list_models(self) -> ModelList:
        names = sorted(self.manifests)
        replicas = await asyncio.gather(*(self._replica_info(n) for n in names))
        infos = [self._info(n, r) for n, r in zip(names, replicas, strict=True)]
        data = [OpenAIModel(id=info.name, created=_timestamp(info.created)) for info in infos]
        return ModelList(models=infos, data=data)

    @api.get("/v1/models/{name}", name="get_model", response_model=ModelInfo, tags=["models"],
             responses=GET_ERRORS)
    async def get_model(self, name: str) -> ModelInfo:
        self._manifest(name)
        return self._info(name, await self._replica_info(name))

    @api.post("/v1/models/{name}/log_prob", name="log_prob", response_model=LogProbResponse,
              tags=["density"], responses=ERRORS)
    async def log_prob(self, name: str, body: LogProbRequest, request: Request) -> LogProbResponse:
        """Exact log p(x) in nats and bits per dimension for a batch of raw records, or of images (image models:
        with labels, log p(x | label); without, a conditional model's exact marginal over classes; per_pixel adds
        each pixel's conditional log p(x_i | x_<i [, y]), which sum to log_prob)."""
        if self._manifest(name).input.type == "image":
            images, log_prob, pixels = await self._image_log_prob(name, body, "log_prob")
            request.state.metric_events = [("genserve_records_scored_total",
                                            {"model": name, "endpoint": "log_prob"}, len(images))]
            n_pixels = images.shape[1] * images.shape[2]
            return LogProbResponse(model=name, version=self._manifest(name).version, log_prob=log_prob.tolist(),
                                   bits_per_dim=(-log_prob / (n_pixels * LN2)).tolist(),
                                   density=self._manifest(name).density,
                                   per_pixel=pixels.tolist() if body.per_pixel else None)
        x = self._records(name, body)
        if body.importance_samples is not None or body.seed is not None:
            raise ApiError(400, "wrong_model_kind", f"importance_samples and seed are for models whose density is a "
                           f"bound (VAEs); {model_kind_phrase(name, self._manifest(name))}")
        if body.responsibilities and self._manifest(name).kind != "gmm":
            raise ApiError(400, "wrong_model_kind", f"responsibilities is for Gaussian mixtures; "
                           f"{model_kind_phrase(name, self._manifest(name))}")
        log_prob, resp = await self._score(name, x)
        request.state.metric_events = [("genserve_records_scored_total", {"model": name, "endpoint": "log_prob"},
                                        len(x))]
        m = self._manifest(name)
        return LogProbResponse(
            model=name, version=m.version, log_prob=log_prob.tolist(),
            bits_per_dim=(-log_prob / (x.shape[1] * LN2)).tolist(),
            responsibilities=resp.tolist() if body.responsibilities else None, density=m.density,
        )

    @api.post("/v1/models/{name}/sample", name="sample", response_model=SampleResponse | ImageSampleResponse,
              tags=["density"], responses=ERRORS)
    async def sample(self, name: str, body: SampleRequest, request: Request) -> SampleResponse | ImageSampleResponse:
        """n samples drawn from the model; the same seed gives the same samples. Models of records: records in
        raw feature units. Image models: images (arrays of levels or PNGs) with their labels and exact
        log-probabilities; a class-conditional model draws labels from its class prior unless labels (one per
        image) or label (one for all) is given."""
        m = self._manifest(name)
        if m.input.type == "image":
            return await self._sample_images(name, m, body, request)
        m = self._density_manifest(name)
        for field in ("labels", "label", "format"):
            if field in body.model_fields_set:
                raise ApiError(400, "wrong_model_kind", f"{field} is for image models; {model_kind_phrase(name, m)}")
        limit = self.limits.max_samples_per_request
        if body.n > limit:
            raise ApiError(413, "limit_exceeded", f"n={body.n} samples asked for; the limit is {limit} per request")
        try:
            samples = await self.handles[name].sample.remote(body.n, body.seed)
        except Exception as e:
            raise ApiError(503, "model_unavailable", f"model {name!r} could not sample: {type(e).__name__}") from e
        request.state.metric_events = [("genserve_samples_total", {"model": name}, body.n)]
        return SampleResponse(model=name, version=m.version, feature_names=m.input.feature_names,
                              samples=samples.tolist())


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
        path = loaded.path
        manifests[name] = loaded.manifest.model_dump()
        pictures[name] = picture_files(loaded.contents)
        if art.CALIBRATION in loaded.contents:  # optional: without it, anomaly answers 400 not_calibrated
            calibrations[name] = loaded.json(art.CALIBRATION)
        if loaded.manifest.kind in TEXT_KINDS:
            tokenizers[name] = loaded.contents[art.TOKENIZER].decode()
            deployment = TextModelDeployment.options(name=name, **overrides.get(name, {}))
        elif loaded.manifest.kind in LATENT_KINDS and loaded.manifest.input.type == "image":
            if not isinstance(loaded.manifest.input, art.ImageInputSpec):
                raise art.ArtifactError(f"{path / art.MANIFEST}: kind {loaded.manifest.kind!r} is an image model, "
                                        f"but its input is of type {loaded.manifest.input.type!r}, not 'image'")
            deployment = LatentImageDeployment.options(name=name, **overrides.get(name, {}))
        elif loaded.manifest.kind in IMAGE_KINDS:
            if not isinstance(loaded.manifest.input, art.ImageInputSpec):
                raise art.ArtifactError(f"{path / art.MANIFEST}: kind {loaded.manifest.kind!r} is an image model, "
                                        f"but its input is of type {loaded.manifest.input.type!r}, not 'image'")
            deployment = ImageModelDeployment.options(name=name, **overrides.get(name, {}))
        else:
            deployment = DensityModel.options(name=name, **overrides.get(name, {}))
        handles[name] = deployment.bind(location)
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
