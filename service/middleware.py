"""The gateway's ASGI middleware: the edge of every request, before any route runs (request id, API key and role,
rate limits, body size and type), and what happened to it afterwards (metrics, one access log line)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from genserve.service.api.errors import render_error
from genserve.service.catalog import ModelCatalog, RequestRouting, routing_scope
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
    presented_key,
    route_path,
    valid_request_id,
)
from genserve.service.metrics import MetricsClient

log = logging.getLogger(__name__)


class GatewaySettings:
    """What the middleware needs from the Gateway; one Gateway per replica process, as the
    FastAPI app itself is per process."""

    max_body_bytes: int = 16 * 1024 * 1024
    catalog: ModelCatalog | None = None  # the served models, for metric labels
    metrics: MetricsClient | None = None
    auth: AuthConfig = AuthConfig()
    keys: KeyRing = KeyRing([])
    limiter: RateLimiter | None = None
    shared_limiter: Any = None  # the RateLimiterActor handle in rate_limits.mode 'shared'
    access_log: AccessLogConfig = AccessLogConfig()
    rate_limit_config: RateLimitConfig = RateLimitConfig()


DISCONNECTED = object()  # what _read_body returns when the client leaves mid-body
SHARED_LIMITER_TIMEOUT_S = 1.0  # past this the shared rate limiter is taken as down, and requests admitted
# /v1/models/{name}/versions/{version}[/...]: the route without the version, pinned to it (ModelCatalog.served).
VERSIONED_PATH = re.compile(r"^/v1/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)(?P<rest>/.*)?$")
VERSION_HEADER = b"genserve-model-version"
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

        routing_context = routing_scope()
        routing = routing_context.__enter__()
        self._pin_version(scope, edge, routing)

        async def tracking_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if routing.served:  # the version that answered (the only model, or each as name=version)
                    served = next(iter(routing.served.values())) if len(routing.served) == 1 else \
                        ", ".join(f"{n}={v}" for n, v in sorted(routing.served.items()))
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (VERSION_HEADER, served.encode("latin-1"))]}
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
            if GatewaySettings.catalog is not None:
                GatewaySettings.catalog.release(routing)
            self._record(scope, status, started, edge, routing)
            routing_context.__exit__(None, None, None)

    @staticmethod
    def _pin_version(scope, edge: RequestEdge, routing: RequestRouting) -> None:
        """/v1/models/NAME/versions/V/rest is /v1/models/NAME/rest pinned to version V."""
        found = VERSIONED_PATH.match(edge.path)
        if found is None:
            return
        routing.pins[found["name"]] = found["version"]
        unversioned = f"/v1/models/{found['name']}{found['rest'] or ''}"
        root = scope.get("root_path", "")
        scope["path"] = (root + unversioned) if root and scope["path"].startswith(root) else unversioned
        scope["raw_path"] = scope["path"].encode()

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

    def _record(self, scope, status: int, started: float, edge: RequestEdge, routing: RequestRouting) -> None:
        latency = time.perf_counter() - started
        route = scope.get("route")
        endpoint = getattr(route, "name", None) or "unmatched"
        name = (scope.get("path_params") or {}).get("name")
        catalog = GatewaySettings.catalog
        if name is None and len(routing.served) == 1:  # a model named in the body (OpenAI's completions, ...)
            name = next(iter(routing.served))
        model = "" if name is None else (name if catalog is not None and name in catalog.models else "unknown")
        version = routing.served.get(name or "", "")
        tokens = edge.generated[0]
        self._charge(edge, tokens)
        metric_events = [(metric, {**labels, "version": routing.served.get(labels["model"], "")}
                          if "model" in labels and "version" not in labels else labels, value)
                         for metric, labels, value in (scope.get("state") or {}).get("metric_events", [])]
        if GatewaySettings.metrics is not None:
            labels = {"model": model, "endpoint": endpoint, "version": version}
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
                version=version or None, status=status, latency_ms=round(latency * 1000, 2),
                items=int(sum(e[2] for e in metric_events)) or None, tokens=tokens or None,
                request_id=edge.request_id, key_id=edge.key_id, reason=edge.reason)
            access_log.info(format_access(record, config.format))


