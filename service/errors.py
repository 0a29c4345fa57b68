"""The REST API's error type and body, shared by the ingress (service/app.py) and its route mixins."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from genserve.artifacts import artifact as art
from genserve.service.edge import REQUEST_ID, REQUEST_ID_RULE
from genserve.service.schemas import ErrorResponse, V2ErrorResponse
from genserve.service.text_schemas import openai_error, v2_error

# ---- the responses routes declare in the OpenAPI schema --------------------------------------------------
# Every status a route can answer, each with its body in the route's protocol: genserve's ErrorResponse on /v1,
# OpenAI's error on /v1/completions, the Open Inference Protocol's {"error": "..."} on /v2. The fuzz test
# (tests/service/test_openapi_fuzz.py) checks that no route answers a status or a body not declared here.

REQUEST_ID_HEADER = {"X-Request-ID": {"description": "the request's id (the client's X-Request-ID if it sent one, "
                                      "else a new one); error bodies carry it as request_id", "required": True,
                                      "schema": {"type": "string"}}}
BAD_REQUEST_ID = f"the X-Request-ID header is not a valid request id ({REQUEST_ID_RULE})"
STATUS_DESCRIPTIONS = {
    400: "invalid input (the message says what and what is allowed)",
    401: "API keys are on and the request carries no valid key",
    403: "the API key lacks the role this route needs",
    404: "unknown model (or version)",
    413: "body, records, samples, texts or images over their limit",
    415: "body is not application/json",
    422: "body does not match the schema",
    429: "the key's rate limit is exceeded; retry after Retry-After seconds",
    500: "model_error: the model failed on this request alone (a retry fails the same way; other requests are "
         "answered); internal_error: a bug in genserve",
    503: "the model's replica is unavailable or overloaded; retry after Retry-After seconds",
}
AUTH = (401, 403, 429)  # any protected route, when API keys are on
POST = (413, 415, 422)  # any POST with a JSON body, from the gateway's middleware and validation
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def responses(model: type[BaseModel], *statuses: int, ok: dict[str, Any] | None = None,
              **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status with `model`, the route protocol's error body, as its body
    (descriptions by status, overridable as s404="..."), 400 always (any route refuses a malformed X-Request-ID),
    every response with the X-Request-ID header, and the 200 response completed by `ok`."""
    out: dict[int | str, dict[str, Any]] = {200: {**(ok or {}), "headers": REQUEST_ID_HEADER}}
    default = {**STATUS_DESCRIPTIONS, 400: f"{STATUS_DESCRIPTIONS[400]}; or {BAD_REQUEST_ID}" if 400 in statuses
               else BAD_REQUEST_ID}
    for status in sorted({400, *statuses}):
        headers = {**REQUEST_ID_HEADER, **(RETRY_AFTER if status in (429, 503) else {})}
        description = descriptions.get(f"s{status}", default[status])
        out[status] = {"model": model, "description": description, "headers": headers}
    return out


ERRORS = responses(ErrorResponse, 400, 404, *POST, 500, 503, *AUTH)  # /v1 POST routes of a model
GET_ERRORS = responses(ErrorResponse, 404, *AUTH)  # GET /v1/models/{name}
AUTH_ERRORS = responses(ErrorResponse, *AUTH)  # other protected /v1 GET routes
V2_ERRORS = responses(V2ErrorResponse, 400, 404, 413, 415, 500, 503, *AUTH)  # /v2 infer
V2_GET_ERRORS = responses(V2ErrorResponse, 404, *AUTH)  # /v2 model metadata


class ApiError(Exception):
    """Answered as {"error": {"type", "message"}} with `status`."""

    def __init__(self, status: int, type_: str, message: str):
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message


def error_body(type_: str, message: str) -> dict[str, Any]:
    """genserve's error body, with the id of the request being handled (every error carries it)."""
    return {"error": {"type": type_, "message": message, "request_id": REQUEST_ID.get()}}


OPENAI_PATHS = re.compile(r"^/v1/completions$")


def render_error(path: str, type_: str, message: str) -> dict[str, Any]:
    """An error refused at the edge (keys, limits, body) in the shape of the protocol `path` belongs to: the Open
    Inference Protocol's on /v2, OpenAI's on /v1/completions, genserve's elsewhere."""
    if path == "/v2" or path.startswith("/v2/"):
        return v2_error(message)
    if OPENAI_PATHS.match(path):
        code = {"authentication_error": "invalid_api_key", "rate_limit_exceeded": "rate_limit_exceeded"}.get(type_)
        return openai_error(message, type_, code=code)
    return error_body(type_, message)


def require_density(name: str, manifest: art.Manifest, endpoint: str) -> None:
    """A 400 for `endpoint` (log_prob, anomaly, ...) on a model that gives no density (a GAN: it only samples)."""
    if manifest.density == "none":
        raise ApiError(400, "density_unavailable", f"model {name!r} is a {manifest.kind}: it can only sample (its "
                       f"density capability is 'none'), so it has no {endpoint}; use /v1/models/{name}/sample")


def model_kind_phrase(name: str, manifest: art.Manifest) -> str:
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
