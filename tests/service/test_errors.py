"""The one error model: every domain error has one HTTP status, and renders in the protocol of the path that failed;
a replica's failure maps to one domain error whatever the family."""

from __future__ import annotations

import json

import pytest

from genserve.service.api.errors import error_response, status_of
from genserve.service.catalog import replica_failure
from genserve.service.errors import (
    InvalidInput,
    LimitExceeded,
    ModelFailed,
    NotCalibrated,
    NotFound,
    Overloaded,
    ServiceError,
    TooLarge,
    Unavailable,
    WrongKind,
)
from genserve.service.isolation import OutOfResources, OverLimit, ReplicaBusy, RequestFailed


@pytest.mark.parametrize(("error", "status", "type_"), [
    (InvalidInput("x"), 400, "invalid_request"), (WrongKind("x"), 400, "wrong_model_kind"),
    (LimitExceeded("x"), 400, "limit_exceeded"), (NotCalibrated("x"), 400, "not_calibrated"),
    (TooLarge("x"), 413, "limit_exceeded"), (NotFound("x"), 404, "model_not_found"),
    (ModelFailed("x"), 500, "model_error"), (Overloaded("x"), 503, "overloaded"),
    (Unavailable("x"), 503, "model_unavailable"), (InvalidInput("x", type_="invalid_label"), 400, "invalid_label"),
])
def test_each_domain_error_has_one_status_and_a_type(error: ServiceError, status: int, type_: str) -> None:
    assert status_of(error) == status and error.type == type_


def test_an_error_renders_in_its_protocol() -> None:
    error = LimitExceeded("max_new_tokens=9 exceeds the limit of 8", param="max_new_tokens")
    v1 = json.loads(error_response("/v1/models/m/generate", error).body)["error"]
    assert (v1["type"], v1["param"]) == ("limit_exceeded", "max_new_tokens") and "exceeds" in v1["message"]
    openai = json.loads(error_response("/v1/completions", error).body)["error"]
    assert set(openai) >= {"message", "type", "param", "code"} and openai["param"] == "max_new_tokens"
    v2 = json.loads(error_response("/v2/models/m/infer", error).body)
    assert isinstance(v2["error"], str) and "exceeds" in v2["error"]
    busy = error_response("/v1/models/m/log_prob", Overloaded("queue full"))
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"


@pytest.mark.parametrize(("failure", "expected"), [
    (ReplicaBusy("queue over 10"), Overloaded), (OutOfResources("out of memory"), Overloaded),
    (RequestFailed("NaN logits"), ModelFailed), (OverLimit("over max_queued_pixels"), LimitExceeded),
    (RuntimeError("actor died"), Unavailable),
])
def test_a_replica_failure_maps_to_one_domain_error(failure: Exception, expected: type[ServiceError]) -> None:
    error = replica_failure("m", "score", failure)
    assert type(error) is expected
    if expected is Unavailable:
        assert "RuntimeError" in error.message and "retry" in error.message
