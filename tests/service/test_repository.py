"""Live model management without Ray: version policies, version application names, the traffic split's draw, the
admin API's request checks and the version-pinned routes of the OpenAPI schema."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from pydantic import ValidationError

from genserve.service.api.builder import build_api
from genserve.service.api.v1.schemas import TrafficRequest, VersionRequest
from genserve.service.api.v2.schemas import RepositoryLoadRequest, RepositoryUnloadRequest
from genserve.service.repository import ManagementConfig, VersionPolicy, app_name, parse_app_name, pick_version

VERSIONS = ["1", "2", "3", "5", "10"]


def test_version_policies_select_as_tritons_do() -> None:
    assert VersionPolicy().select(VERSIONS) == ["10"]
    assert VersionPolicy.model_validate({"latest": {"num_versions": 2}}).select(VERSIONS) == ["5", "10"]
    assert VersionPolicy.model_validate({"latest": {"num_versions": 9}}).select(VERSIONS) == VERSIONS
    assert VersionPolicy.model_validate({"all": {}}).select(VERSIONS) == VERSIONS
    assert VersionPolicy.model_validate({"specific": {"versions": [3, 1, 4]}}).select(VERSIONS) == ["1", "3"]
    assert VersionPolicy.model_validate({"specific": {"versions": [1, 3]}}).describe() == "specific 1, 3"
    with pytest.raises(ValidationError, match="not latest and all"):
        VersionPolicy.model_validate({"latest": {"num_versions": 1}, "all": {}})
    with pytest.raises(ValidationError):
        VersionPolicy.model_validate({"latest": {"num_versions": 0}})


def test_a_model_may_have_its_own_policy() -> None:
    config = ManagementConfig.model_validate({"version_policies": {"lm": {"all": {}}}})
    assert config.policy("lm").select(VERSIONS) == VERSIONS and config.policy("gmm").select(VERSIONS) == ["10"]
    assert config.control == "none" and config.promote_new


def test_version_application_names_round_trip() -> None:
    name = app_name("genserve", "breast-cancer", "12")
    assert name == "genserve--breast-cancer--v12"
    assert parse_app_name("genserve", name) == ("breast-cancer", "12")
    assert parse_app_name("genserve", "genserve") is None
    assert parse_app_name("other", name) is None
    assert parse_app_name("genserve", "genserve--x--vlatest") is None


def test_the_traffic_split_is_drawn_per_request() -> None:
    rng = random.Random(0)
    draws = Counter(pick_version({"traffic": {"3": 90, "4": 10}}, rng) for _ in range(20_000))
    assert set(draws) == {"3", "4"} and abs(draws["4"] / 20_000 - 0.10) < 0.01
    assert pick_version({"traffic": {"7": 100}}, rng) == "7"


def test_admin_requests_are_checked() -> None:
    assert TrafficRequest.model_validate({"split": {"3": 90, "4": 10}}).split == {"3": 90, "4": 10}
    for bad in ({"split": {"3": 90}}, {"split": {"x": 100}}, {"split": {"3": 101, "4": -1}}, {"split": {}}):
        with pytest.raises(ValidationError):
            TrafficRequest.model_validate(bad)
    assert VersionRequest.model_validate({}).version is None
    with pytest.raises(ValidationError):
        VersionRequest.model_validate({"version": "latest"})
    # What tritonclient sends: {} to load, unload_dependents to unload; a config override is refused.
    assert RepositoryLoadRequest.model_validate({}).parameters.version is None
    assert RepositoryUnloadRequest.model_validate({"parameters": {"unload_dependents": False}})
    with pytest.raises(ValidationError):
        RepositoryLoadRequest.model_validate({"parameters": {"config": "{}"}})


def test_every_model_route_has_a_version_pinned_twin_in_the_openapi_schema() -> None:
    schema = build_api().openapi()
    paths = schema["paths"]
    model_routes = [p for p in paths if p.startswith("/v1/models/{name}") and "/versions/" not in p]
    assert model_routes
    for path in model_routes:
        twin = "/v1/models/{name}/versions/{version}" + path.removeprefix("/v1/models/{name}")
        assert twin in paths, twin
        for method, operation in paths[twin].items():
            assert any(p["name"] == "version" and p["in"] == "path" for p in operation["parameters"]), (twin, method)
    operation_ids = [op["operationId"] for ops in paths.values() for op in ops.values()]
    assert len(operation_ids) == len(set(operation_ids))
    assert {"/v1/admin/models", "/v2/repository/models/{name}/load", "/v2/repository/models/{name}/unload"} <= set(
        paths)
    ok = paths["/v1/models/{name}/log_prob"]["post"]["responses"]["200"]
    assert "Genserve-Model-Version" in ok["headers"]
