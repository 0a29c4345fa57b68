"""The edge's pieces on their own: keys and roles, token buckets, request ids, the access log line."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from genserve.service.edge import (
    AuthConfig,
    KeyConfigError,
    KeyRing,
    RateLimitConfig,
    RateLimiter,
    RateLimiterActor,
    access_record,
    access_rule,
    allows,
    caller_address,
    format_access,
    hashed_entries,
    parse_key_entry,
    presented_key,
    route_path,
    valid_request_id,
)

INFER_KEY = "infer-key-0123456789"
ADMIN_KEY = "admin-key-9876543210"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# ---- keys ----------------------------------------------------------------------------------------------------


def test_entries_plain_or_hashed_with_roles_and_names():
    assert parse_key_entry(INFER_KEY + " infer", "x") == (sha(INFER_KEY), "infer", None)
    assert parse_key_entry(f"sha256:{sha(ADMIN_KEY).upper()} admin ops", "x") == (sha(ADMIN_KEY), "admin", "ops")
    assert parse_key_entry(ADMIN_KEY, "x") == (sha(ADMIN_KEY), "admin", None)  # --api-key: admin by default


@pytest.mark.parametrize(("line", "says"), [
    ("short infer", "at least 8 characters"),
    (f"{INFER_KEY} root", "must be a role, one of infer, admin"),
    (f"infer {INFER_KEY}", "must be a role"),  # the key where the role belongs: not repeated in the error
    ("sha256:abc infer", "64 hex digits"),
    (f"{INFER_KEY} infer name extra", "expected 'KEY ROLE [NAME]'"),
])
def test_bad_entries_say_where_and_why_without_the_key(line: str, says: str):
    with pytest.raises(KeyConfigError, match=r"keys\.txt:3") as e:
        parse_key_entry(line, "keys.txt:3")
    assert says in str(e.value)
    assert INFER_KEY not in str(e.value)


def test_keys_file_hash_inside_a_key_and_roles_required(tmp_path):
    path = tmp_path / "keys"
    path.write_text("pass#word-123 infer ci  # a '#' inside a key is part of it\n")
    ring = KeyRing(hashed_entries(AuthConfig(api_keys_file=str(path))))
    assert ring.authenticate("pass#word-123").role == "infer" and ring.authenticate("pass") is None
    path.write_text(f"{INFER_KEY}\n")  # the role may be left out on the command line only
    with pytest.raises(KeyConfigError, match="expected 'KEY ROLE"):
        hashed_entries(AuthConfig(api_keys_file=str(path)))


def test_keys_file_comments_and_hashing(tmp_path, monkeypatch):
    path = tmp_path / "keys"
    path.write_text(f"# operators\n{INFER_KEY} infer analytics  # the dashboards\n\nsha256:{sha(ADMIN_KEY)} admin\n")
    monkeypatch.setenv("GENSERVE_API_KEYS_FILE", str(path))
    entries = hashed_entries(AuthConfig(api_keys=["extra-key-000 infer"]))
    assert entries == [f"sha256:{sha('extra-key-000')} infer", f"sha256:{sha(INFER_KEY)} infer analytics",
                       f"sha256:{sha(ADMIN_KEY)} admin"]
    assert not any(INFER_KEY in e for e in entries)  # no plain key leaves the file
    path.write_text("# nothing\n")
    with pytest.raises(KeyConfigError, match="has no keys"):
        hashed_entries(AuthConfig())
    with pytest.raises(KeyConfigError, match="No such file"):
        hashed_entries(AuthConfig(api_keys_file=str(tmp_path / "missing")))


def test_keyring_authenticates_by_digest():
    ring = KeyRing([f"sha256:{sha(INFER_KEY)} infer analytics", f"sha256:{sha(ADMIN_KEY)} admin"])
    assert ring.enabled and not KeyRing([]).enabled
    infer, admin = ring.authenticate(INFER_KEY), ring.authenticate(ADMIN_KEY)
    assert (infer.key_id, infer.role) == ("analytics", "infer")
    assert (admin.key_id, admin.role) == (f"key-{sha(ADMIN_KEY)[:12]}", "admin")
    assert ring.authenticate(INFER_KEY[:-1]) is None
    assert ring.authenticate(INFER_KEY + "x") is None
    assert ring.authenticate("") is None


def test_presented_key_bearer_basic_and_header():
    assert presented_key({b"authorization": f"Bearer {INFER_KEY}".encode()}) == INFER_KEY
    assert presented_key({b"authorization": f"bearer   {INFER_KEY} ".encode()}) == INFER_KEY
    basic = base64.b64encode(f"anyone:{INFER_KEY}".encode())
    assert presented_key({b"authorization": b"Basic " + basic}) == INFER_KEY  # tritonclient's BasicAuth
    assert presented_key({b"x-api-key": INFER_KEY.encode()}) == INFER_KEY
    assert presented_key({b"authorization": b"Basic not-base64!"}) is None
    assert presented_key({b"authorization": b"Bearer "}) is None
    assert presented_key({}) is None


def test_rules_apply_to_the_path_the_routes_see():
    """Behind a route prefix (root_path), the rules see the path without it, as Starlette's routing does."""
    scope = {"path": "/genserve/v2/repository/index", "root_path": "/genserve"}
    assert route_path(scope) == "/v2/repository/index"
    assert access_rule(route_path(scope), AuthConfig()) == "admin"
    assert route_path({"path": "/genserve", "root_path": "/genserve"}) == "/"
    assert route_path({"path": "/healthz", "root_path": ""}) == "/healthz"


def test_access_rules():
    config = AuthConfig()
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/ui", "/ui/app.js", "/", "/metrics"):
        assert access_rule(path, config) == "open", path
    for path in ("/v1/models", "/v1/models/wine/log_prob", "/v1/completions", "/v2/models/wine/infer", "/v2"):
        assert access_rule(path, config) == "infer", path
    assert access_rule("/docs", config) == "any" and access_rule("/openapi.json", config) == "any"
    assert access_rule("/v2/repository/index", config) == "admin"
    protected = AuthConfig(protect_metrics=True, public_docs=True)
    assert access_rule("/metrics", protected) == "any" and access_rule("/docs", protected) == "open"
    ring = KeyRing([f"sha256:{sha(INFER_KEY)} infer", f"sha256:{sha(ADMIN_KEY)} admin"])
    infer, admin = ring.authenticate(INFER_KEY), ring.authenticate(ADMIN_KEY)
    assert allows(infer, "infer") and allows(infer, "any") and not allows(infer, "admin")
    assert allows(admin, "infer") and allows(admin, "admin")


def test_caller_address_trusts_forwarded_for_only_when_told():
    scope, headers = {"client": ("10.0.0.7", 51234)}, {b"x-forwarded-for": b"203.0.113.9, 10.0.0.7"}
    assert caller_address(scope, headers, trust_forwarded_for=False) == "addr:10.0.0.7"
    assert caller_address(scope, headers, trust_forwarded_for=True) == "addr:203.0.113.9"
    assert caller_address({}, {}, trust_forwarded_for=True) == "addr:unknown"


# ---- rate limits ----------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_second_bucket_with_burst():
    clock = Clock()
    limiter = RateLimiter(RateLimitConfig(requests_per_second=2, burst=3), clock=clock)
    assert [limiter.admit("a", False) for _ in range(3)] == [None] * 3
    refused = limiter.admit("a", False)
    assert refused.limit == "requests_per_second" and refused.retry_after_s == 1
    assert "2 requests per second (burst 3" in refused.message
    assert limiter.admit("b", False) is None  # another caller has its own bucket
    clock.now += 0.5  # one token back at 2/s
    assert limiter.admit("a", False) is None
    assert limiter.admit("a", False) is not None


def test_generated_tokens_per_minute_charged_after_the_fact():
    clock = Clock()
    limiter = RateLimiter(RateLimitConfig(generated_tokens_per_minute=60), clock=clock)
    assert limiter.admit("a", generates=True) is None
    limiter.charge_tokens("a", 100)  # 40 into debt: refused until the debt is repaid at 1 token/s
    refused = limiter.admit("a", generates=True)
    assert refused.limit == "generated_tokens_per_minute" and refused.retry_after_s == 40
    assert limiter.admit("a", generates=False) is None  # scoring is not a generation
    clock.now += 41
    assert limiter.admit("a", generates=True) is None


def test_per_replica_share_and_the_shared_actor_logic():
    clock = Clock()
    half = RateLimiter(RateLimitConfig(requests_per_second=4, burst=4), share=0.5, clock=clock)
    assert sum(half.admit("a", False) is None for _ in range(10)) == 2  # 2 replicas: each holds half the burst
    actor = RateLimiterActor()  # what mode 'shared' runs in one Ray actor
    actor.configure(RateLimitConfig(requests_per_second=1, burst=2).model_dump())
    assert [actor.admit("a", False) is None for _ in range(3)] == [True, True, False]
    actor.configure(RateLimitConfig(requests_per_second=1, burst=2).model_dump())  # same config: buckets kept
    assert actor.admit("a", False) is not None


def test_idle_buckets_are_dropped():
    clock = Clock()
    limiter = RateLimiter(RateLimitConfig(requests_per_second=1), clock=clock)
    for caller in range(100):
        limiter.admit(f"c{caller}", False)
    clock.now += 120
    limiter.admit("new", False)
    assert set(limiter._requests) == {"new"}


# ---- request ids and the access log --------------------------------------------------------------------------


def test_request_ids():
    for good in ("abc", "0f3e-42", "req_1.2:3", "a" * 128):
        assert valid_request_id(good)
    for bad in ("", "a" * 129, "has space", "quote\"", "new\nline", "é"):
        assert not valid_request_id(bad)


def test_access_line_text_and_json_never_hold_the_key():
    record = access_record(method="POST", route="/v1/models/{name}/log_prob", model="wine", version="1",
                           status=200, latency_ms=3.25, items=2, tokens=None, request_id="r1", key_id="analytics")
    assert list(record) == ["method", "route", "model", "version", "status", "latency_ms", "items", "request_id",
                            "key_id"]
    text = format_access(record, "text")
    assert text == ("access method=POST route=/v1/models/{name}/log_prob model=wine version=1 status=200 "
                    "latency_ms=3.25 items=2 request_id=r1 key_id=analytics")
    assert json.loads(format_access(record, "json")) == {"event": "access", **record}
    forged = format_access(access_record(method="GET", route="/x\naccess method=POST status=200 key_id=ops",
                                         status=401, request_id="r2"), "text")
    assert "\n" not in forged and 'route="/x\\naccess method=POST status=200 key_id=ops"' in forged
