"""Errors over HTTP: each domain error (service/errors.py) as a status and a body in the protocol of the route
that failed, and the `responses=` every route declares so the OpenAPI schema lists each status it can answer.

Bodies: genserve's {"error": {"type", "message", "param"?, "request_id"}} on /v1, OpenAI's on /v1/completions,
the Open Inference Protocol's {"error": "...", "request_id"} on /v2. tests/service/test_openapi_fuzz.py checks
that no route answers a status or a body it does not declare.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from genserve.service.edge import REQUEST_ID, REQUEST_ID_RULE, route_path
from genserve.service.errors import (
    Conflict,
    InvalidInput,
    ModelFailed,
    NotFound,
    Overloaded,
    ServiceError,
    TooLarge,
    Unavailable,
)

# The HTTP status of each domain error (the first class in an error's MRO that is here).
STATUS: dict[type[ServiceError], int] = {
    NotFound: 404, Conflict: 409, TooLarge: 413, InvalidInput: 400, ModelFailed: 500, Overloaded: 503, Unavailable: 503,
    ServiceError: 500,
}
RETRY_AFTER_S = 1  # what a 503 asks the client to wait


def status_of(error: ServiceError) -> int:
    return next(STATUS[c] for c in type(error).__mro__ if c in STATUS)


# ---- bodies, per protocol ----------------------------------------------------------------------------------


def error_body(type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    """genserve's error body, with the id of the request being handled (every error carries it)."""
    detail = {"type": type_, "message": message, "request_id": REQUEST_ID.get()}
    if param:
        detail["param"] = param
    return {"error": detail}


def openai_error(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body, with the id of the request being handled."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code,
                      "request_id": REQUEST_ID.get()}}


def v2_error(message: str) -> dict[str, Any]:
    """The Open Inference Protocol's error body, with the id of the request being handled."""
    return {"error": message, "request_id": REQUEST_ID.get()}


OPENAI_PATHS = re.compile(r"^/v1/completions$")
OPENAI_CODES = {"authentication_error": "invalid_api_key", "rate_limit_exceeded": "rate_limit_exceeded"}


def render_error(path: str, type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    """An error in the shape of the protocol `path` belongs to: the Open Inference Protocol's on /v2, OpenAI's on
    /v1/completions, genserve's elsewhere."""
    if path == "/v2" or path.startswith("/v2/"):
        return v2_error(message)
    if OPENAI_PATHS.match(path):
        return openai_error(message, type_, param, code=OPENAI_CODES.get(type_))
    return error_body(type_, message, param)


def error_response(path: str, error: ServiceError) -> JSONResponse:
    status = status_of(error)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse(render_error(path, error.type, error.message, error.param), status_code=status,
                        headers=headers)


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


def install_error_handlers(api: FastAPI) -> None:
    """Every error a route raises, answered in its protocol's body: domain errors, FastAPI's validation errors,
    Starlette's 404/405, and (a bug, not bad input) anything else as a 500 in the same format."""

    @api.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(route_path(request.scope), exc)

    @api.exception_handler(Exception)
    async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(render_error(route_path(request.scope), "internal_error", f"unexpected "
                                         f"{type(exc).__name__} while handling {request.method} {request.url.path}; "
                                         "this is a bug, please report it"), status_code=500)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
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


# ---- the responses routes declare in the OpenAPI schema --------------------------------------------------

REQUEST_ID_HEADER = {"X-Request-ID": {"description": "the request's id (the client's X-Request-ID if it sent one, "
                                      "else a new one); error bodies carry it as request_id", "required": True,
                                      "schema": {"type": "string"}}}
VERSION_HEADER = {"Genserve-Model-Version": {
    "description": "the version of the model that served the request (NAME=VERSION, comma-separated, when it "
    "used several models); absent when no model was reached", "required": False, "schema": {"type": "string"}}}
BAD_REQUEST_ID = f"the X-Request-ID header is not a valid request id ({REQUEST_ID_RULE})"
STATUS_DESCRIPTIONS = {
    400: "invalid input (the message says what and what is allowed)",
    401: "API keys are on and the request carries no valid key",
    403: "the API key lacks the role this route needs",
    404: "unknown model (or version)",
    409: "the model version is changing state (e.g. still unloading); retry once it has",
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
    out: dict[int | str, dict[str, Any]] = {200: {**(ok or {}), "headers": {**REQUEST_ID_HEADER, **VERSION_HEADER}}}
    default = {**STATUS_DESCRIPTIONS, 400: f"{STATUS_DESCRIPTIONS[400]}; or {BAD_REQUEST_ID}" if 400 in statuses
               else BAD_REQUEST_ID}
    for status in sorted({400, *statuses}):
        headers = {**REQUEST_ID_HEADER, **VERSION_HEADER, **(RETRY_AFTER if status in (429, 503) else {})}
        description = descriptions.get(f"s{status}", default[status])
        out[status] = {"model": model, "description": description, "headers": headers}
    return out
