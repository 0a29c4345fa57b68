"""The ModelCatalog: everything the ingress knows of the models it serves (each READY version's manifest,
calibration, tokenizer and pictures, each model's default version and traffic split, the limits) and the handles
of their replicas, with the one place a replica's failure becomes an error.

The catalog follows the ModelRepository's routing table (service/repository.py) by long-polling it, so versions
loaded, promoted, split or unloaded while the server runs are routed within moments, by every gateway replica.
Each request is routed to one version of each model it names, once: the version its path pins
(/v1/models/{name}/versions/{v}/..., /v2/models/{name}/versions/{v}/...), else one drawn by the model's traffic
split; every later lookup of that model in the same request gets the same version, and the response names it
(the Genserve-Model-Version header; service/middleware.py). The catalog counts each version's requests in flight
from the moment one is routed until its response is sent (streams until they end) and reports them to the
repository, which deletes a version only once none is left.

The services (service/services/) look models up here; lookups raise the domain errors of service/errors.py
(unknown model or version, wrong family), whichever protocol asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from genserve.artifacts import artifact as art
from genserve.artifacts.calibration import CalibrationSet
from genserve.artifacts.families import Family, family_of
from genserve.artifacts.tokenizer import TextTokenizer
from genserve.service.errors import (
    InvalidInput,
    LimitExceeded,
    ModelFailed,
    NotFound,
    Overloaded,
    ServiceError,
    Unavailable,
    WrongKind,
)
from genserve.service.hosted import HOSTED_METHODS
from genserve.service.isolation import failure_message, is_over_limit, is_replica_busy, is_request_failure
from genserve.service.limits import Limits
from genserve.service.repository import pick_version

log = logging.getLogger("ray.serve")

INFO_TIMEOUT_S = 5.0  # a replica that does not report its runtime in this long is "unavailable"
READY_TIMEOUT_S = 2.0


def replica_failure(name: str, action: str, e: BaseException) -> ServiceError:
    """A failed replica call as the error the client gets, for every family: overloaded when the replica's queue
    or memory is full (a replica out of memory on one request is busy, not that request's fault), model_error when
    the model failed on this request alone (its batch-mates were answered; a retry fails the same way),
    limit_exceeded when the request alone is over a replica's budget, else model_unavailable (the replica failed or
    is gone; Serve retries elsewhere when it can)."""
    if is_replica_busy(e):
        return Overloaded(f"{failure_message(e)}; retry shortly")
    if is_request_failure(e):
        return ModelFailed(f"model {name!r} could not {action} this request: {failure_message(e)}")
    if is_over_limit(e):
        return LimitExceeded(failure_message(e))
    return Unavailable(f"model {name!r} could not {action} this request: {type(e).__name__}; retry shortly")


def kind_phrase(name: str, manifest: art.Manifest) -> str:
    """'model 'x' is a gmm model of records: use ...' - what the model is and which endpoints it takes."""
    kind, path = manifest.kind, f"/v1/models/{name}"
    if manifest.input.type == "text":
        return (f"model {name!r} is a {kind} text model: use {path}/generate, {path}/score, /v1/completions, or "
                f"{path}/anomaly with texts")
    if manifest.input.type == "image":
        return (f"model {name!r} is a {kind} image model: use {path}/sample, {path}/complete, and {path}/log_prob "
                f"or {path}/anomaly with images")
    return f"model {name!r} is a {kind} model of records: use {path}/log_prob, {path}/anomaly or {path}/sample " \
           "with records"


def require_density(name: str, manifest: art.Manifest, endpoint: str) -> None:
    """InvalidInput for `endpoint` (log_prob, anomaly, ...) of a model that gives no density (a GAN only samples)."""
    if manifest.density == "none":
        raise InvalidInput(f"model {name!r} is a {manifest.kind}: it can only sample (its density capability is "
                           f"'none'), so it has no {endpoint}; use /v1/models/{name}/sample",
                           type_="density_unavailable")


@dataclass
class RequestRouting:
    """One request's versions: `pins` from its path, `served` as the catalog routed it (for the response header,
    the access log and the metrics), and `held`: the version applications it counts as in flight from the moment
    it is routed until the gateway's middleware has sent its last byte (ModelCatalog.release)."""

    pins: dict[str, str] = field(default_factory=dict)
    served: dict[str, str] = field(default_factory=dict)
    held: list[str] = field(default_factory=list)


REQUEST_ROUTING: ContextVar[RequestRouting | None] = ContextVar("genserve_request_routing", default=None)


@contextlib.contextmanager
def routing_scope() -> Iterator[RequestRouting]:
    routing = RequestRouting()
    token = REQUEST_ROUTING.set(routing)
    try:
        yield routing
    finally:
        REQUEST_ROUTING.reset(token)


@dataclass
class ServedVersion:
    version: str
    app: str  # the Serve application holding this version's deployment
    manifest: art.Manifest
    calibration: CalibrationSet | None
    tokenizer: TextTokenizer | None
    pictures: dict[str, bytes]
    location: str | None = None  # the artifact, as its replicas load it
    hosted: Any = None  # a HostedRecordsModel when this Gateway scores the version itself (service/hosted.py)
    _handle: Any = None

    @classmethod
    def from_table(cls, version: str, entry: dict[str, Any]) -> ServedVersion:
        manifest = art.Manifest.model_validate(entry["manifest"])
        spec = manifest.input
        tokenizer = None if entry.get("tokenizer") is None else TextTokenizer.from_json(
            entry["tokenizer"], spec.tokenizer, spec.bos_token_id, spec.eos_token_id)
        calibration = None if entry.get("calibration") is None else CalibrationSet.from_dict(entry["calibration"])
        return cls(version, entry["app"], manifest, calibration, tokenizer, entry.get("pictures") or {},
                   entry.get("location"))

    @property
    def scored_in(self) -> str:
        return "gateway" if self.hosted is not None else "replica"

    def handle(self) -> Any:
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle(self.manifest.name, app_name=self.app)
        return self._handle


@dataclass
class ServedModel:
    name: str
    default: str
    traffic: dict[str, int]
    versions: dict[str, ServedVersion]


class ModelCatalog:
    """The served models by name, as the repository's routing table last said. One per ingress replica."""

    def __init__(self, limits: dict[str, Any], store_uri: str | None = None, seed: int | None = None):
        self.limits = Limits.model_validate(limits)
        self.store_uri = store_uri
        self.models: dict[str, ServedModel] = {}
        self.generation = -1
        self.started = False  # the repository has loaded (or failed) every model it serves at start
        self.inflight: Counter[str] = Counter()  # requests in flight per version application
        self.rng = random.Random(seed)
        self.hosting: dict[str, asyncio.Task] = {}  # version application -> its copy loading here

    # ---- following the repository -------------------------------------------------------------------------

    def apply(self, reply: dict[str, Any]) -> None:
        """A reply of the repository's `routes`: its table when it changed."""
        self.started = bool(reply.get("started"))
        table = reply.get("table")
        if table is not None:
            models = {}
            for name, route in table.items():
                old = self.models.get(name)
                versions = {}
                for version, entry in route["versions"].items():
                    kept = old.versions.get(version) if old else None
                    if kept is None or kept.app != entry["app"]:
                        kept = ServedVersion.from_table(version, entry)
                        self._host(kept)
                    versions[version] = kept
                models[name] = ServedModel(name, route["default"], dict(route["traffic"]), versions)
            self.models = models
            served = {v.app for m in models.values() for v in m.versions.values()}
            for app in set(self.hosting) - served:  # left the table: stop loading its copy
                self.hosting.pop(app).cancel()
        self.generation = reply["generation"]

    def _host(self, served: ServedVersion) -> None:
        """Load a copy of a small records model here, in the background (service/hosted.py decides and loads);
        the replica scores the version until then, and for good if the copy is not taken."""
        if served.manifest.input.type != "records" or served.location is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not in the Gateway (a table applied outside an event loop): replicas only
            return

        async def load() -> None:
            from genserve.service.hosted import host_records_model

            try:
                served.hosted = await host_records_model(served.handle(), served.location)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the replica keeps scoring it
                log.warning("model %s version %s is scored by its replica: its copy here failed to load: %s: %s",
                            served.manifest.name, served.version, type(e).__name__, e)
            finally:
                self.hosting.pop(served.app, None)

        self.hosting[served.app] = loop.create_task(load())

    async def follow(self, repository: Any, gateway_id: str) -> None:
        """Keep the table current: the repository answers when it changes (or every few seconds)."""
        while True:
            try:
                reply = await repository.routes.remote(gateway_id, self.generation,
                                                       {a: n for a, n in self.inflight.items() if n})
                self.apply(reply)
            except Exception as e:  # the repository restarting: keep routing by the last table
                log.warning("could not read the model routing table: %s", e)
                await asyncio.sleep(1.0)

    # ---- lookups -------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self.models)

    def served(self, name: str, param: str | None = None) -> ServedVersion:
        """The version of `name` this request is routed to (chosen once per request)."""
        model = self.models.get(name)
        if model is None:
            raise NotFound(f"no model named {name!r}; available models: {', '.join(self.names()) or 'none'}",
                           param=param)
        routing = REQUEST_ROUTING.get()
        version = routing.pins.get(name) if routing else None
        if version is not None:
            if version not in model.versions:
                raise NotFound(f"model {name!r} has no version {version!r} loaded; loaded versions: "
                               f"{', '.join(sorted(model.versions, key=int))}", param=param)
        elif routing is not None and routing.served.get(name) in model.versions:
            version = routing.served[name]
        else:
            version = pick_version({"traffic": model.traffic}, self.rng)
            if version not in model.versions:  # a table in flux: the default is always there
                version = model.default
        served = model.versions[version]
        if routing is not None and routing.served.get(name) != version:
            routing.served[name] = version
            # In flight from now, not from the replica call: a version is not deleted under a request it accepted.
            self.inflight[served.app] += 1
            routing.held.append(served.app)
        return served

    def release(self, routing: RequestRouting) -> None:
        """The request is answered (its stream ended): its versions are no longer in flight for it."""
        for app in routing.held:
            self.inflight[app] -= 1
            if self.inflight[app] <= 0:
                del self.inflight[app]
        routing.held.clear()

    def manifest(self, name: str, version: str | None = None) -> art.Manifest:
        if version is not None:  # a versioned route: this request is pinned to it
            routing = REQUEST_ROUTING.get()
            if routing is not None:
                routing.pins[name] = version
            elif name in self.models and version not in self.models[name].versions:
                raise NotFound(f"model {name!r} has no version {version!r} loaded")
        return self.served(name).manifest

    def default_manifest(self, name: str) -> art.Manifest:
        model = self.models[name]
        return model.versions[model.default].manifest

    def calibration(self, name: str) -> CalibrationSet | None:
        return self.served(name).calibration

    def pictures(self, name: str) -> dict[str, bytes]:
        return self.served(name).pictures

    def versions(self, name: str) -> list[str]:
        return sorted(self.models[name].versions, key=int) if name in self.models else []

    def family(self, name: str) -> Family:
        manifest = self.manifest(name)
        return family_of(manifest.kind, manifest.input.type)

    def of_input(self, input_type: str) -> str:
        """The served models that take `input_type`, for messages."""
        return ", ".join(n for n in self.names() if self.default_manifest(n).input.type == input_type) or "none"

    def records_model(self, name: str) -> art.Manifest:
        manifest = self.manifest(name)
        if manifest.input.type == "image":
            raise WrongKind(kind_phrase(name, manifest))
        if manifest.input.type != "records":
            raise WrongKind(f"model {name!r} is a text model: use /v1/models/{name}/generate or /score; models of "
                            f"records: {self.of_input('records')}")
        return manifest

    def image_model(self, name: str, endpoint: str) -> art.Manifest:
        manifest = self.manifest(name)
        if manifest.input.type != "image":
            raise WrongKind(f"{endpoint} is for image models; {kind_phrase(name, manifest)}; image models: "
                            f"{self.of_input('image')}")
        return manifest

    def text_model(self, name: str, param: str | None = None) -> tuple[art.Manifest, TextTokenizer]:
        texts = self.of_input("text")
        if name not in self.models:
            raise NotFound(f"no model named {name!r}; text models: {texts}", param=param)
        served = self.served(name, param)
        if served.tokenizer is None:
            manifest = served.manifest
            what = kind_phrase(name, manifest) if manifest.input.type == "image" else \
                f"model {name!r} is a {manifest.kind} model of records"
            raise WrongKind(f"{what}; it is not a text model; text models: {texts}", param=param)
        return served.manifest, served.tokenizer

    def require_density(self, name: str, endpoint: str) -> art.Manifest:
        manifest = self.manifest(name)
        require_density(name, manifest, endpoint)
        return manifest

    def context_length(self, name: str) -> int | None:
        return self.manifest(name).input.context_length

    # ---- replicas ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _in_flight(self, app: str) -> Iterator[None]:
        """A call outside any request's routing scope (in-process callers) counts while it runs."""
        if REQUEST_ROUTING.get() is not None:  # counted from routing to the response's end (release)
            yield
            return
        self.inflight[app] += 1
        try:
            yield
        finally:
            self.inflight[app] -= 1
            if not self.inflight[app]:
                del self.inflight[app]

    async def call(self, name: str, method: str, *args: Any, action: str | None = None) -> Any:
        """`method` of the model's replica (the version this request is routed to); any failure as a
        ServiceError (replica_failure)."""
        served = self.served(name)
        with self._in_flight(served.app):
            try:
                if served.hosted is not None and method in HOSTED_METHODS:  # scored in this Gateway
                    return await getattr(served.hosted, method)(*args)
                return await getattr(served.handle(), method).remote(*args)
            except Exception as e:
                raise replica_failure(name, action or method.replace("_", " "), e) from e

    def stream(self, name: str, method: str, *args: Any) -> AsyncIterator[Any]:
        """A streaming call's items (its failures are the caller's to map, item by item); the version counts as
        in flight until the stream ends or is closed."""
        served = self.served(name)

        async def items() -> AsyncIterator[Any]:
            with self._in_flight(served.app):
                response = getattr(served.handle().options(stream=True), method).remote(*args)
                done = False
                try:
                    async for item in response:
                        yield item
                    done = True
                finally:
                    if not done:  # closed early (the client went away): free its decoding slot now
                        response.cancel()

        return items()

    async def replica_info(self, name: str) -> dict[str, Any]:
        """A replica's info(): its runtime, device and how the runtime was chosen; {"runtime": "unavailable"}
        when no replica answers in time."""
        served = self.served(name)
        try:
            info = await asyncio.wait_for(served.handle().info.remote(), timeout=INFO_TIMEOUT_S)
        except Exception:
            return {"runtime": "unavailable"}
        return {**info, "scored_in": served.scored_in}

    async def readiness(self) -> dict[str, bool]:
        """Whether each model's default version has a replica that has loaded it ({} until the repository has
        loaded the models it serves at start: not ready)."""

        async def ready(model: ServedModel) -> bool:
            try:
                handle = model.versions[model.default].handle()
                return bool(await asyncio.wait_for(handle.ready.remote(), timeout=READY_TIMEOUT_S))
            except Exception:
                return False

        models = [self.models[n] for n in self.names()]
        return dict(zip((m.name for m in models), await asyncio.gather(*(ready(m) for m in models)), strict=True))

    async def version_ready(self, name: str) -> bool:
        """Whether the version this request is routed to has a replica that has loaded it."""
        try:
            return bool(await asyncio.wait_for(self.served(name).handle().ready.remote(), timeout=READY_TIMEOUT_S))
        except ServiceError:
            raise
        except Exception:
            return False
