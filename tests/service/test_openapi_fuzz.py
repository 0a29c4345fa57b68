"""The served OpenAPI schema tells the truth. schemathesis generates requests from /openapi.json (valid ones and
invalid ones), sends them to the session's real server and checks every answer: no 5xx, no status the route does
not declare, no body, Content-Type or missing header (X-Request-ID) that contradicts the schema. Random bodies
seldom fit a model, so every route is also sent requests that do, for every served model.

The budget is fixed (GENSERVE_FUZZ_EXAMPLES examples per route and generation mode, a quarter of that on the routes
that sample) and the generation derandomised (GENSERVE_FUZZ_SEED picks another sequence), so the test sends the
same few thousand requests every run, in about a minute. Failures are collected over all routes and reported
together, each with a curl command that reproduces it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections import defaultdict
from typing import Any

import httpx
import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service.conftest import TEXT, Server

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("GENSERVE_FUZZ_EXAMPLES", "30"))
SEED = int(os.environ.get("GENSERVE_FUZZ_SEED", "0"))
# Routes that run a model for every valid request (sampling, decoding) get a smaller share of the budget.
SLOW = {"generate", "completions", "sample", "complete", "interpolate", "reconstruct"}
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance, content_type_conformance,
          response_headers_conformance]


def hinted_schema(raw: dict[str, Any], models: list[str], versions: list[str]) -> dict[str, Any]:
    """The served schema with `name` and `version` path parameters (and /v1/completions' `model`) narrowed to the
    served models and versions and one unknown each, so that most requests reach a model instead of a 404
    (negative generation still sends anything else)."""
    schema = copy.deepcopy(raw)
    hints = {"name": [*models, "no-such-model"], "version": [*versions, "999"]}
    for operations in schema["paths"].values():
        for operation in operations.values():
            for param in operation.get("parameters", []):
                if param["in"] == "path" and param["name"] in hints:
                    param["schema"] = {"type": "string", "enum": hints[param["name"]]}
    completion = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    completion["model"] = {"type": "string", "enum": [TEXT, "no-such-model"]}
    return schema


class Checker:
    """Sends cases and validates the answers against the schema, collecting failures (at most two examples of
    each kind: route, check and status) and the statuses every route answered."""

    def __init__(self, url: str):
        self.url = url
        self.session = requests.Session()
        self.failures: dict[tuple[str, str], list[str]] = defaultdict(list)
        self.statuses: dict[str, set[int]] = defaultdict(set)
        self.cases = 0

    def __call__(self, case: schemathesis.Case) -> None:
        self.cases += 1
        label = f"{case.operation.method.upper()} {case.operation.path}"
        response = case.call(base_url=self.url, session=self.session, timeout=60)
        self.statuses[label].add(response.status_code)
        try:
            case.validate_response(response, checks=CHECKS)
        except (FailureGroup, AssertionError) as e:  # the checks that failed
            for failure in getattr(e, "exceptions", [e]):
                title = getattr(failure, "title", type(failure).__name__)
                found = self.failures[(label, f"{title} ({response.status_code})")]
                if len(found) < 2:
                    message = str(getattr(failure, "message", failure))[:600]
                    found.append(f"{message}\n  reproduce: {case.as_curl_command()}")

    def verdict(self, what: str, started: float) -> None:
        report = "\n\n".join(f"{label}: {kind} x{len(found)}\n" + "\n".join(found)
                             for (label, kind), found in sorted(self.failures.items()))
        seen = ", ".join(f"{label} {sorted(codes)}" for label, codes in sorted(self.statuses.items()))
        print(f"\n{what}: {self.cases} cases in {time.monotonic() - started:.0f}s; statuses seen: {seen}")
        self.session.close()
        assert not self.failures, f"{len(self.failures)} kinds of failure in {self.cases} cases:\n\n{report}"


@pytest.fixture(scope="module")
def served(server: Server) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The served OpenAPI schema and the served models' info."""
    raw = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    return raw, httpx.get(f"{server.url}/v1/models", timeout=30).json()["models"]


def test_fuzzed_requests_get_documented_answers(server: Server, served):
    raw, models = served
    schema = schemathesis.openapi.from_dict(hinted_schema(raw, [m["name"] for m in models],
                                                          sorted({m["version"] for m in models})))
    check, started = Checker(server.url), time.monotonic()

    def send(case: schemathesis.Case) -> None:
        check(case)

    for result in schema.get_all_operations():
        operation = result.ok()
        slow = operation.path.rsplit("/", 1)[-1] in SLOW
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz = settings(max_examples=max(3, EXAMPLES // 4) if slow else EXAMPLES, deadline=None, database=None,
                            derandomize=not SEED, phases=[Phase.explicit, Phase.generate], print_blob=False,
                            suppress_health_check=list(HealthCheck))(given(case=operation.as_strategy(
                                generation_mode=mode))(send))
            if SEED:
                fuzz = hypothesis.seed(SEED)(fuzz)
            with contextlib.suppress(hypothesis.errors.Unsatisfiable):  # negative mode, nothing to get wrong
                fuzz()
    check.verdict("fuzzed", started)


def valid_bodies(model: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Requests each POST route should answer with 200 for this model (or with a documented 400 where the model
    does not take them: a GAN's log_prob, a PixelCNN's reconstruct)."""
    spec, name = model["input"], model["name"]
    if spec["type"] == "records":
        record = [0.5] * spec["n_features"]
        inputs = {"records": [record, record]}
        v2 = [{"name": "records", "shape": [2, spec["n_features"]], "datatype": "FP32", "data": record * 2}]
        generated = {"sample": [{"n": 2, "seed": 0}]}
    elif spec["type"] == "image":
        image = [[i % 2 for i in range(spec["width"])] for _ in range(spec["height"])]
        inputs = {"images": [image, image]}
        v2 = [{"name": "images", "shape": [1, spec["height"], spec["width"]], "datatype": "INT64", "data": image}]
        labels = {"labels": [1, 2]} if spec["n_classes"] else {}
        generated = {"sample": [{"n": 2, "seed": 0, **labels}, {"n": 1, "format": "png"}],
                     "complete": [{"images": [image], "known_rows": 2, "n": 2, "seed": 0},
                                  {"images": [image], "known_pixels": 5, "format": "png"}],
                     "reconstruct": [{"images": [image]}],
                     "interpolate": [{"images": [image, image], "steps": 3, "format": "png"}]}
    else:
        inputs = {"texts": ["to be or not", "that is\nthe question"]}
        v2 = [{"name": "texts", "shape": [1], "datatype": "BYTES", "data": ["to be or not"]}]
        generated = {"generate": [{"prompt": "to be", "max_new_tokens": 5, "logprobs": True, "top_logprobs": 2},
                                  {"prompt": "to", "max_new_tokens": 4, "num_beams": 2, "num_return_sequences": 2},
                                  {"prompt": "to", "max_new_tokens": 4, "stream": True, "n": 2, "seed": 1}],
                     "score": [{"texts": inputs["texts"]}]}
    return {
        "log_prob": [inputs, {**inputs, "per_pixel": True} if spec["type"] == "image" else
                     {**inputs, "responsibilities": True}],
        "anomaly": [inputs, {**inputs, "score": "likelihood_ratio", "false_positive_rate": 0.05}] +
                   ([{**inputs, "per_line": True}] if spec["type"] == "text" else []),
        "v2": [{"inputs": v2}, {"inputs": v2, "outputs": [{"name": "log_prob"}], "id": "a"}],
        **{route: [{"model": name, **body} for body in bodies] for route, bodies in {
            "completions": [{"prompt": "to be", "max_tokens": 4, "logprobs": 2},
                            {"prompt": "to", "max_tokens": 3, "stream": True, "logprobs": 1,
                             "stream_options": {"include_usage": True}},
                            {"prompt": ["to", "be"], "max_tokens": 3, "n": 2, "use_beam_search": True}]}.items()
           if spec["type"] == "text"},
        **generated,
    }


def test_valid_requests_to_every_model_get_documented_answers(server: Server, served):
    """The fuzzer's random bodies seldom fit a model (the right number of features, image size, a text model's
    characters), so every route is also sent requests that do, for every served model: the 200 answers of every
    kind of model are checked against their schemas too."""
    raw, models = served
    schema = schemathesis.openapi.from_dict(raw)
    check, started = Checker(server.url), time.monotonic()
    paths = {"log_prob": "/v1/models/{name}/log_prob", "anomaly": "/v1/models/{name}/anomaly",
             "sample": "/v1/models/{name}/sample", "complete": "/v1/models/{name}/complete",
             "reconstruct": "/v1/models/{name}/reconstruct", "interpolate": "/v1/models/{name}/interpolate",
             "generate": "/v1/models/{name}/generate", "score": "/v1/models/{name}/score",
             "completions": "/v1/completions", "v2": "/v2/models/{name}/infer"}
    for model in models:
        name = {"name": model["name"]}
        for path in ("/v1/models/{name}", "/v2/models/{name}", "/v2/models/{name}/ready"):
            check(schema[path]["GET"].Case(path_parameters=name))
        for path, version in (("/v2/models/{name}/versions/{version}", model["version"]),
                              ("/v2/models/{name}/versions/{version}/infer", model["version"])):
            if path.endswith("/infer"):
                body = valid_bodies(model)["v2"][0]
                check(schema[path]["POST"].Case(path_parameters={**name, "version": version}, body=body,
                                                 media_type="application/json"))
            else:
                check(schema[path]["GET"].Case(path_parameters={**name, "version": version}))
        for route, bodies in valid_bodies(model).items():
            operation = schema[paths[route]]["POST"]
            for body in bodies:
                check(operation.Case(path_parameters={} if route == "completions" else name, body=body,
                                     media_type="application/json"))
    for path in ("/healthz", "/readyz", "/metrics", "/v1/models", "/v2", "/v2/health/live", "/v2/health/ready"):
        check(schema[path]["GET"].Case())
    check.verdict("valid requests", started)
