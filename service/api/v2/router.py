"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) for genserve's density models, so KServe
and Triton clients (`tritonclient.http`, KServe's InferenceRESTClient, plain HTTP) can score records, images
and texts. This router is a thin adapter over the services (service/services/); the tensor codec is tensors.py.

Routes: GET /v2 (server metadata), /v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/{v}]
(model metadata), .../ready, and POST .../infer; the model repository extension: POST /v2/repository/index,
/v2/repository/models/{name}/load and /unload (admin role when API keys are on). Unversioned routes go to the
model's default version (or one drawn by its traffic split); /versions/{v}/ routes to that loaded version.

Tensor mapping (-1: any batch size >= 1; one output element per input item):

    kind     inputs                                         outputs
    records  records  FP32 [-1, n_features]                 log_prob FP64, anomaly_score FP64, percentile FP64,
    image    images   INT64 [-1, height, width]             is_anomaly BOOL, all [-1]; GMMs also
             labels   INT64 [-1] (class-conditional, opt.)  component INT64 [-1], responsibility FP64 [-1]
    text     texts    BYTES [-1] (UTF-8 strings)            texts with per_line: text_index INT64 [-1], line
                                                            INT64 [-1] (then one element per non-blank line)

Other numeric datatypes are accepted where they hold the same values: records take any FP or INT type;
images any INT/UINT type or FP with whole numbers; labels any INT/UINT type. JSON numbers are used as given
(an FP32-declared JSON number is not rounded to float32), so JSON and /v1 give identical results.

An infer request is answered by the same services as /v1 (anomaly scores, or the model's log-probability when
no anomaly output is wanted or the model has no calibration), so every check, limit and number is the same as
on /v1. Request parameters `score`, `false_positive_rate`,
`threshold`, `per_line` and `batch_test` are the anomaly request's fields; the response's parameters say which
score type and threshold were used, and with `batch_test` the batch typicality test's result (`batch_score_type`,
`batch_n`, `batch_mean`, `batch_typical`, `batch_statistic`, `batch_p_value`, `batch_is_anomaly`). A request
naming no outputs gets all of them, or log_prob alone (plus a GMM's component and responsibility) from a model
with no calibration; naming an anomaly output of such a model is a 400 not-calibrated error.

Binary tensor data extension (Triton's `binary_tensor_data`, tritonclient's default): with the header
`Inference-Header-Content-Length: N` the body's first N bytes are the JSON request, followed by each input
with `parameters.binary_data_size` in order, raw little-endian row-major (BOOL one byte, BYTES a uint32
length before each element). Outputs are binary when the request output has `parameters.binary_data: true`,
or the request has `parameters.binary_data_output: true` and the output does not say otherwise; such a
response is application/octet-stream with the same header. gzip/deflate request bodies are accepted
(Content-Encoding), up to the body limit once decompressed.

Errors are the protocol's `{"error": "<message>"}`: 400 for anything wrong with the request (the message says
what and what is allowed), 404 for an unknown model, route or version, 413 past a limit, 503 when a model
cannot answer.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from genserve.artifacts import artifact as art
from genserve.service.api.common import ServicesDep, inline_schema, record_metrics
from genserve.service.api.errors import AUTH, responses
from genserve.service.api.fast_json import FastJSONRoute
from genserve.service.api.v2.schemas import (
    HEALTH_FALSE,
    HEALTH_OK,
    INFER_BODY,
    INFER_OK,
    RepositoryIndexRequest,
    RepositoryLoadRequest,
    RepositoryModel,
    RepositoryUnloadRequest,
    V2ErrorResponse,
    V2InferResponse,
    V2Input,
    V2ModelMetadata,
    V2RequestedOutput,
    V2ServerMetadata,
)
from genserve.service.api.v2.tensors import (
    ANOMALY_OUTPUTS,
    EXTENSIONS,
    GMM_OUTPUTS,
    HEADER_LENGTH,
    IGNORED_PARAMETERS,
    LINE_OUTPUTS,
    OUTPUTS,
    PARAMETERS,
    PLATFORMS,
    binary_sections,
    check_input,
    decompress,
    encode_response,
    input_specs,
    integral,
    output_names,
    split_body,
    tensor_values,
    validation_message,
)
from genserve.service.errors import InvalidInput, NotCalibrated, NotFound
from genserve.service.services import Services
from genserve.service.services.anomaly import AnomalyInputs, gmm_extras

router = APIRouter(tags=["v2"], route_class=FastJSONRoute)
V2_ERRORS = responses(V2ErrorResponse, 400, 404, 413, 415, 500, 503, *AUTH)  # infer
V2_GET_ERRORS = responses(V2ErrorResponse, 404, *AUTH)  # model metadata and readiness


# ---- health and metadata ------------------------------------------------------------------------------------


@router.get("/v2", name="v2_server_metadata", response_model=V2ServerMetadata,
            responses=responses(V2ErrorResponse, *AUTH))
async def server_metadata() -> dict[str, Any]:
    """Server metadata: name, version and the protocol extensions supported."""
    try:
        version = package_version("genserve")
    except PackageNotFoundError:
        version = "unknown"
    return {"name": "genserve", "version": version, "extensions": EXTENSIONS}


@router.get("/v2/health/live", name="v2_live", response_class=Response,
            responses=responses(V2ErrorResponse, ok=HEALTH_OK))
async def live() -> Response:
    """200: the server answers."""
    return Response(status_code=200)


@router.get("/v2/health/ready", name="v2_ready", response_class=Response,
            responses={**responses(V2ErrorResponse, ok=HEALTH_OK), 503: HEALTH_FALSE})
async def ready(services: ServicesDep) -> Response:
    """200 when every model has a replica that has loaded it, else 503 (the same check as /readyz)."""
    catalog = services.catalog
    return Response(status_code=200 if catalog.started and all((await catalog.readiness()).values()) else 503)


@router.get("/v2/models/{name}", name="v2_model_metadata", response_model=V2ModelMetadata,
            responses=V2_GET_ERRORS)
async def model_metadata(name: str, services: ServicesDep) -> Response:
    """Model metadata: versions, platform, and the input and output tensors."""
    return await _metadata(services, name, None)


@router.get("/v2/models/{name}/versions/{version}", name="v2_model_metadata", response_model=V2ModelMetadata,
            responses=V2_GET_ERRORS)
async def model_version_metadata(name: str, version: str, services: ServicesDep) -> Response:
    return await _metadata(services, name, version)


async def _metadata(services: Services, name: str, version: str | None) -> Response:
    manifest = services.catalog.manifest(name, version)
    platform = PLATFORMS.get((await services.catalog.replica_info(name))["runtime"], "genserve")
    return JSONResponse({
        "name": name, "versions": services.catalog.versions(name), "platform": platform,
        "inputs": [spec.metadata() for spec in input_specs(manifest)],
        "outputs": [{"name": n, "datatype": OUTPUTS[n], "shape": [-1]} for n in output_names(manifest)],
    })


@router.get("/v2/models/{name}/ready", name="v2_model_ready", response_class=Response,
            responses={**V2_GET_ERRORS, 200: {**V2_GET_ERRORS[200], **HEALTH_OK}, 503: HEALTH_FALSE})
async def model_ready(name: str, services: ServicesDep) -> Response:
    """200 when the model has a replica that has loaded it, else 503."""
    return await _model_ready(services, name, None)


@router.get("/v2/models/{name}/versions/{version}/ready", name="v2_model_ready", response_class=Response,
            responses={**V2_GET_ERRORS, 200: {**V2_GET_ERRORS[200], **HEALTH_OK}, 503: HEALTH_FALSE})
async def model_version_ready(name: str, version: str, services: ServicesDep) -> Response:
    return await _model_ready(services, name, version)


async def _model_ready(services: Services, name: str, version: str | None) -> Response:
    services.catalog.manifest(name, version)
    return Response(status_code=200 if await services.catalog.version_ready(name) else 503)


# ---- inference ----------------------------------------------------------------------------------------------


@router.post("/v2/models/{name}/infer", name="v2_infer", response_model=V2InferResponse,
             responses={**V2_ERRORS, 200: {**V2_ERRORS[200], **INFER_OK}}, openapi_extra=INFER_BODY)
async def infer(name: str, request: Request, services: ServicesDep) -> Response:
    """Score a batch: JSON, or JSON then binary tensors (Inference-Header-Content-Length). See the module docs of
    service/api/v2/router.py for the tensors and parameters."""
    return await _infer(services, name, None, request)


@router.post("/v2/models/{name}/versions/{version}/infer", name="v2_infer", response_model=V2InferResponse,
             responses={**V2_ERRORS, 200: {**V2_ERRORS[200], **INFER_OK}}, openapi_extra=INFER_BODY)
async def infer_version(name: str, version: str, request: Request, services: ServicesDep) -> Response:
    return await _infer(services, name, version, request)


async def _infer(services: Services, name: str, version: str | None, request: Request) -> Response:
    manifest = services.catalog.manifest(name, version)
    body = decompress(await request.body(), request.headers.get("content-encoding", "").lower(),
                      services.catalog.limits.max_body_bytes)
    req, binary = split_body(body, request.headers.get(HEADER_LENGTH))
    params = request_parameters(req.parameters)
    inputs = read_inputs(name, manifest, req.inputs, binary)
    wanted = wanted_outputs(name, manifest, req.outputs, params)
    names = {n for n, _ in wanted}
    columns, extra = await _run(services, name, manifest, inputs, params, names, req.outputs is not None, request)
    if req.outputs is None:  # everything the model gave (anomaly outputs only when it is calibrated)
        wanted = [(n, b) for n, b in wanted if n in columns]
    reply: dict[str, Any] = {"model_name": name, "model_version": manifest.version}
    if req.id is not None:
        reply["id"] = req.id
    if extra:
        reply["parameters"] = extra
    return encode_response(reply, columns, wanted)


def request_parameters(params: dict[str, Any]) -> dict[str, Any]:
    checks = {"score": lambda v: isinstance(v, str), "binary_data_output": lambda v: isinstance(v, bool),
              "per_line": lambda v: isinstance(v, bool), "batch_test": lambda v: isinstance(v, bool),
              "threshold": lambda v: type(v) in (int, float),
              "false_positive_rate": lambda v: type(v) in (int, float)}
    for key, value in params.items():
        if key in IGNORED_PARAMETERS:
            continue
        if key not in checks:
            known = ", ".join(f"{k} ({v})" for k, v in PARAMETERS.items())
            raise InvalidInput(f"unknown request parameter {key!r}; parameters: {known}")
        if not checks[key](value):
            raise InvalidInput(f"parameter {key!r} must be {PARAMETERS[key]}, got {json.dumps(value)}")
    return {k: v for k, v in params.items() if k in checks}


def read_inputs(name: str, manifest: art.Manifest, inputs: list[V2Input], binary: memoryview) -> AnomalyInputs:
    """The records, images and labels, or texts, from the input tensors."""
    specs = {spec.name: spec for spec in input_specs(manifest)}
    taken = ", ".join(f"{s.name} ({s.datatype} {list(s.shape)}{'' if s.required else ', optional'})"
                      for s in specs.values())
    seen = [t.name for t in inputs]
    for t in inputs:
        if t.name not in specs:
            raise InvalidInput(f"unknown input {t.name!r}; model {name!r} takes {taken}")
        if seen.count(t.name) > 1:
            raise InvalidInput(f"input {t.name!r} is given {seen.count(t.name)} times; give each input once")
        unknown = set(t.parameters) - {"binary_data_size"}
        if unknown:
            raise InvalidInput(f"input {t.name!r}: parameters {sorted(unknown)} are not supported (shared memory is "
                               "not); inputs take only binary_data_size")
    missing = [s.name for s in specs.values() if s.required and s.name not in seen]
    if missing:
        raise InvalidInput(f"input {missing[0]!r} is missing; model {name!r} takes {taken}")
    sections = binary_sections(inputs, binary)
    fields: dict[str, Any] = {}
    for t in inputs:
        check_input(t, specs[t.name], name)
        values = tensor_values(t, sections.get(t.name))
        if t.name in ("images", "labels"):
            values = integral(t.name, values)
        # Records and images go on as arrays (the services check them whole, and item by item only to name
        # what is wrong); labels as a list.
        fields[t.name] = values if isinstance(values, list) or t.name != "labels" else values.tolist()
    return AnomalyInputs(**fields)


def wanted_outputs(name: str, manifest: art.Manifest, outputs: list[V2RequestedOutput] | None,
                   params: dict[str, Any]) -> list[tuple[str, bool]]:
    """The outputs to send, each with whether it goes as binary data."""
    available = output_names(manifest)
    binary_default = params.get("binary_data_output", False)
    if outputs is None:
        return [(n, binary_default) for n in available]
    wanted = []
    for out in outputs:
        if out.name not in available:
            raise InvalidInput(f"unknown output {out.name!r}; model {name!r} gives {', '.join(available)}")
        if out.name in LINE_OUTPUTS and not params.get("per_line"):
            raise InvalidInput(f"output {out.name!r} is given with the request parameter per_line: true")
        if any(n == out.name for n, _ in wanted):
            raise InvalidInput(f"output {out.name!r} is requested twice")
        unknown = set(out.parameters) - {"binary_data"}
        if unknown:
            raise InvalidInput(f"output {out.name!r}: parameters {sorted(unknown)} are not supported (classification "
                               "and shared memory are not); outputs take only binary_data")
        binary = out.parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise InvalidInput(f"output {out.name!r}: binary_data must be true or false, got {binary!r}")
        wanted.append((out.name, binary))
    return wanted


async def _run(services: Services, name: str, manifest: art.Manifest, inputs: AnomalyInputs, params: dict[str, Any],
               names: set[str], explicit: bool, request: Request) -> tuple[dict[str, list], dict[str, Any]]:
    """The output columns and the response parameters. Anomaly outputs (and per-line scores) come from the anomaly
    service; without them (not asked for, or, when the request named no outputs, a model with no calibration),
    log_prob comes from the model's own service."""
    per_line, batch_test = bool(params.get("per_line")), bool(params.get("batch_test"))
    if names & ANOMALY_OUTPUTS or per_line or batch_test:
        try:
            return await _anomaly(services, name, inputs, params, request)
        except NotCalibrated:
            if explicit or per_line or batch_test:
                raise
    input_type = manifest.input.type
    if input_type == "text":
        scores = await services.text.score(name, inputs.texts)
        record_metrics(request, ("genserve_texts_scored_total", {"model": name}, len(scores)))
        return {"log_prob": [s.log_prob for s in scores]}, {}
    if input_type == "image":
        scored = await services.images.log_prob(name, inputs.images, inputs.labels)
        n, columns = len(scored.images), {"log_prob": scored.log_prob}
    else:
        records = await services.records.log_prob(name, inputs.records)
        n, columns = len(records.records), {"log_prob": records.log_prob}
        if names & set(GMM_OUTPUTS):
            columns |= gmm_extras(records.responsibilities)
    record_metrics(request, ("genserve_records_scored_total", {"model": name, "endpoint": "log_prob"}, n))
    return columns, {}


async def _anomaly(services: Services, name: str, inputs: AnomalyInputs, params: dict[str, Any],
                   request: Request) -> tuple[dict[str, list], dict[str, Any]]:
    result, n = await services.anomaly.score(name, inputs, params.get("score"), params.get("threshold"),
                                             params.get("false_positive_rate"), bool(params.get("per_line")),
                                             bool(params.get("batch_test")))
    rows = result.results
    record_metrics(request, ("genserve_records_scored_total", {"model": name, "endpoint": "anomaly"}, n),
                   ("genserve_anomalies_flagged_total", {"model": name}, sum(r.is_anomaly for r in rows)))
    columns: dict[str, list] = {
        "log_prob": [r.log_prob for r in rows], "anomaly_score": [r.score for r in rows],
        "percentile": [r.percentile for r in rows], "is_anomaly": [r.is_anomaly for r in rows],
    }
    for extra_output in (*GMM_OUTPUTS, *LINE_OUTPUTS):  # present only for GMMs / per-line text results
        if rows and getattr(rows[0], extra_output) is not None:
            columns[extra_output] = [getattr(r, extra_output) for r in rows]
    extra = {"score_type": result.score_type, "threshold": result.threshold}
    if result.false_positive_rate is not None:
        extra["false_positive_rate"] = result.false_positive_rate
    if result.batch is not None:
        extra |= {f"batch_{k}": v for k, v in result.batch.model_dump().items()}
    return columns, extra


# ---- model repository (Triton's extension; admin role when API keys are on) ---------------------------------


REPOSITORY_ERRORS = (400, 413, 415, *AUTH)
ADMIN_403 = "API keys are on and the key's role is not admin"


@router.post("/v2/repository/index", name="v2_repository_index", response_model=list[RepositoryModel],
             responses=responses(V2ErrorResponse, *REPOSITORY_ERRORS, 503, s403=ADMIN_403),
             openapi_extra={"requestBody": {"required": False, "content": {
                 "application/json": {"schema": inline_schema(RepositoryIndexRequest)}}}})
async def repository_index(request: Request, services: ServicesDep) -> Response:
    """Every model and version in the store or served, with its state (READY, LOADING, UNLOADING, UNAVAILABLE,
    UNLOADED) and the reason it is not READY. The body is optional: {"ready": true} lists only READY ones."""
    body = await _repository_body(request, RepositoryIndexRequest, "repository index")
    index = [RepositoryModel.model_validate(row) for row in await services.management.index()]
    return JSONResponse([m.model_dump() for m in index if m.state == "READY" or not body.ready])


@router.post("/v2/repository/models/{name}/load", name="v2_repository_load",
             responses=responses(V2ErrorResponse, *REPOSITORY_ERRORS, 404, 409, 503, s403=ADMIN_403,
                                 s400="invalid request, the model control mode does not allow loading, or the "
                                      "version failed to load (the message says why: hash mismatch, corrupt "
                                      "artifact, replicas that would not start)"),
             openapi_extra={"requestBody": {"required": False, "content": {
                 "application/json": {"schema": inline_schema(RepositoryLoadRequest)}}}})
async def repository_load(name: str, request: Request, services: ServicesDep) -> Response:
    """Load the model from the store: the versions its version policy selects, or `parameters.version`. Answers
    once they are READY (200) or failed (400, the version stays UNAVAILABLE in the index with the reason; a
    version already serving keeps serving). Explicit model control mode only."""
    body = await _repository_body(request, RepositoryLoadRequest, "repository load")
    version = body.parameters.version
    loaded = await services.management.load(name, None if version is None else str(version))
    return JSONResponse({"name": name, "versions": loaded})


@router.post("/v2/repository/models/{name}/unload", name="v2_repository_unload",
             responses=responses(V2ErrorResponse, *REPOSITORY_ERRORS, 404, 409, 503, s403=ADMIN_403,
                                 s400="invalid request, or the model control mode does not allow unloading"),
             openapi_extra={"requestBody": {"required": False, "content": {
                 "application/json": {"schema": inline_schema(RepositoryUnloadRequest)}}}})
async def repository_unload(name: str, request: Request, services: ServicesDep) -> Response:
    """Unload every loaded version of the model (or `parameters.version`): it stops taking new requests at once,
    the requests it already accepted finish (streams included), then its replicas stop. Answers once it is
    UNLOADED. Explicit model control mode only."""
    body = await _repository_body(request, RepositoryUnloadRequest, "repository unload")
    version = body.parameters.version
    await services.management.unload(name, None if version is None else str(version))
    return JSONResponse({"name": name})


async def _repository_body(request: Request, schema: type[BaseModel], what: str) -> Any:
    """A repository request's optional JSON body (tritonclient sends none, or {} without a content type)."""
    raw = await request.body()
    try:
        return schema.model_validate_json(raw.strip() or b"{}")
    except ValidationError as e:
        extra = "; genserve loads models from its store only (no config or file overrides)" \
            if schema is RepositoryLoadRequest else ""
        raise InvalidInput(f"not a {what} request: {validation_message(e)}{extra}") from None


@router.api_route("/v2/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], name="v2_unknown",
                  include_in_schema=False)
async def unknown(path: str, request: Request) -> Response:
    """Any other /v2 path (statistics, shared memory, ...) in the protocol's error form."""
    raise NotFound(f"no route {request.method} /v2/{path}: genserve implements the v2 health, server and model "
                   "metadata, model ready, infer and model repository (index, load, unload) APIs", type_="not_found")
