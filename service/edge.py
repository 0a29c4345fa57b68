"""The service's edge: API keys and roles, rate limits, request ids and the access log.

Everything here is decided before a request reaches a route, by `GatewayMiddleware` (service/app.py),
so a refused request never touches a model. The pieces are plain classes with no HTTP in them (the
middleware does the I/O), which keeps them testable on their own:

- `KeyRing`: API keys with a role each (`infer` or `admin`), held only as sha256 digests, compared in
  constant time; `key_id` names a key in logs and metrics without revealing it.
- `access_rule`: which role a path needs (probes are open; admin routes need `admin`).
- `RateLimiter`: token buckets per caller (its key id, or its address without keys) for requests per
  second and generated tokens per minute; `shared_rate_limiter` puts one behind a Ray actor, so
  several Gateway replicas enforce one limit exactly.
- `valid_request_id`, `access_record`: the X-Request-ID rule and the access log line.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import re
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

Role = Literal["infer", "admin"]
ROLES: tuple[Role, ...] = ("infer", "admin")
KEYS_FILE_ENV = "GENSERVE_API_KEYS_FILE"
HASH_PREFIX = "sha256:"

# The request being handled (set by the middleware; error bodies and log lines read it).
REQUEST_ID: ContextVar[str | None] = ContextVar("genserve_request_id", default=None)
# Tokens the request has generated so far, one counter per request (the rate limit's charge, the access log).
GENERATED_TOKENS: ContextVar[list[int] | None] = ContextVar("genserve_generated_tokens", default=None)


def count_generated(tokens: int) -> None:
    """Add to the current request's generated tokens (a no-op outside a request)."""
    counter = GENERATED_TOKENS.get()
    if counter is not None:
        counter[0] += tokens


# ---- configuration (the app's `args` in the Serve config) -----------------------------------------------------


class AuthConfig(BaseModel):
    """API keys. With none configured, every route is open (the local quick start)."""

    api_keys: list[str] = Field(
        default_factory=list,
        description="keys as 'KEY [ROLE]' or 'sha256:HEX [ROLE]' (role infer or admin, default admin); prefer "
                    "api_keys_file or `genserve serve --api-key`, which never put a plain key in the config")
    api_keys_file: str | None = Field(
        None, description=f"a file with one key per line, 'KEY ROLE [NAME]' or 'sha256:HEX ROLE [NAME]'; '#' starts "
                          f"a comment; default ${KEYS_FILE_ENV}")
    protect_metrics: bool = Field(False, description="GET /metrics needs a key (any role) when keys are on")
    public_docs: bool = Field(False, description="/docs, /redoc and /openapi.json stay open when keys are on")


class RateLimitConfig(BaseModel):
    """Token buckets per caller: its key, or its client address when keys are off. None: no limit."""

    requests_per_second: float | None = Field(None, gt=0, description="sustained requests per second per caller")
    burst: int | None = Field(None, ge=1, description="requests a caller may send at once; default "
                                                      "max(1, ceil(requests_per_second))")
    generated_tokens_per_minute: int | None = Field(
        None, ge=1, description="tokens a caller may generate per minute (generate, /v1/completions); a request is "
                                "admitted unless the caller's budget is in debt, and charged what it generated")
    trust_forwarded_for: bool = Field(
        False, description="without keys, a caller is its client address; behind a load balancer that is the "
                           "balancer's for everyone, so take the first address of X-Forwarded-For instead (only "
                           "when the balancer sets it: a client can send any X-Forwarded-For)")
    gateway_replicas: int | None = Field(
        None, ge=1, description="per_replica mode: how many Gateway replicas share each limit; default the "
                                "Gateway's num_replicas (or autoscaling min_replicas) where `genserve serve` reads "
                                "the config, else 1: set it under `serve deploy` and KubeRay, or use mode shared")
    mode: Literal["per_replica", "shared"] = Field(
        "per_replica", description="per_replica: each Gateway replica enforces limit / its replica count (no extra "
                                   "hop; exact when the proxy spreads a caller's requests evenly); shared: one Ray "
                                   "actor holds every bucket (exact, one actor call per request)")


class AccessLogConfig(BaseModel):
    enabled: bool = True
    format: Literal["text", "json"] = Field("text", description="one line per request: key=value pairs, or JSON")


# ---- keys ------------------------------------------------------------------------------------------------------


class KeyConfigError(ValueError):
    """A key entry or file that cannot be read; says which line and why (never the key)."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    key_id: str  # the entry's name, or 'key-' + the first 12 hex digits of its digest: safe to log
    role: Role


def parse_key_entry(line: str, where: str, default_role: Role | None = "admin") -> tuple[str, Role, str | None]:
    """'KEY [ROLE [NAME]]' or 'sha256:HEX [ROLE [NAME]]' -> (sha256 hex digest, role, name); the role may be left
    out only where `default_role` is given. Errors never repeat a field: it may be a key."""
    parts = line.split()
    if not parts or len(parts) > 3 or (len(parts) == 1 and default_role is None):
        raise KeyConfigError(f"{where}: expected 'KEY ROLE [NAME]' (role: infer or admin)")
    secret, role = parts[0], (parts[1] if len(parts) > 1 else default_role)
    if role not in ROLES:
        raise KeyConfigError(f"{where}: the field after the key must be a role, one of {', '.join(ROLES)}")
    if secret.startswith(HASH_PREFIX):
        hexd = secret[len(HASH_PREFIX):].lower()
        if not re.fullmatch(r"[0-9a-f]{64}", hexd):
            raise KeyConfigError(f"{where}: a stored key hash must be 'sha256:' and 64 hex digits")
    else:
        if len(secret) < 8:
            raise KeyConfigError(f"{where}: a key must be at least 8 characters")
        hexd = digest(secret)
    return hexd, role, parts[2] if len(parts) > 2 else None


def read_keys_file(path: str | Path) -> list[str]:
    """The entries of a keys file, as 'sha256:HEX ROLE [NAME]' (the plain keys never leave this function)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise KeyConfigError(f"API keys file {p}: {e.strerror or e}") from None
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        # '#' starts a comment at the start of a line or after a space, never inside a key.
        line = re.split(r"(?:^|\s)#", raw, maxsplit=1)[0].strip()
        if line:
            hexd, role, name = parse_key_entry(line, f"{p}:{number}", default_role=None)
            entries.append(" ".join([HASH_PREFIX + hexd, role, *([name] if name else [])]))
    if not entries:
        raise KeyConfigError(f"API keys file {p} has no keys; remove the setting to serve without keys")
    return entries


def hashed_entries(config: AuthConfig) -> list[str]:
    """Every configured key as 'sha256:HEX ROLE [NAME]', from the config and its (or the environment's) keys
    file: what the Gateway receives, so no plain key is passed to Ray."""
    entries = []
    for i, line in enumerate(config.api_keys):
        hexd, role, name = parse_key_entry(line, f"auth.api_keys[{i}]")
        entries.append(" ".join([HASH_PREFIX + hexd, role, *([name] if name else [])]))
    path = config.api_keys_file or os.environ.get(KEYS_FILE_ENV)
    if path:
        entries += read_keys_file(path)
    return entries


class KeyRing:
    """The keys a Gateway accepts, as digests. `authenticate` compares a presented key's digest with every
    entry's by `hmac.compare_digest`, all of them every time, so its timing says nothing about the keys."""

    def __init__(self, entries: list[str]):
        self.entries: list[tuple[bytes, Principal]] = []
        for i, entry in enumerate(entries):
            hexd, role, name = parse_key_entry(entry, f"key entry {i}")
            self.entries.append((bytes.fromhex(hexd), Principal(name or f"key-{hexd[:12]}", role)))

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def authenticate(self, key: str) -> Principal | None:
        presented = hashlib.sha256(key.encode()).digest()
        found = None
        for stored, principal in self.entries:
            if hmac.compare_digest(presented, stored) and found is None:
                found = principal
        return found


def caller_address(scope: dict[str, Any], headers: dict[bytes, bytes], trust_forwarded_for: bool) -> str:
    """Who is calling, for rate limits without keys: the client address, or X-Forwarded-For's first."""
    if trust_forwarded_for:
        forwarded = headers.get(b"x-forwarded-for", b"").decode("latin-1").split(",")[0].strip()
        if forwarded:
            return f"addr:{forwarded}"
    client = scope.get("client")
    return f"addr:{client[0]}" if client else "addr:unknown"


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    """The key a request carries: `Authorization: Bearer KEY` (OpenAI's clients), `Authorization: Basic` with the
    key as password (tritonclient's BasicAuth plugin), or `X-API-Key: KEY`."""
    auth = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic" and value.strip():
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return password or None
    api_key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    return api_key or None


# ---- which routes need which role ------------------------------------------------------------------------------

PROBES = ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready")
DOCS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
ADMIN_PREFIXES = ("/v2/repository", "/v1/admin")


def route_path(scope: dict[str, Any]) -> str:
    """The path the routes see: without the root path an application's route prefix (or http_options.root_path)
    puts in front, which Starlette strips before routing too."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def access_rule(path: str, config: AuthConfig) -> Role | Literal["open", "any"]:
    """What a path needs when keys are on: 'open' (probes, the playground's static files), 'any' (a key of any
    role), or the role."""
    if path in PROBES or path == "/" or path == "/ui" or path.startswith("/ui/"):
        return "open"
    if path == "/metrics":
        return "any" if config.protect_metrics else "open"
    if path in DOCS:
        return "open" if config.public_docs else "any"
    if path.startswith(ADMIN_PREFIXES):
        return "admin"
    return "infer"


def allows(principal: Principal, needed: str) -> bool:
    return needed in ("open", "any") or principal.role == "admin" or principal.role == needed


# ---- rate limits -----------------------------------------------------------------------------------------------


class TokenBucket:
    """`capacity` tokens, refilled at `rate` per second. `take` may run the bucket into debt (tokens charged after
    the fact); a caller is admitted while it holds at least `need`."""

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, capacity: float, rate: float, now: float):
        self.capacity, self.rate, self.tokens, self.updated = capacity, rate, capacity, now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, need: float, now: float) -> float:
        """Seconds until `need` tokens are there (0: now)."""
        self._refill(now)
        return 0.0 if self.tokens >= need else (need - self.tokens) / self.rate

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.tokens -= amount


@dataclass(frozen=True)
class Refusal:
    limit: str  # which limit: requests_per_second or generated_tokens_per_minute
    retry_after_s: int
    message: str


class RateLimiter:
    """Per-caller token buckets for one limit configuration, scaled by `share` (1/replicas for per_replica mode).
    Idle callers' buckets are dropped once full again, so memory follows active callers."""

    def __init__(self, config: RateLimitConfig, share: float = 1.0, clock=time.monotonic):
        self.config, self.share, self.clock = config, share, clock
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()
        self._last_sweep = clock()

    @property
    def enabled(self) -> bool:
        return self.config.requests_per_second is not None or self.config.generated_tokens_per_minute is not None

    def _bucket(self, table: dict[str, TokenBucket], caller: str, capacity: float, rate: float,
                now: float) -> TokenBucket:
        bucket = table.get(caller)
        if bucket is None:
            bucket = table[caller] = TokenBucket(capacity, rate, now)
        return bucket

    def admit(self, caller: str, generates: bool) -> Refusal | None:
        """Take one request token (and, for a generation, check the token budget is positive), or say why not."""
        c, now = self.config, self.clock()
        with self._lock:
            self._sweep(now)
            if c.generated_tokens_per_minute is not None and generates:
                per_minute = c.generated_tokens_per_minute * self.share
                bucket = self._bucket(self._tokens, caller, per_minute, per_minute / 60, now)
                wait = bucket.wait_for(0.0, now)  # admitted unless in debt
                if wait > 0:
                    return Refusal("generated_tokens_per_minute", max(1, math.ceil(wait)),
                                   f"rate limit: {c.generated_tokens_per_minute} generated tokens per minute "
                                   f"(limits of this server's rate_limits.generated_tokens_per_minute) used up; "
                                   f"retry after {max(1, math.ceil(wait))} s")
            if c.requests_per_second is not None:
                rate = c.requests_per_second * self.share
                burst = max(1.0, (c.burst or math.ceil(c.requests_per_second)) * self.share)
                bucket = self._bucket(self._requests, caller, burst, rate, now)
                wait = bucket.wait_for(1.0, now)
                if wait > 0:
                    return Refusal("requests_per_second", max(1, math.ceil(wait)),
                                   f"rate limit: {c.requests_per_second:g} requests per second (burst "
                                   f"{c.burst or math.ceil(c.requests_per_second)}; rate_limits.requests_per_second) "
                                   f"exceeded; retry after {max(1, math.ceil(wait))} s")
                bucket.take(1.0, now)
        return None

    def charge_tokens(self, caller: str, tokens: int) -> None:
        c = self.config
        if c.generated_tokens_per_minute is None or tokens <= 0:
            return
        now = self.clock()
        per_minute = c.generated_tokens_per_minute * self.share
        with self._lock:
            self._bucket(self._tokens, caller, per_minute, per_minute / 60, now).take(tokens, now)

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < 60:
            return
        self._last_sweep = now
        for table in (self._requests, self._tokens):
            for caller in [k for k, b in table.items() if b.wait_for(b.capacity, now) == 0]:
                del table[caller]


class RateLimiterActor:
    """One RateLimiter for every Gateway replica (rate_limits.mode 'shared'), as a Ray actor."""

    def __init__(self) -> None:
        self.limiter = RateLimiter(RateLimitConfig())

    def configure(self, config: dict[str, Any]) -> None:
        if RateLimitConfig.model_validate(config) != self.limiter.config:
            self.limiter = RateLimiter(RateLimitConfig.model_validate(config))

    def admit(self, caller: str, generates: bool) -> Refusal | None:
        return self.limiter.admit(caller, generates)

    def charge_tokens(self, caller: str, tokens: int) -> None:
        self.limiter.charge_tokens(caller, tokens)


def shared_rate_limiter(config: RateLimitConfig, app_name: str):
    """The cluster's one limiter actor for application `app_name`, created by the first Gateway replica that asks
    and set to `config` by each (all replicas of one deployment have the same config)."""
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=-1)(RateLimiterActor).options(
        name=f"genserve-ratelimit-{app_name}", namespace="genserve", lifetime="detached", get_if_exists=True,
    ).remote()
    actor.configure.remote(config.model_dump())
    return actor


# ---- request ids and the access log ---------------------------------------------------------------------------

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
REQUEST_ID_RULE = "1 to 128 characters of A-Z a-z 0-9 . _ : -"


def valid_request_id(value: str) -> bool:
    return REQUEST_ID_PATTERN.fullmatch(value) is not None


def access_record(**fields: Any) -> dict[str, Any]:
    """The access log's fields in a fixed order, None fields left out."""
    order = ("method", "route", "path", "model", "version", "status", "latency_ms", "items", "tokens",
             "request_id", "key_id", "client", "reason")
    return {k: fields[k] for k in order if fields.get(k) is not None}


PLAIN_VALUE = re.compile(r"[\w./{}:@+-]*")


def format_access(record: dict[str, Any], fmt: str) -> str:
    """One line: JSON, or key=value pairs with any value that is not plain (a client-sent path with spaces or
    line breaks) JSON-quoted, so no request can forge a line or a field."""
    if fmt == "json":
        return json.dumps({"event": "access", **record}, separators=(",", ":"))
    shown = (f"{k}={v}" if PLAIN_VALUE.fullmatch(str(v)) else f"{k}={json.dumps(str(v))}" for k, v in record.items())
    return "access " + " ".join(shown)
