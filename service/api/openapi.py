"""The last touches to the OpenAPI schema FastAPI generates from the routes, so that it says exactly what the
gateway does (tests/service/test_openapi_fuzz.py holds it to that):

- every operation takes the optional `X-Request-ID` request header (a malformed one is a 400 on any route);
- FastAPI lists a 422 with its own HTTPValidationError body on every route with parameters that does not declare
  one. genserve never sends that body (its validation errors are genserve's ErrorResponse, and every route with a
  validated body declares that 422 itself); the routes left have only string path parameters, which nothing can
  fail, or read their body themselves (/v2 infer), so that 422 is dropped;
- every /v1/models/{name}/... route is also /v1/models/{name}/versions/{version}/..., the same route pinned to one
  loaded version (the gateway's middleware routes it; service/middleware.py), so each is listed twice.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI

from genserve.service.edge import REQUEST_ID_PATTERN

REQUEST_ID_PARAMETER = {
    "name": "X-Request-ID", "in": "header", "required": False,
    "description": "an id for this request, echoed in the X-Request-ID response header, error bodies and logs; "
    "one is generated when none is sent",
    "schema": {"type": "string", "pattern": f"^{REQUEST_ID_PATTERN.pattern}$"},
}
FASTAPI_422 = "#/components/schemas/HTTPValidationError"
MODEL_PATH = "/v1/models/{name}"
VERSION_PARAMETER = {
    "name": "version", "in": "path", "required": True,
    "description": "one loaded version of the model (GET /v1/admin/models lists them); without it the request goes "
    "to the default version, or one drawn by the model's traffic split",
    "schema": {"type": "string", "title": "Version"},
}


def versioned_paths(paths: dict[str, Any]) -> dict[str, Any]:
    """`paths` with each /v1/models/{name}[/...] route also as /v1/models/{name}/versions/{version}[/...]."""
    out = {}
    for path, operations in paths.items():
        out[path] = operations
        if path != MODEL_PATH and not path.startswith(MODEL_PATH + "/"):
            continue
        pinned = {}
        for method, operation in operations.items():
            operation = copy.deepcopy(operation)
            operation["operationId"] = operation.get("operationId", path) + "_version"
            operation["parameters"] = [*operation.get("parameters", []), VERSION_PARAMETER]
            if "404" in operation.get("responses", {}):
                operation["responses"]["404"]["description"] = "unknown model, or the version is not loaded"
            pinned[method] = operation
        out[MODEL_PATH + "/versions/{version}" + path[len(MODEL_PATH):]] = pinned
    return out


def finish(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` (FastAPI's, changed in place) with the X-Request-ID parameter, without unsendable 422s, and with
    the version-pinned model routes."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            parameters = operation.setdefault("parameters", [])
            if not any(p.get("name", "").lower() == "x-request-id" for p in parameters):
                parameters.append(REQUEST_ID_PARAMETER)
            response = operation.get("responses", {}).get("422", {})
            body = response.get("content", {}).get("application/json", {}).get("schema", {})
            if body.get("$ref") == FASTAPI_422:
                del operation["responses"]["422"]
    schema["paths"] = versioned_paths(schema.get("paths", {}))
    components = schema.get("components", {}).get("schemas", {})
    if FASTAPI_422 not in repr(schema.get("paths")):
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
    return schema


def install(app: FastAPI) -> None:
    """Serve `finish(FastAPI's schema)` at the app's /openapi.json and /docs."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = finish(generate())
        return app.openapi_schema

    app.openapi = openapi
