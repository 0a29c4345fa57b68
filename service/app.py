"""The Ray Serve application: a FastAPI ingress (`Gateway`) in front of one deployment per model.

`build_app` is the Serve application builder named by the Serve config file
(`import_path: service.app:build_app`), so `genserve serve`, `serve run`, `serve deploy` and a
KubeRay RayService all build the same application from the same file.

Every input is checked at the ingress, before it reaches a model replica: a bad request is
answered with a 4xx there and never joins a batch with other clients' requests.
"""


import asyncio
import math
import time
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

from models.registry import IMAGE_KINDS, LATENT_KINDS
from service.anomaly_api import AnomalyRoutes
from service.anomaly_api import router as anomaly_router
from service.density import DensityModel
from service.errors import ERRORS, ApiError, error_body, model_kind_phrase
from service.image import ImageModelDeployment
from service.image_api import ImageRoutes
from service.image_api import router as image_router
from service.latent import LatentImageDeployment
from service.metrics import CONTENT_TYPE, MetricsClient
from service.schemas import (
    AnomalyRequest,
    CalibrationInfo,
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
from service.text import TextModelDeployment
from service.text_api import TextError, TextLimits, TextRoutes, router, text_error_response
from service.text_runtime import TEXT_KINDS
from service.v2_api import V2Routes
from service.v2_api import router as v2_router
from training import artifact as art
from training.anomaly import DEFAULT_SCORE
from training.calibration import CalibrationSet
from training.store import open_store
from training.tokenizer import TextTokenizer

LN2 = math.log(2.0)


class LimitsConfig(TextLimits):
    max_records_per_request: int = Field(10_000, ge=1)
    max_samples_per_request: int = Field(10_000, ge=1)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_images_per_request: int = Field(256, ge=1, description="image models: images per log_prob/anomaly request, "
                                        "n per sample request, len(images) * n per complete request")


class AppArgs(BaseModel):
    """The `args` of the application in the Serve config file."""

    store: str | None = Field(None, description="model store: a directory, file:///path or s3://bucket/prefix; "
                                                "default $GENSERVE_STORE or ./model-store")
    models: list[str] | None = Field(
        None, description="models to serve, as NAME or NAME@VERSION; default every model in the store (latest)"
    )
    limits: LimitsConfig = LimitsConfig()


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
    metrics: MetricsClient | None = None


DISCONNECTED = object()  # what _read_body returns when the client leaves mid-body


class GatewayMiddleware:
    """Reads the body up to the limit (413 past it), insists on JSON bodies (415), and records
    every request's status and latency, labelled by route and model, however the request ended."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def tracking_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            rejection = None
            if scope["method"] in ("POST", "PUT", "PATCH"):
                headers = dict(scope.get("headers") or [])
                content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
                # /v2 (Open Inference Protocol) bodies may be JSON then binary tensors; tritonclient sends none.
                v2_body = scope["path"].startswith("/v2/") and content_type in (b"", b"application/octet-stream")
                if content_type != b"application/json" and not v2_body:
                    shown = content_type.decode("latin-1") or "none"
                    rejection = (415, "unsupported_media_type",
                                 f"Content-Type must be application/json, got {shown} "
                                 "(with curl: -H 'Content-Type: application/json')")
                else:
                    body = await self._read_body(receive)
                    if body is DISCONNECTED:
                        status = 499  # the client went away mid-body: nobody to answer
                        return
                    if body is None:
                        rejection = (413, "body_too_large",
                                     f"request body exceeds the limit of {GatewaySettings.max_body_bytes} bytes")
                    else:
                        receive = self._replay(body, receive)
            if rejection is not None:
                await self._send_error(tracking_send, *rejection)
            else:
                await self.app(scope, receive, tracking_send)
        finally:
            self._record(scope, status, started)

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
    async def _send_error(send, status: int, type_: str, message: str) -> None:
        body = JSONResponse(error_body(type_, message)).body
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _record(self, scope, status: int, started: float) -> None:
        if GatewaySettings.metrics is None:
            return
        route = scope.get("route")
        endpoint = getattr(route, "name", None) or "unmatched"
        name = (scope.get("path_params") or {}).get("name")
        model = "" if name is None else (name if name in GatewaySettings.known_models else "unknown")
        labels = {"model": model, "endpoint": endpoint}
        events = [
            ("genserve_requests_total", {**labels, "status": str(status)}, 1),
            ("genserve_request_latency_seconds", labels, time.perf_counter() - started),
        ]
        events += (scope.get("state") or {}).get("metric_events", [])
        GatewaySettings.metrics.send(events)


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
    description="Exact-likelihood generative models served on Ray Serve: log-densities, calibrated "
    "anomaly scores and samples. Errors are JSON: {\"error\": {\"type\", \"message\"}}.",
)
api.add_middleware(GatewayMiddleware)
api.include_router(router)
api.include_router(image_router)
api.include_router(anomaly_router)
api.include_router(v2_router)


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
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        ctx = detail.get("ctx", {}).get("error", "")
        return JSONResponse(error_body("malformed_json", f"request body is not valid JSON: {ctx}".strip()),
                            status_code=400)
    if any(e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",) for e in errors):
        return JSONResponse(error_body("invalid_request", "request body is empty; send a JSON object "
                                       "as described at /docs"), status_code=400)
    shown = [describe_validation_error(e) for e in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return JSONResponse(error_body("invalid_request", "; ".join(shown) + more), status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; see /docs for the API"
    return JSONResponse(error_body(type_, message), status_code=exc.status_code)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=512)
@serve.ingress(api)
class Gateway(TextRoutes, ImageRoutes, AnomalyRoutes, V2Routes):
    def __init__(
        self,
        models: dict[str, DeploymentHandle],
        manifests: dict[str, dict],
        calibrations: dict[str, dict],
        limits: dict,
        tokenizers: dict[str, str] | None = None,
    ):
        self.handles = models
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
        except Exception as e:  # a replica failed or is gone; Serve retries elsewhere when it can
            raise ApiError(503, "model_unavailable", f"model {name!r} could not score this request: "
                           f"{type(e).__name__}; retry shortly") from e

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
                threshold=cal.threshold, thresholds={k: c.threshold for k, c in cals.scores.items()}),
            limits=Limits(**self.limits.model_dump()),
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

    @api.get("/healthz", name="healthz", response_model=Health, tags=["health"])
    async def healthz(self) -> Health:
        """Liveness: the ingress is up."""
        return Health()

    @api.get("/readyz", name="readyz", response_model=Readiness, tags=["health"],
             responses={503: {"model": Readiness, "description": "some model is not loaded yet"}})
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

    @api.get("/metrics", name="metrics", tags=["health"], response_class=Response)
    async def metrics(self) -> Response:
        """Prometheus text exposition of genserve's metrics, summed over all replicas."""
        return Response(await self.metrics.render(), media_type=CONTENT_TYPE)

    @api.get("/v1/models", name="list_models", response_model=ModelList, tags=["models"])
    async def list_models(self) -> ModelList:
        names = sorted(self.manifests)
        replicas = await asyncio.gather(*(self._replica_info(n) for n in names))
        infos = [self._info(n, r) for n, r in zip(names, replicas, strict=True)]
        data = [OpenAIModel(id=info.name, created=_timestamp(info.created)) for info in infos]
        return ModelList(models=infos, data=data)

    @api.get("/v1/models/{name}", name="get_model", response_model=ModelInfo, tags=["models"],
             responses=ERRORS)
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
    handles, manifests, calibrations, tokenizers = {}, {}, {}, {}
    for ref in refs:
        name, version = parse_model_ref(ref)
        # A path, or a URI each replica fetches on its own node: a store on a volume every node mounts, or in S3.
        location = store.location(name, version)
        loaded = art.load_artifact(location)  # verify here, so a bad artifact fails the deploy loudly
        path = loaded.path
        manifests[name] = loaded.manifest.model_dump()
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
    return gateway.bind(handles, manifests, calibrations, args.limits.model_dump(), tokenizers)


def build_app(args: dict[str, Any]):
    """Serve application builder: `import_path: service.app:build_app` in a Serve config file."""
    return build(AppArgs.model_validate(args or {}))
