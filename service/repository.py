"""Live model management: which versions of which models are served, loaded and unloaded while the server runs.

One `ModelRepository` deployment (one replica) per genserve application owns that state. Every model version it
loads is a Ray Serve application of its own, `<app>--<model>--v<version>`, holding the model family's deployment
(service/families.py) named after the model and reachable only through handles (no HTTP route). So loading or
unloading a version starts or deletes that one application and never touches the ingress or any other model.

    control mode  none      the models named at start (args.models, default every model in the store) are loaded
                            once; nothing changes them afterwards
                  explicit  the same start; then only the API loads, unloads, promotes and splits traffic
                  poll      the store (local or s3://) is listed every poll_interval_s: a new complete version (its
                            manifest.json is written last) is loaded and, once READY, becomes the default; versions
                            the version policy no longer wants are unloaded once what replaces them is READY; a
                            model deleted from the store is unloaded

A version's states are Triton's: LOADING -> READY -> UNLOADING -> UNLOADED, or UNAVAILABLE with the reason it
failed (hash mismatch, corrupt or incompatible artifact, a replica that would not start: out of memory, ...). A
version that fails never replaces the serving one. The gateways (service/catalog.py) follow the routing table by
long-polling `routes`: each model's default version and traffic split, and what each READY version needs at the
ingress (manifest, calibration, tokenizer, pictures). Unloading drains first: the version leaves the table, every
live gateway acknowledges the new table and reports no request of that version still in flight (streams
included), and only then is its application deleted (and Serve's graceful shutdown waits once more).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from genserve.artifacts import artifact as art
from genserve.artifacts.families import TEXT
from genserve.artifacts.store import load_artifact_at, open_store

log = logging.getLogger("ray.serve")

ControlMode = Literal["none", "explicit", "poll"]
State = Literal["READY", "LOADING", "UNLOADING", "UNAVAILABLE", "UNLOADED"]
GATEWAY_TIMEOUT_S = 15.0  # a gateway not heard from in this long is gone: an unload stops waiting for it
LONG_POLL_S = 5.0  # how long `routes` holds a gateway's call when nothing changes
DRAIN_POLL_S = 0.2  # ... and while a version drains, so the gateways report their in-flight counts often
RETRY_MAX_S = 600.0  # poll mode retries a version that failed to load after poll_interval_s * 2**failures, at most
KV_NAMESPACE = "genserve"


class LatestPolicy(BaseModel, extra="forbid"):
    num_versions: int = Field(1, ge=1, le=100)


class SpecificPolicy(BaseModel, extra="forbid"):
    versions: list[int] = Field(min_length=1)


class VersionPolicy(BaseModel, extra="forbid"):
    """Which of a model's versions in the store are loaded, as Triton's `version_policy`: exactly one of
    {"latest": {"num_versions": N}}, {"all": {}} or {"specific": {"versions": [1, 3]}}. Default: the latest one."""

    latest: LatestPolicy | None = None
    all: dict[str, Any] | None = None
    specific: SpecificPolicy | None = None

    @model_validator(mode="after")
    def one_policy(self) -> VersionPolicy:
        chosen = [k for k in ("latest", "all", "specific") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"a version policy is one of latest, all or specific, not {' and '.join(chosen)}")
        if not chosen:
            self.latest = LatestPolicy()
        return self

    def select(self, versions: list[str]) -> list[str]:
        """The versions of `versions` (oldest first) this policy loads."""
        if self.all is not None:
            return list(versions)
        if self.specific is not None:
            wanted = {str(v) for v in self.specific.versions}
            return [v for v in versions if v in wanted]
        return list(versions[-self.latest.num_versions:])

    def describe(self) -> str:
        if self.all is not None:
            return "all"
        if self.specific is not None:
            return "specific " + ", ".join(map(str, self.specific.versions))
        return f"latest {self.latest.num_versions}"


class ManagementConfig(BaseModel, extra="forbid"):
    """`args.management` in the Serve config: how the served versions may change while the server runs."""

    control: ControlMode = Field("none", description="none: fixed at start; explicit: only the API changes what is "
                                 "served; poll: the store is watched")
    poll_interval_s: float = Field(10.0, ge=0.2, le=86400, description="poll mode: seconds between store listings")
    promote_new: bool = Field(True, description="poll mode: a newly published version becomes the default once "
                              "READY; false: it is loaded at 0% traffic, for a canary split and a promote")
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy,
                                          description="which versions are loaded, for every model")
    version_policies: dict[str, VersionPolicy] = Field(default_factory=dict, description="per model, by name")
    load_timeout_s: float = Field(600.0, gt=0, description="a version not READY in this long is UNAVAILABLE")
    drain_timeout_s: float = Field(600.0, gt=0, description="unloading waits at most this long for the requests "
                                   "already accepted by the version (streams included) to finish")

    def policy(self, name: str) -> VersionPolicy:
        return self.version_policies.get(name, self.version_policy)


class ControlError(Exception):
    """A management request that cannot be done; `kind` says how the API answers it."""

    def __init__(self, message: str, kind: Literal["invalid", "not_found", "conflict", "failed"] = "invalid"):
        super().__init__(message)
        self.kind = kind


@dataclass
class Version:
    name: str
    version: str
    state: State = "LOADING"
    reason: str = ""
    app: str = ""
    since: float = field(default_factory=time.time)
    ingress: dict[str, Any] | None = None  # what the gateways need: manifest, calibration, tokenizer, pictures, ...
    loading: asyncio.Task | None = None
    failures: int = 0  # failed loads in a row (poll mode retries after a growing wait)

    def set(self, state: State, reason: str = "") -> None:
        self.state, self.reason, self.since = state, reason, time.time()


@dataclass
class Model:
    name: str
    versions: dict[str, Version] = field(default_factory=dict)
    default: str | None = None
    traffic: dict[str, int] = field(default_factory=dict)  # version -> percent; empty: all to the default
    seen: set[str] = field(default_factory=set)  # store versions already considered by poll (a rollback sticks)

    def ready(self) -> list[str]:
        return sorted((v for v, s in self.versions.items() if s.state == "READY"), key=int)


def app_name(main_app: str, name: str, version: str) -> str:
    return f"{main_app}--{name}--v{version}"


def parse_app_name(main_app: str, app: str) -> tuple[str, str] | None:
    prefix = f"{main_app}--"
    if not app.startswith(prefix) or "--v" not in app:
        return None
    name, version = app[len(prefix):].rsplit("--v", 1)
    return (name, version) if version.isdigit() else None


def ingress_payload(loaded: art.Artifact, location: str) -> dict[str, Any]:
    """What the gateways need of a version without calling its replicas (and `location`, the artifact as its
    replicas load it, for a Gateway that hosts a small records model itself: service/hosted.py)."""
    from genserve.service.families import serving_family
    from genserve.service.ui import picture_files

    family = serving_family(loaded.manifest)  # ArtifactError for a kind nothing serves
    contents = loaded.contents
    return {
        "manifest": loaded.manifest.model_dump(),
        "calibration": loaded.json(art.CALIBRATION) if art.CALIBRATION in contents else None,
        "tokenizer": contents[art.TOKENIZER].decode() if family.family is TEXT else None,
        "pictures": picture_files(contents),
        "location": location,
    }


def _deploy_app(app: str, name: str, location: str, manifest: dict[str, Any], options: dict[str, Any]) -> None:
    """Deploy one model version as its own Serve application. Run as a Ray task (ServeApps.deploy), in a worker
    process of its own: building a deployment pickles Serve's request router with cloudpickle's register-by-value,
    process-wide state that Ray Serve's own code in a replica process also touches (reading deployment configs),
    so a deploy from inside the repository's replica can fail at random ('... is not registered for pickle by
    value')."""
    from ray import serve
    from ray.serve.api import RunTarget

    from genserve.service.families import serving_family

    family = serving_family(art.Manifest.model_validate(manifest))
    bound = family.deployment().options(name=name, **options).bind(location)
    serve.run_many([RunTarget(target=bound, name=app, route_prefix=None)],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)


class ServeApps:
    """The few Ray Serve calls the repository makes, each blocking (run them in a thread)."""

    deploy_task: Any = None

    @staticmethod
    def deploy(app: str, name: str, location: str, manifest: art.Manifest, options: dict[str, Any]) -> None:
        import ray

        if ServeApps.deploy_task is None:
            ServeApps.deploy_task = ray.remote(num_cpus=0, max_retries=0)(_deploy_app)
        try:
            ray.get(ServeApps.deploy_task.remote(app, name, location, manifest.model_dump(), options))
        except ray.exceptions.RayTaskError as e:  # the error itself, not the task's traceback around it
            cause = e.cause if isinstance(e.cause, Exception) else e
            raise cause from None

    @staticmethod
    def statuses() -> dict[str, tuple[str, str]]:
        """Every application's (status, message), the message naming a failed deployment's error."""
        from ray import serve

        found = {}
        for name, status in serve.status().applications.items():
            messages = [status.message] + [d.message for d in status.deployments.values() if d.message]
            found[name] = (str(status.status.value if hasattr(status.status, "value") else status.status),
                           "; ".join(m for m in messages if m))
        return found

    @staticmethod
    def delete(app: str) -> None:
        from ray import serve

        serve.delete(app, _blocking=False)

    # Each model's default version and traffic split, kept in the Ray cluster's key-value store (the GCS, where Ray
    # Serve keeps its own checkpoints) so a restarted or redeployed repository routes as the old one did: a canary
    # at 10% stays at 10%, a rollback stays rolled back. Ray has no public API for it; Serve uses this one.
    @staticmethod
    def save_routing(app: str, state: dict[str, Any]) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(f"routing:{app}", json.dumps(state).encode(), overwrite=True,
                                     namespace=KV_NAMESPACE)

    @staticmethod
    def load_routing(app: str) -> dict[str, Any]:
        from ray.experimental import internal_kv

        value = internal_kv._internal_kv_get(f"routing:{app}", namespace=KV_NAMESPACE)
        return json.loads(value) if value else {}

    @staticmethod
    def forget_routing(app: str) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(f"routing:{app}", namespace=KV_NAMESPACE)


@dataclass
class GatewayView:
    generation: int = -1
    inflight: dict[str, int] = field(default_factory=dict)
    seen: float = field(default_factory=time.monotonic)


class Repository:
    """The state machine behind the ModelRepository deployment (no Serve in here but through `apps`)."""

    def __init__(self, store: str | None, main_app: str, config: ManagementConfig, initial: list[str] | None,
                 deployments: dict[str, dict[str, Any]], default_deployment: dict[str, Any],
                 apps: Any = ServeApps, metrics: Any = None):
        self.store = open_store(store)
        self.main_app, self.config, self.initial = main_app, config, initial
        self.deployments, self.default_deployment = deployments, default_deployment
        self.apps, self.metrics = apps, metrics
        self.models: dict[str, Model] = {}
        # Starts at the clock (ms), so a restarted repository's generations are newer than any a gateway holds.
        self.generation = int(time.time() * 1000)
        self.changed = asyncio.Event()
        self.gateways: dict[str, GatewayView] = {}
        self.started = False  # the initial load is done (every initial version READY or UNAVAILABLE)
        self.start_error: str | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._saved_routing: dict[str, Any] | None = None
        self.restored: dict[str, Any] = {}  # the routing state a previous repository saved

    # ---- the routing table --------------------------------------------------------------------------------

    def bump(self) -> None:
        self.generation += 1
        self.changed.set()
        self.changed = asyncio.Event()
        self._send_state_metrics()
        routing = {name: {"default": m.default, "traffic": m.traffic} for name, m in self.models.items() if m.default}
        if self.started and routing != self._saved_routing:  # not before the saved state is restored
            try:
                self.apps.save_routing(self.main_app, routing)
                self._saved_routing = routing
            except Exception as e:  # routing goes on; only a restart would forget this change
                log.warning("could not save the routing state: %s", e)

    def table(self) -> dict[str, Any]:
        table = {}
        for name, model in self.models.items():
            ready = {v: s for v, s in model.versions.items() if s.state == "READY"}
            if model.default not in ready:
                continue
            traffic = {v: w for v, w in model.traffic.items() if v in ready and w > 0} or {model.default: 100}
            table[name] = {"default": model.default, "traffic": traffic,
                           "versions": {v: {"app": s.app, **(s.ingress or {})} for v, s in ready.items()}}
        return table

    def draining(self) -> list[str]:
        return [s.app for m in self.models.values() for s in m.versions.values() if s.state == "UNLOADING"]

    async def routes(self, gateway: str, known: int, inflight: dict[str, int]) -> dict[str, Any]:
        """A gateway's long poll: the table once it is newer than `known` (or after a while, without it). The
        gateway reports the requests it has in flight per version application, for draining."""
        view = self.gateways.setdefault(gateway, GatewayView())
        view.generation, view.inflight, view.seen = known, dict(inflight), time.monotonic()
        if known == self.generation:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), DRAIN_POLL_S if self.draining() else LONG_POLL_S)
        view.seen = time.monotonic()
        return {"generation": self.generation, "started": self.started, "draining": self.draining(),
                "table": self.table() if known != self.generation else None}

    async def routed(self) -> None:
        """Wait until every live gateway routes by the current table (a change the API made is in effect once the
        API answers), or GATEWAY_TIMEOUT_S."""
        generation, deadline = self.generation, time.monotonic() + GATEWAY_TIMEOUT_S
        while time.monotonic() < deadline:
            now = time.monotonic()
            if all(g.generation >= generation for g in self.gateways.values() if now - g.seen < GATEWAY_TIMEOUT_S):
                return
            await asyncio.sleep(0.02)

    def drained(self, app: str, generation: int) -> bool:
        """Every live gateway has the table without `app` and nothing of it in flight."""
        now = time.monotonic()
        live = [g for g in self.gateways.values() if now - g.seen < GATEWAY_TIMEOUT_S]
        return all(g.generation >= generation and not g.inflight.get(app) for g in live)

    # ---- the index ------------------------------------------------------------------------------------------

    async def index(self) -> list[dict[str, Any]]:
        """Every version in the store or known here, with its state and the reason it is not READY."""
        try:
            stored = await asyncio.to_thread(self.store.list_models)
        except Exception as e:  # an unreachable store still lists what is loaded
            log.warning("model store %s cannot be listed: %s", self.store, e)
            stored = {}
        rows = []
        for name in sorted(set(stored) | set(self.models)):
            model = self.models.get(name)
            known = model.versions if model else {}
            for version in sorted(set(stored.get(name, [])) | set(known), key=int):
                entry = known.get(version)
                if entry is None:
                    rows.append({"name": name, "version": version, "state": "UNLOADED",
                                 "reason": f"not loaded (version policy: {self.config.policy(name).describe()})"})
                    continue
                rows.append({"name": name, "version": version, "state": entry.state, "reason": entry.reason})
        return rows

    def status(self) -> dict[str, Any]:
        """Everything about the served models, for GET /v1/admin/models."""
        return {"control": self.config.control, "started": self.started, "generation": self.generation,
                "models": [{
                    "name": name, "default_version": m.default,
                    "traffic": {v: w for v, w in m.traffic.items() if w > 0} or (
                        {m.default: 100} if m.default else {}),
                    "version_policy": self.config.policy(name).describe(),
                    "versions": [{"version": v, "state": s.state, "reason": s.reason, "since": s.since}
                                 for v, s in sorted(m.versions.items(), key=lambda i: int(i[0]))],
                } for name, m in sorted(self.models.items())]}

    # ---- loading ------------------------------------------------------------------------------------------

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def options(self, name: str) -> dict[str, Any]:
        return dict(self.deployments.get(name, self.default_deployment))

    async def load(self, name: str, version: str) -> Version:
        """Load one version (or join its load in progress); returns it READY or UNAVAILABLE."""
        model = self.models.setdefault(name, Model(name))
        entry = model.versions.get(version)
        if entry is not None and entry.state == "READY":
            return entry
        if entry is not None and entry.loading is not None and not entry.loading.done():
            await asyncio.shield(entry.loading)
            return entry
        if entry is not None and entry.state == "UNLOADING":
            raise ControlError(f"model {name!r} version {version} is unloading; load it again once it is UNLOADED",
                               "conflict")
        failures = entry.failures if entry is not None and entry.state == "UNAVAILABLE" else 0
        entry = model.versions[version] = Version(name, version, app=app_name(self.main_app, name, version),
                                                  failures=failures)
        self.bump()
        entry.loading = asyncio.create_task(self._load(model, entry))
        await asyncio.shield(entry.loading)
        return entry

    async def _load(self, model: Model, entry: Version) -> None:
        name, version = model.name, entry.version
        started = time.monotonic()
        log.info("loading model %s version %s", name, version)
        try:
            location = await asyncio.to_thread(self.store.location, name, version)
            loaded = await asyncio.to_thread(load_artifact_at, location)  # every file's sha256 checked here
            entry.ingress = ingress_payload(loaded, location)
            if loaded.manifest.name != name or loaded.manifest.version != version:
                raise art.ArtifactError(f"its manifest says {loaded.manifest.name} version {loaded.manifest.version}")
            statuses = await asyncio.to_thread(self.apps.statuses)
            if statuses.get(entry.app, ("",))[0] != "RUNNING":
                await asyncio.to_thread(self.apps.deploy, entry.app, name, location, loaded.manifest,
                                        self.options(name))
            await self._wait_running(entry, started)
        except Exception as e:  # any failure leaves the serving version alone
            reason = str(e) if isinstance(e, (art.ArtifactError, ControlError)) else f"{type(e).__name__}: {e}"
            entry.set("UNAVAILABLE", reason[:2000])
            entry.ingress, entry.failures = None, entry.failures + 1
            log.error("model %s version %s failed to load: %s", name, version, reason)  # ERROR: flushed at once
            self._count("genserve_model_load_failures_total", {"model": name, "version": version})
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.apps.delete, entry.app)
            self.bump()
            return
        entry.set("READY")
        if model.default is None or model.default not in model.ready():
            model.default, model.traffic = version, {}
        log.info("model %s version %s is READY (%.1f s)", name, version, time.monotonic() - started)
        self.bump()

    async def _wait_running(self, entry: Version, started: float) -> None:
        while True:
            status, message = (await asyncio.to_thread(self.apps.statuses)).get(entry.app, ("NOT_STARTED", ""))
            if status == "RUNNING":
                return
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise ControlError(f"its replicas failed to start: {message or status}", "failed")
            if time.monotonic() - started > self.config.load_timeout_s:
                raise ControlError(f"not running after {self.config.load_timeout_s:g} s (status {status}: "
                                   f"{message or 'no message'}); is the cluster out of resources?", "failed")
            await asyncio.sleep(0.25)

    # ---- unloading ----------------------------------------------------------------------------------------

    async def unload(self, name: str, version: str) -> None:
        """Stop routing to the version, wait for its requests in flight, then delete its application."""
        model = self.models.get(name)
        entry = model.versions.get(version) if model else None
        if entry is None or entry.state in ("UNLOADED",):
            return
        if entry.loading is not None and not entry.loading.done():
            await asyncio.shield(entry.loading)
        if entry.state == "UNAVAILABLE":
            entry.set("UNLOADED", "unloaded after failing: " + entry.reason)
            self.bump()
            return
        entry.set("UNLOADING", "draining the requests in flight")
        model.traffic.pop(version, None)
        if sum(model.traffic.values()) == 0:
            model.traffic = {}
        if model.default == version:
            others = model.ready()
            model.default = others[-1] if others else None
            model.traffic = {}
        self.bump()
        generation, deadline = self.generation, time.monotonic() + self.config.drain_timeout_s
        while not self.drained(entry.app, generation) and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        await asyncio.to_thread(self.apps.delete, entry.app)
        while entry.app in await asyncio.to_thread(self.apps.statuses) and time.monotonic() < deadline + 60:
            await asyncio.sleep(0.5)
        entry.set("UNLOADED", "unloaded")
        entry.ingress = None
        log.info("model %s version %s is unloaded", name, version)
        self.bump()

    # ---- what the API asks ----------------------------------------------------------------------------------

    def require_control(self, action: str, allowed: tuple[ControlMode, ...] = ("explicit",)) -> None:
        if self.config.control not in allowed:
            raise ControlError(f"cannot {action}: the model control mode is {self.config.control!r}, which allows "
                               f"it only in {' or '.join(allowed)} mode (args.management.control in the Serve "
                               "config, or genserve serve --model-control)")

    async def store_versions(self, name: str) -> list[str]:
        versions = await asyncio.to_thread(self.store.versions, name)
        if not versions:
            raise ControlError(f"no model named {name!r} in the store {self.store}", "not_found")
        return versions

    async def load_model(self, name: str, version: str | None) -> list[Version]:
        """The API's load. One version: loaded beside those serving, at no traffic until promoted (the default only
        when the model had none). No version: the model's version policy applied, as Triton reloads a model: the
        versions it selects are loaded, the newest becomes the default, and the others are unloaded (drained)."""
        self.require_control("load models")
        stored = await self.store_versions(name)
        if version is not None and version not in stored:
            raise ControlError(f"model {name!r} has no version {version!r} in the store; it has "
                               f"{', '.join(stored)}", "not_found")
        wanted = [version] if version is not None else self.config.policy(name).select(stored)
        if not wanted:
            raise ControlError(f"model {name!r}'s version policy ({self.config.policy(name).describe()}) selects "
                               f"none of its versions in the store ({', '.join(stored)})", "not_found")
        loaded = await asyncio.gather(*(self.load(name, v) for v in wanted))
        failed = [e for e in loaded if e.state != "READY"]
        if failed:
            raise ControlError("; ".join(f"model {name!r} version {e.version} failed to load: {e.reason}"
                                         for e in failed), "failed")
        if version is None:
            model = self.models[name]
            newest = max(wanted, key=int)
            if model.default != newest:
                model.default, model.traffic = newest, {}
                log.info("model %s: version %s is the default", name, newest)
                self.bump()
            stale = [v for v, s in model.versions.items() if v not in wanted and s.state in ("READY", "UNAVAILABLE")]
            await asyncio.gather(*(self.unload(name, v) for v in stale))
        await self.routed()
        return list(loaded)

    async def unload_model(self, name: str, version: str | None) -> None:
        self.require_control("unload models")
        model = self.models.get(name)
        if model is None or not any(s.state in ("READY", "LOADING", "UNAVAILABLE") for s in model.versions.values()):
            raise ControlError(f"model {name!r} is not loaded; loaded models: {', '.join(self.loaded()) or 'none'}",
                               "not_found")
        if version is not None and version not in model.versions:
            raise ControlError(f"model {name!r} has no version {version!r} loaded; it has "
                               f"{', '.join(sorted(model.versions, key=int))}", "not_found")
        targets = [version] if version is not None else list(model.versions)
        await asyncio.gather(*(self.unload(name, v) for v in targets))

    async def promote(self, name: str, version: str) -> None:
        """Make `version` the default, all traffic to it (loading it first if it is not loaded): a rollback."""
        self.require_control("promote a version", ("explicit", "poll"))
        async with self.lock(name):
            model = self.models.get(name)
            if model is None or model.versions.get(version) is None or model.versions[version].state != "READY":
                stored = await self.store_versions(name)
                if version not in stored:
                    raise ControlError(f"model {name!r} has no version {version!r} in the store; it has "
                                       f"{', '.join(stored)}", "not_found")
                entry = await self.load(name, version)
                if entry.state != "READY":
                    raise ControlError(f"model {name!r} version {version} failed to load: {entry.reason}", "failed")
                model = self.models[name]
            model.default, model.traffic = version, {}
            log.info("model %s: version %s is the default", name, version)
            self.bump()
        await self.routed()

    async def set_traffic(self, name: str, split: dict[str, int]) -> None:
        """Send each READY version its percent of the unversioned requests (a canary)."""
        self.require_control("split traffic", ("explicit", "poll"))
        model = self.models.get(name)
        if model is None or not model.ready():
            raise ControlError(f"model {name!r} has no READY version; loaded models: "
                               f"{', '.join(self.loaded()) or 'none'}", "not_found")
        not_ready = [v for v in split if v not in model.ready()]
        if not_ready:
            raise ControlError(f"model {name!r} version(s) {', '.join(not_ready)} are not READY; READY versions: "
                               f"{', '.join(model.ready())}; load a version before sending it traffic")
        if sum(split.values()) != 100 or any(w < 0 for w in split.values()):
            raise ControlError(f"a traffic split's percentages must be 0..100 and sum to 100, not "
                               f"{sum(split.values())}")
        async with self.lock(name):
            model.traffic = {v: w for v, w in split.items() if w > 0}
            model.default = max(model.traffic, key=lambda v: (model.traffic[v], int(v)))
            log.info("model %s: traffic split %s", name, model.traffic)
            self.bump()
        await self.routed()

    def loaded(self) -> list[str]:
        return sorted(n for n, m in self.models.items() if m.ready())

    # ---- start and poll ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt version applications a previous repository replica left running, load the initial models, then
        (poll mode) watch the store."""
        try:
            self.restored = await asyncio.to_thread(self.apps.load_routing, self.main_app)
        except Exception as e:
            log.warning("could not read the saved routing state: %s", e)
        try:
            await self._adopt()
            await self._load_initial()
        except Exception as e:  # e.g. an unreachable store: report it, keep what is loaded
            self.start_error = f"{type(e).__name__}: {e}"
            log.error("genserve could not load its initial models: %s", self.start_error)
        self.started = True
        self.bump()
        while self.config.control == "poll":
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.poll()
            except Exception as e:  # the next listing may work; what is served stays
                log.warning("polling the model store %s failed: %s", self.store, e)

    async def _adopt(self) -> None:
        statuses = await asyncio.to_thread(self.apps.statuses)
        adopted = [p for app in statuses if (p := parse_app_name(self.main_app, app))]
        if adopted:
            log.info("adopting running model versions: %s", ", ".join(f"{n} v{v}" for n, v in adopted))
        await asyncio.gather(*(self.load(n, v) for n, v in adopted))
        for model in self.models.values():  # a restarted repository: each model's newest READY version serves...
            if model.ready():
                model.default, model.traffic = model.ready()[-1], {}
        self._restore_routing()  # ... unless the routing state the previous one saved says otherwise

    def _restore_routing(self) -> None:
        """Each model's saved default version and split, where those versions are READY (NAME@VERSION in
        args.models wins: the config names what it serves)."""
        pinned = {ref.partition("@")[0] for ref in self.initial or [] if ref.partition("@")[2] not in ("", "latest")}
        for name, saved in self.restored.items():
            model = self.models.get(name)
            if model is None or name in pinned or saved.get("default") not in model.ready():
                continue
            model.default = saved["default"]
            model.traffic = {v: w for v, w in saved.get("traffic", {}).items() if v in model.ready()}
            if model.traffic and sum(model.traffic.values()) != 100:
                model.traffic = {}

    async def _load_initial(self) -> None:
        stored = await asyncio.to_thread(self.store.list_models)
        wanted: dict[str, list[str]] = {}
        for ref in self.initial if self.initial is not None else sorted(stored):
            name, _, version = ref.partition("@")
            versions = stored.get(name, [])
            if not versions:
                self._fail_missing(name, version or "latest", f"no model named {name!r} in the store {self.store}")
                continue
            if version and version != "latest":
                picked = [version] if version in versions else []
                if not picked:
                    self._fail_missing(name, version, f"model {name!r} has no version {version!r} in the store; it "
                                                      f"has {', '.join(versions)}")
            else:
                picked = self.config.policy(name).select(versions) if not version else [versions[-1]]
            saved = self.restored.get(name, {}) if not version or version == "latest" else {}
            picked += [v for v in (saved.get("default"), *saved.get("traffic", {})) if v in versions]
            wanted.setdefault(name, []).extend(dict.fromkeys(picked))
            self.models.setdefault(name, Model(name)).seen.update(versions)
        await asyncio.gather(*(self.load(n, v) for n, vs in wanted.items() for v in vs))
        self._restore_routing()

    def _fail_missing(self, name: str, version: str, reason: str) -> None:
        log.error("cannot serve %s@%s: %s", name, version, reason)
        if version.isdigit():
            model = self.models.setdefault(name, Model(name))
            model.versions[version] = Version(name, version, "UNAVAILABLE", reason)

    async def poll(self) -> None:
        """One look at the store: load what is new and wanted, then unload what is not (or is gone)."""
        stored = await asyncio.to_thread(self.store.list_models)
        names = set(stored) | set(self.models)
        if self.initial is not None:  # serve only the models named at start
            names &= {ref.partition("@")[0] for ref in self.initial}
        for name in sorted(names):
            versions = stored.get(name, [])
            model = self.models.setdefault(name, Model(name))
            new = [v for v in versions if v not in model.seen]
            pinned = {v for v in (model.default, *model.traffic) if v is not None and v in versions}
            keep = set(self.config.policy(name).select(versions)) | pinned
            loads = [v for v in keep if model.versions.get(v) is None or model.versions[v].state == "UNLOADED"
                     or self._retry_due(model.versions[v])]
            results = await asyncio.gather(*(self.load(name, v) for v in loads))
            # A version that failed stays new: once a retry loads it, it is promoted as a new one would be.
            model.seen.update(v for v in versions
                              if v not in model.versions or model.versions[v].state != "UNAVAILABLE")
            fresh = [e.version for e in results if e.state == "READY" and e.version in new]
            if fresh and self.config.promote_new:
                newest = max(fresh, key=int)
                if model.default is None or int(newest) > int(model.default):
                    model.default, model.traffic = newest, {}
                    log.info("model %s: new version %s is the default", name, newest)
                    self.bump()
                    keep = set(self.config.policy(name).select(versions)) | {newest}
            # Unload only what is READY beside a READY default: the serving version goes only once replaced.
            if model.default is None or model.versions[model.default].state != "READY":
                keep |= set(model.ready())
            gone = [v for v, s in model.versions.items()
                    if v not in keep and (s.state == "READY" or (s.state == "UNAVAILABLE" and v not in versions))]
            await asyncio.gather(*(self.unload(name, v) for v in gone))

    def _retry_due(self, entry: Version) -> bool:
        """A version that failed to load is tried again after poll_interval_s * 2**failures (at most RETRY_MAX_S):
        a cluster short of room or a store that answered badly may do better later; a corrupt artifact fails the
        same way, rarely."""
        if entry.state != "UNAVAILABLE" or not entry.failures:
            return False
        wait = min(RETRY_MAX_S, self.config.poll_interval_s * 2 ** entry.failures)
        return time.time() - entry.since >= wait

    # ---- metrics --------------------------------------------------------------------------------------------

    def _count(self, metric: str, labels: dict[str, str]) -> None:
        if self.metrics is not None:
            self.metrics.send([(metric, labels, 1)])

    def _send_state_metrics(self) -> None:
        if self.metrics is None:
            return
        events = []
        for name, model in self.models.items():
            traffic = {v: w for v, w in model.traffic.items() if w > 0} or (
                {model.default: 100} if model.default else {})
            for version, entry in model.versions.items():
                labels = {"model": name, "version": version}
                events.append(("genserve_model_version_ready", labels, 1.0 if entry.state == "READY" else 0.0))
                events.append(("genserve_model_traffic_percent", labels, float(traffic.get(version, 0))))
        self.metrics.send(events)


def pick_version(route: dict[str, Any], rng: random.Random) -> str:
    """A version for one unversioned request, by the model's traffic split."""
    traffic = route["traffic"]
    if len(traffic) == 1:
        return next(iter(traffic))
    versions, weights = zip(*traffic.items(), strict=True)
    return rng.choices(versions, weights=weights)[0]
