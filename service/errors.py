"""The REST API's error type and body, shared by the ingress (service/app.py) and its route mixins."""

from __future__ import annotations

from typing import Any

from service.schemas import ErrorResponse
from training import artifact as art

# The error responses routes declare in the OpenAPI schema.
ERRORS = {
    400: {"model": ErrorResponse, "description": "invalid input (message says what and what is allowed)"},
    404: {"model": ErrorResponse, "description": "unknown model"},
    413: {"model": ErrorResponse, "description": "body, records, samples or images over their limit"},
    415: {"model": ErrorResponse, "description": "body is not application/json"},
    422: {"model": ErrorResponse, "description": "body does not match the schema"},
}


class ApiError(Exception):
    """Answered as {"error": {"type", "message"}} with `status`."""

    def __init__(self, status: int, type_: str, message: str):
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message


def error_body(type_: str, message: str) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message}}


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
