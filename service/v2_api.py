"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) for genserve's density models, so KServe
and Triton clients (`tritonclient.http`, KServe's InferenceRESTClient, plain HTTP) can score records, images
and texts. `V2Routes` is mixed into the Gateway (service/app.py), like ImageRoutes and TextRoutes.

Routes: GET /v2 (server metadata), /v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/{v}]
(model metadata), .../ready, and POST .../infer. A model has one version: the one being served.

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

An infer request is turned into the project's own AnomalyRequest (or LogProbRequest / ScoreRequest when no
anomaly output is wanted, or the model has no calibration) and answered by the Gateway's /v1 route methods,
so every check, limit and number is the same as on /v1. Request parameters `score`, `false_positive_rate`,
`threshold` and `per_line` are the anomaly request's fields; the response's parameters say which score type
and threshold were used. A request naming no outputs gets all of them, or log_prob alone (plus a GMM's
component and responsibility) from a model with no calibration; naming an anomaly output of such a model is
a 400 not-calibrated error.

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

import asyncio
import json
import math
import struct
import zlib
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from genserve.artifacts import artifact as art
from genserve.artifacts.store import open_store
from genserve.service.anomaly import gmm_extras
from genserve.service.errors import AUTH, REQUEST_ID_HEADER, V2_ERRORS, V2_GET_ERRORS, ApiError, responses
from genserve.service.schemas import AnomalyRequest, LogProbRequest, V2ErrorResponse, inline_schema
from genserve.service.text_api import TextError
from genserve.service.text_schemas import ScoreRequest, v2_error

router = APIRouter()

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]
PLATFORMS = {"torch": "pytorch", "onnx": "onnxruntime"}

# The protocol's datatypes, with their little-endian numpy types; BYTES is length-prefixed strings, and BF16
# (Triton's) has no numpy type, so no input accepts it.
DATATYPES: dict[str, str | None] = {
    "BOOL": "|b1", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
    "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
    "BYTES": None, "BF16": None,
}
INT_TYPES = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
FLOAT_TYPES = ("FP16", "FP32", "FP64")

OUTPUTS = {"log_prob": "FP64", "anomaly_score": "FP64", "percentile": "FP64", "is_anomaly": "BOOL",
           "component": "INT64", "responsibility": "FP64", "text_index": "INT64", "line": "INT64"}
ANOMALY_OUTPUTS = frozenset({"anomaly_score", "percentile", "is_anomaly"})
GMM_OUTPUTS = ("component", "responsibility")
LINE_OUTPUTS = ("text_index", "line")  # text models with per_line: which text, and which 1-based line of it

# Request parameters genserve reads, and tritonclient's scheduling hints, which it accepts and ignores
# (genserve batches by itself).
PARAMETERS = {"score": "a string (score type)", "false_positive_rate": "a number in (0, 1)",
              "threshold": "a number", "per_line": "a boolean (text models)", "binary_data_output": "a boolean"}
IGNORED_PARAMETERS = frozenset({"priority", "timeout"})


class V2Error(Exception):
    """Answered as {"error": message} with `status`; `type` keeps genserve's error type (e.g. not_calibrated)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request"):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_


def v2_error_response(e: V2Error) -> JSONResponse:
    return JSONResponse(v2_error(e.message), status_code=e.status)


# ---- the request's JSON -------------------------------------------------------------------------------------


class V2Input(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    shape: list[Annotated[StrictInt, Field(ge=0)]]
    datatype: StrictStr
    parameters: dict[str, Any] = {}
    data: Any = None


class V2RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    parameters: dict[str, Any] = {}


class V2InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictStr | None = None
    parameters: dict[str, Any] = {}
    inputs: list[V2Input] = Field(min_length=1)
    outputs: list[V2RequestedOutput] | None = None


# ---- the responses' JSON, for the OpenAPI schema (the routes build the bodies themselves) ------------------


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(description="one of the protocol's datatypes: BOOL, INT64, FP32, FP64, BYTES, ...")
    shape: list[int] = Field(description="-1: any size (the batch)")


class RepositoryIndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ready: bool = Field(False, description="only the models that are ready")


class RepositoryModel(BaseModel):
    name: str
    version: str
    state: Literal["READY", "UNAVAILABLE"]
    reason: str = Field(description="why a version is not READY; empty when it is")


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str = Field(description="pytorch, onnxruntime, or genserve when the replica did not answer")
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = Field(None, description="the elements, flat, row-major (absent when binary)")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size when the data follow the JSON")


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(None, description="the request's id, when it gave one")
    parameters: dict[str, Any] | None = Field(None, description="score_type, threshold and false_positive_rate "
                                               "used, when anomaly outputs were computed")
    outputs: list[V2OutputTensor]


INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": inline_schema(V2InferRequest)},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description": "the JSON "
                                            "request, then binary tensor data; Inference-Header-Content-Length "
                                            "gives the JSON's length"}},
}}}
INFER_OK = {"description": "JSON, or (binary outputs) the JSON response then binary tensor data, with "
            "Inference-Header-Content-Length",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
HEALTH_OK = {"description": "true (the body is empty)"}
HEALTH_FALSE = {"description": "false: some model (or this model) has no replica that has loaded it (the body is "
                "empty)", "headers": REQUEST_ID_HEADER}


@dataclass(frozen=True)
class InputSpec:
    """One input tensor a model takes: its advertised datatype and shape, and the datatypes accepted."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    accepted: tuple[str, ...]
    meaning: str
    required: bool = True

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def input_specs(manifest: art.Manifest) -> list[InputSpec]:
    spec = manifest.input
    if spec.type == "records":
        return [InputSpec("records", "FP32", (-1, spec.n_features), FLOAT_TYPES + INT_TYPES,
                          f"records x {spec.n_features} features")]
    if spec.type == "image":
        images = InputSpec("images", "INT64", (-1, spec.height, spec.width), INT_TYPES + FLOAT_TYPES,
                           f"images x {spec.height} rows x {spec.width} columns of grey levels 0..{spec.levels - 1}")
        if not spec.n_classes:
            return [images]
        return [images, InputSpec("labels", "INT64", (-1,), INT_TYPES, f"one label in 0..{spec.n_classes - 1} "
                                  "per image", required=False)]
    return [InputSpec("texts", "BYTES", (-1,), ("BYTES",), "texts, UTF-8 strings")]


def output_names(manifest: art.Manifest) -> list[str]:
    names = ["log_prob", "anomaly_score", "percentile", "is_anomaly"]
    if manifest.kind == "gmm":  # a mixture: also each component's responsibility
        return names + list(GMM_OUTPUTS)
    return names + list(LINE_OUTPUTS) if manifest.input.type == "text" else names


# ---- reading the body ---------------------------------------------------------------------------------------


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent before Content-Encoding (tritonclient's request_compression_algorithm), at most
    `limit` bytes once decompressed."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise V2Error(400, f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise V2Error(400, f"request body is not valid {encoding} data: {e}") from None
    if len(out) > limit:
        raise V2Error(413, f"request body exceeds the limit of {limit} bytes once decompressed")
    return out


def split_body(body: bytes, header_length: str | None) -> tuple[V2InferRequest, memoryview]:
    """The JSON inference request and the binary tensor data after it."""
    if header_length is None:
        n = len(body)
    else:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 < n <= len(body):
            raise V2Error(400, f"{HEADER_LENGTH}: {header_length!r} is not a length in 1..{len(body)} (the body's "
                          "size): it must be the byte length of the JSON request at the start of the body")
    try:
        header = json.loads(body[:n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        hint = "" if header_length is not None else f" (binary tensor data need the {HEADER_LENGTH} header)"
        raise V2Error(400, f"request is not valid JSON: {e}{hint}") from None
    try:
        return V2InferRequest.model_validate(header), memoryview(body)[n:]
    except ValidationError as e:
        raise V2Error(400, f"not an inference request: {validation_message(e)}") from None


def validation_message(e: ValidationError) -> str:
    """pydantic's errors as 'where: what (got X)', at most three."""
    shown = []
    for err in e.errors()[:3]:
        where = ""
        for part in err.get("loc", ()):
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        got = err.get("input")
        value = f" (got {got!r})" if isinstance(got, (str, int, float, bool)) and len(repr(got)) < 60 else ""
        message = err.get("msg", "invalid").removeprefix("Value error, ")
        shown.append(f"{where + ': ' if where else ''}{message}{value}")
    more = f" (and {e.error_count() - 3} more)" if e.error_count() > 3 else ""
    return "; ".join(shown) + more


# ---- tensors ------------------------------------------------------------------------------------------------


def check_input(t: V2Input, spec: InputSpec, model: str) -> None:
    """The tensor's shape and datatype against what the model takes, before its data are read."""
    fixed = all(want in (-1, got) for want, got in zip(spec.shape, t.shape, strict=False))
    if len(t.shape) != len(spec.shape) or not fixed or t.shape[0] < 1:
        raise V2Error(400, f"input {t.name!r} has shape {t.shape}; model {model!r} takes shape {list(spec.shape)} "
                      f"({spec.meaning}; -1: any number >= 1)")
    if t.datatype not in DATATYPES:
        raise V2Error(400, f"input {t.name!r}: unknown datatype {t.datatype!r}; the protocol's datatypes are "
                      f"{', '.join(DATATYPES)}")
    if t.datatype not in spec.accepted:
        raise V2Error(400, f"input {t.name!r}: datatype {t.datatype} is not accepted; model {model!r} takes "
                      f"{spec.datatype} (also {', '.join(d for d in spec.accepted if d != spec.datatype) or 'none'})")


def tensor_values(t: V2Input, binary: memoryview | None) -> np.ndarray | list[str]:
    """The tensor's elements, row-major: float64, int64 or bool arrays of its shape; a flat list for BYTES."""
    count = math.prod(t.shape)
    if binary is not None:
        return binary_values(t, binary, count)
    if t.data is None:
        raise V2Error(400, f"input {t.name!r} has no data: give data (a JSON array, flat or nested) or, with the "
                      f"binary tensor data extension, parameters.binary_data_size")
    flat = flatten(t.data, t.shape, t.name)
    if len(flat) != count:
        raise V2Error(400, f"input {t.name!r}: shape {t.shape} has {count} elements, but data has {len(flat)}")
    return json_values(t, flat)


def flatten(data: Any, shape: list[int], name: str) -> list[Any]:
    """Row-major elements of JSON data given flat, or nested exactly as `shape`."""
    if not isinstance(data, list):
        raise V2Error(400, f"input {name!r}: data must be a JSON array (flat, or nested as the shape), not "
                      f"{type(data).__name__}")
    if not any(isinstance(x, list) for x in data):
        return data
    flat: list[Any] = []

    def walk(node: Any, depth: int, where: str) -> None:
        if not isinstance(node, list) or len(node) != shape[depth]:
            got = f"{len(node)} entries" if isinstance(node, list) else "a single value"
            raise V2Error(400, f"input {name!r}: nested data must match shape {shape}: data{where} has {got}, "
                          f"expected {shape[depth]}")
        if depth == len(shape) - 1:
            flat.extend(node)  # elements that are still lists are refused by json_values
        else:
            for i, child in enumerate(node):
                walk(child, depth + 1, f"{where}[{i}]")

    walk(data, 0, "")
    return flat


def json_values(t: V2Input, flat: list[Any]) -> np.ndarray | list[str]:
    kinds = {"BOOL": ((bool,), "true or false"), "BYTES": ((str,), "a string")}
    allowed, what = kinds.get(t.datatype, ((int, float), "a number") if t.datatype in FLOAT_TYPES
                              else ((int,), "an integer"))
    for i, value in enumerate(flat):
        if type(value) not in allowed:  # type(), not isinstance: JSON true is not the integer 1
            shown = json.dumps(value)
            shown = shown if len(shown) <= 40 else shown[:40] + "..."
            raise V2Error(400, f"input {t.name!r}: element {i} is {shown}; {t.datatype} data are each {what}")
    if t.datatype == "BYTES":
        return flat
    if t.datatype in INT_TYPES:
        info = np.iinfo(np.dtype(DATATYPES[t.datatype]))
        low, high = min(flat), max(flat)
        if low < info.min or high > info.max:
            raise V2Error(400, f"input {t.name!r}: {low if low < info.min else high} is out of range for "
                          f"{t.datatype} ({info.min}..{info.max})")
        dtype = np.uint64 if t.datatype == "UINT64" else np.int64
    else:
        dtype = np.bool_ if t.datatype == "BOOL" else np.float64
    return np.asarray(flat, dtype=dtype).reshape(t.shape)


def binary_values(t: V2Input, raw: memoryview, count: int) -> np.ndarray | list[str]:
    if t.datatype == "BYTES":
        return binary_strings(t.name, raw, count)
    dtype = np.dtype(DATATYPES[t.datatype])
    if len(raw) != count * dtype.itemsize:
        raise V2Error(400, f"input {t.name!r}: binary_data_size is {len(raw)} bytes, but shape {t.shape} of "
                      f"{t.datatype} takes {count} x {dtype.itemsize} = {count * dtype.itemsize} bytes")
    values = np.frombuffer(raw, dtype=dtype).reshape(t.shape)
    if t.datatype in FLOAT_TYPES:
        return values.astype(np.float64)
    return values.astype(np.bool_ if t.datatype == "BOOL" else np.int64)


def binary_strings(name: str, raw: memoryview, count: int) -> list[str]:
    """BYTES elements: each a little-endian uint32 length, then that many bytes (UTF-8 text here)."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise V2Error(400, f"input {name!r}: binary BYTES data end inside the length of element {len(out)}")
        (size,) = struct.unpack_from("<I", raw, offset)
        chunk = bytes(raw[offset + 4:offset + 4 + size])
        if len(chunk) != size:
            raise V2Error(400, f"input {name!r}: binary BYTES element {len(out)} is {size} bytes long, but only "
                          f"{len(chunk)} follow")
        try:
            out.append(chunk.decode("utf-8"))
        except UnicodeDecodeError:
            raise V2Error(400, f"input {name!r}: element {len(out)} is not UTF-8 text") from None
        offset += 4 + size
    if len(out) != count:
        raise V2Error(400, f"input {name!r}: shape has {count} elements, but the binary data hold {len(out)}")
    return out


def binary_sections(inputs: list[V2Input], binary: memoryview) -> dict[str, memoryview]:
    """Each binary input's bytes, cut from the data after the JSON in input order."""
    out, offset = {}, 0
    for t in inputs:
        size = t.parameters.get("binary_data_size")
        if size is None:
            continue
        if type(size) is not int or size < 0:
            raise V2Error(400, f"input {t.name!r}: parameters.binary_data_size must be a byte count, got {size!r}")
        if t.data is not None:
            raise V2Error(400, f"input {t.name!r} has both data and binary_data_size; give one")
        if offset + size > len(binary):
            raise V2Error(400, f"input {t.name!r}: binary_data_size {size} runs past the end of the body "
                          f"({len(binary)} bytes of binary data after the JSON, {offset} used by earlier inputs)")
        out[t.name] = binary[offset:offset + size]
        offset += size
    if offset != len(binary):
        raise V2Error(400, f"{len(binary) - offset} bytes after the JSON request are not claimed by any input's "
                      f"binary_data_size ({HEADER_LENGTH} may be wrong)")
    return out


def integral(name: str, values: np.ndarray) -> np.ndarray:
    """Whole-number values as int64 (images given as floats)."""
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            where = "".join(f"[{i}]" for i in np.argwhere(bad)[0])
            raise V2Error(400, f"input {name!r}: values must be whole numbers (grey levels); {name}{where} is "
                          f"{values[tuple(np.argwhere(bad)[0])]}")
    return values.astype(np.int64)


# ---- the response -------------------------------------------------------------------------------------------


def encode_response(body: dict[str, Any], columns: dict[str, list[Any]], wanted: list[tuple[str, bool]]) -> Response:
    """The inference response: JSON, or JSON then raw tensors when some output is binary."""
    outputs, chunks = [], []
    for name, binary in wanted:
        values, datatype = columns[name], OUTPUTS[name]
        output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": [len(values)]}
        if binary:
            raw = np.asarray(values, dtype=DATATYPES[datatype]).tobytes()
            output["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            output["data"] = values
        outputs.append(output)
    header = json.dumps({**body, "outputs": outputs}).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


def response_error(response: Response) -> V2Error:
    """A /v1 route's error answered as a response object (the text routes do that) as a V2Error."""
    try:
        error = json.loads(response.body)["error"]
        return V2Error(response.status_code, error["message"], error.get("type", "invalid_request"))
    except (ValueError, KeyError, TypeError):
        return V2Error(response.status_code, f"request failed with status {response.status_code}")


# ---- the routes ---------------------------------------------------------------------------------------------


class V2Routes:
    """Mixed into the Gateway, which provides manifests, limits, _manifest(), _runtime(), readyz() and the /v1
    route methods anomaly(), log_prob() and score()."""

    manifests: dict[str, art.Manifest]
    limits: Any  # the Gateway's LimitsConfig (max_body_bytes)

    def _v2_manifest(self, name: str, version: str | None) -> art.Manifest:
        manifest = self._manifest(name)
        if version is not None and version != manifest.version:
            raise ApiError(404, "model_not_found", f"model {name!r} has no version {version!r} here; the served "
                           f"version is {manifest.version}")
        return manifest

    async def _v2_guard(self, call) -> Response:
        """Runs `call` and answers any error in the protocol's form."""
        try:
            return await call()
        except V2Error as e:
            return v2_error_response(e)
        except (ApiError, TextError) as e:
            return v2_error_response(V2Error(e.status, e.message, e.type))

    # ---- health and metadata -------------------------------------------------------------------------------

    @router.get("/v2", name="v2_server_metadata", tags=["v2"], response_model=V2ServerMetadata,
                responses=responses(V2ErrorResponse, *AUTH))
    async def v2_server_metadata(self) -> dict[str, Any]:
        """Server metadata: name, version and the protocol extensions supported."""
        try:
            version = package_version("genserve")
        except PackageNotFoundError:
            version = "unknown"
        return {"name": "genserve", "version": version, "extensions": EXTENSIONS}

    @router.get("/v2/health/live", name="v2_live", tags=["v2"], response_class=Response,
                responses=responses(V2ErrorResponse, ok=HEALTH_OK))
    async def v2_live(self) -> Response:
        """200: the server answers."""
        return Response(status_code=200)

    @router.get("/v2/health/ready", name="v2_ready", tags=["v2"], response_class=Response,
                responses={**responses(V2ErrorResponse, ok=HEALTH_OK), 503: HEALTH_FALSE})
    async def v2_ready(self) -> Response:
        """200 when every model has a replica that has loaded it, else 503 (the same check as /readyz)."""
        return Response(status_code=(await self.readyz()).status_code)

    @router.get("/v2/models/{name}", name="v2_model_metadata", tags=["v2"], response_model=V2ModelMetadata,
                responses=V2_GET_ERRORS)
    async def v2_model_metadata(self, name: str) -> Response:
        """Model metadata: versions, platform, and the input and output tensors."""
        return await self._v2_guard(lambda: self._v2_metadata(name, None))

    @router.get("/v2/models/{name}/versions/{version}", name="v2_model_metadata", tags=["v2"],
                response_model=V2ModelMetadata, responses=V2_GET_ERRORS)
    async def v2_model_version_metadata(self, name: str, version: str) -> Response:
        return await self._v2_guard(lambda: self._v2_metadata(name, version))

    async def _v2_metadata(self, name: str, version: str | None) -> Response:
        manifest = self._v2_manifest(name, version)
        platform = PLATFORMS.get(await self._runtime(name), "genserve")
        return JSONResponse({
            "name": name, "versions": [manifest.version], "platform": platform,
            "inputs": [spec.metadata() for spec in input_specs(manifest)],
            "outputs": [{"name": n, "datatype": OUTPUTS[n], "shape": [-1]} for n in output_names(manifest)],
        })

    @router.get("/v2/models/{name}/ready", name="v2_model_ready", tags=["v2"], response_class=Response,
                responses={**V2_GET_ERRORS, 200: {**V2_GET_ERRORS[200], **HEALTH_OK}, 503: HEALTH_FALSE})
    async def v2_model_ready(self, name: str) -> Response:
        """200 when the model has a replica that has loaded it, else 503."""
        return await self._v2_guard(lambda: self._v2_model_ready(name, None))

    @router.get("/v2/models/{name}/versions/{version}/ready", name="v2_model_ready", tags=["v2"],
                response_class=Response,
                responses={**V2_GET_ERRORS, 200: {**V2_GET_ERRORS[200], **HEALTH_OK}, 503: HEALTH_FALSE})
    async def v2_model_version_ready(self, name: str, version: str) -> Response:
        return await self._v2_guard(lambda: self._v2_model_ready(name, version))

    async def _v2_model_ready(self, name: str, version: str | None) -> Response:
        self._v2_manifest(name, version)
        states = json.loads((await self.readyz()).body)["models"]
        return Response(status_code=200 if states.get(name) else 503)

    # ---- inference -----------------------------------------------------------------------------------------

    @router.post("/v2/models/{name}/infer", name="v2_infer", tags=["v2"], response_model=V2InferResponse,
                 responses={**V2_ERRORS, 200: {**V2_ERRORS[200], **INFER_OK}}, openapi_extra=INFER_BODY)
    async def v2_infer(self, name: str, request: Request) -> Response:
        """Score a batch: JSON, or JSON then binary tensors (Inference-Header-Content-Length). See the module
        docs of service/v2_api.py for the tensors and parameters."""
        return await self._v2_guard(lambda: self._v2_infer(name, None, request))

    @router.post("/v2/models/{name}/versions/{version}/infer", name="v2_infer", tags=["v2"],
                 response_model=V2InferResponse, responses={**V2_ERRORS, 200: {**V2_ERRORS[200], **INFER_OK}},
                 openapi_extra=INFER_BODY)
    async def v2_infer_version(self, name: str, version: str, request: Request) -> Response:
        return await self._v2_guard(lambda: self._v2_infer(name, version, request))

    async def _v2_infer(self, name: str, version: str | None, request: Request) -> Response:
        manifest = self._v2_manifest(name, version)
        body = decompress(await request.body(), request.headers.get("content-encoding", "").lower(),
                          self.limits.max_body_bytes)
        req, binary = split_body(body, request.headers.get(HEADER_LENGTH))
        params = self._v2_parameters(req.parameters)
        fields = self._v2_inputs(name, manifest, req.inputs, binary)
        wanted = self._v2_wanted(name, manifest, req.outputs, params)
        names = {n for n, _ in wanted}
        columns, extra = await self._v2_run(name, manifest, fields, params, names, req.outputs is not None, request)
        if req.outputs is None:  # everything the model gave (anomaly outputs only when it is calibrated)
            wanted = [(n, b) for n, b in wanted if n in columns]
        reply: dict[str, Any] = {"model_name": name, "model_version": manifest.version}
        if req.id is not None:
            reply["id"] = req.id
        if extra:
            reply["parameters"] = extra
        return encode_response(reply, columns, wanted)

    def _v2_parameters(self, params: dict[str, Any]) -> dict[str, Any]:
        checks = {"score": lambda v: isinstance(v, str), "binary_data_output": lambda v: isinstance(v, bool),
                  "per_line": lambda v: isinstance(v, bool),
                  "threshold": lambda v: type(v) in (int, float),
                  "false_positive_rate": lambda v: type(v) in (int, float)}
        for key, value in params.items():
            if key in IGNORED_PARAMETERS:
                continue
            if key not in checks:
                known = ", ".join(f"{k} ({v})" for k, v in PARAMETERS.items())
                raise V2Error(400, f"unknown request parameter {key!r}; parameters: {known}")
            if not checks[key](value):
                raise V2Error(400, f"parameter {key!r} must be {PARAMETERS[key]}, got {json.dumps(value)}")
        return {k: v for k, v in params.items() if k in checks}

    def _v2_inputs(self, name: str, manifest: art.Manifest, inputs: list[V2Input],
                   binary: memoryview) -> dict[str, Any]:
        """The /v1 request fields (records, images and labels, or texts) from the input tensors."""
        specs = {spec.name: spec for spec in input_specs(manifest)}
        taken = ", ".join(f"{s.name} ({s.datatype} {list(s.shape)}{'' if s.required else ', optional'})"
                          for s in specs.values())
        seen = [t.name for t in inputs]
        for t in inputs:
            if t.name not in specs:
                raise V2Error(400, f"unknown input {t.name!r}; model {name!r} takes {taken}")
            if seen.count(t.name) > 1:
                raise V2Error(400, f"input {t.name!r} is given {seen.count(t.name)} times; give each input once")
            unknown = set(t.parameters) - {"binary_data_size"}
            if unknown:
                raise V2Error(400, f"input {t.name!r}: parameters {sorted(unknown)} are not supported (shared "
                              "memory is not); inputs take only binary_data_size")
        missing = [s.name for s in specs.values() if s.required and s.name not in seen]
        if missing:
            raise V2Error(400, f"input {missing[0]!r} is missing; model {name!r} takes {taken}")
        sections = binary_sections(inputs, binary)
        fields: dict[str, Any] = {}
        for t in inputs:
            check_input(t, specs[t.name], name)
            values = tensor_values(t, sections.get(t.name))
            if t.name in ("images", "labels"):
                values = integral(t.name, values)
            fields[t.name] = values if isinstance(values, list) else values.tolist()
        return fields

    def _v2_wanted(self, name: str, manifest: art.Manifest, outputs: list[V2RequestedOutput] | None,
                   params: dict[str, Any]) -> list[tuple[str, bool]]:
        """The outputs to send, each with whether it goes as binary data."""
        available = output_names(manifest)
        binary_default = params.get("binary_data_output", False)
        if outputs is None:
            return [(n, binary_default) for n in available]
        wanted = []
        for out in outputs:
            if out.name not in available:
                raise V2Error(400, f"unknown output {out.name!r}; model {name!r} gives {', '.join(available)}")
            if out.name in LINE_OUTPUTS and not params.get("per_line"):
                raise V2Error(400, f"output {out.name!r} is given with the request parameter per_line: true")
            if any(n == out.name for n, _ in wanted):
                raise V2Error(400, f"output {out.name!r} is requested twice")
            unknown = set(out.parameters) - {"binary_data"}
            if unknown:
                raise V2Error(400, f"output {out.name!r}: parameters {sorted(unknown)} are not supported "
                              "(classification and shared memory are not); outputs take only binary_data")
            binary = out.parameters.get("binary_data", binary_default)
            if not isinstance(binary, bool):
                raise V2Error(400, f"output {out.name!r}: binary_data must be true or false, got {binary!r}")
            wanted.append((out.name, binary))
        return wanted

    async def _v2_run(self, name: str, manifest: art.Manifest, fields: dict[str, Any], params: dict[str, Any],
                      names: set[str], explicit: bool, request: Request) -> tuple[dict[str, list], dict[str, Any]]:
        """The output columns and the response parameters. Anomaly outputs (and per-line scores) come from /v1's
        anomaly; without them (not asked for, or, when the request named no outputs, a model with no
        calibration), log_prob comes from /v1's log_prob, or score for texts."""
        per_line = bool(params.get("per_line"))
        if names & ANOMALY_OUTPUTS or per_line:
            try:
                return await self._v2_anomaly(name, fields, params, request)
            except V2Error as e:
                if explicit or per_line or e.type != "not_calibrated":
                    raise
        if manifest.input.type == "text":
            result = await self.score(name, self._v2_body(ScoreRequest, {**fields, "per_token": False}), request)
            if isinstance(result, Response):
                raise response_error(result)
            return {"log_prob": [r.log_prob for r in result.results]}, {}
        gmm = bool(names & set(GMM_OUTPUTS))
        result = await self._v2_call(self.log_prob, name, LogProbRequest, {**fields, "responsibilities": gmm},
                                     request)
        columns = {"log_prob": result.log_prob}
        return (columns | gmm_extras(result.responsibilities)) if gmm else columns, {}

    async def _v2_anomaly(self, name: str, fields: dict[str, Any], params: dict[str, Any],
                          request: Request) -> tuple[dict[str, list], dict[str, Any]]:
        anomaly = {k: params[k] for k in ("score", "threshold", "false_positive_rate", "per_line") if k in params}
        result = await self._v2_call(self.anomaly, name, AnomalyRequest, {**fields, **anomaly}, request)
        rows = result.results
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
        return columns, extra

    @staticmethod
    def _v2_body(model: type[BaseModel], fields: dict[str, Any]) -> Any:
        try:
            return model.model_validate(fields)
        except ValidationError as e:
            raise V2Error(400, validation_message(e)) from None

    async def _v2_call(self, route, name: str, model: type[BaseModel], fields: dict[str, Any],
                       request: Request) -> Any:
        """A /v1 route method called with its request object; errors it raises or answers become V2Errors."""
        try:
            result = await route(name, self._v2_body(model, fields), request)
        except (ApiError, TextError) as e:
            raise V2Error(e.status, e.message, e.type) from None
        if isinstance(result, Response):
            raise response_error(result)
        return result

    # ---- model repository (Triton's extension; admin role when API keys are on) -----------------------------------

    @router.post("/v2/repository/index", name="v2_repository_index", tags=["v2"],
                 response_model=list[RepositoryModel],
                 responses=responses(V2ErrorResponse, 400, 413, 415, *AUTH, s403="API keys are on and the key's "
                                     "role is not admin"),
                 openapi_extra={"requestBody": {"required": False, "content": {
                     "application/json": {"schema": inline_schema(RepositoryIndexRequest)}}}})
    async def v2_repository_index(self, request: Request) -> Response:
        """Every model and version in the store with its state: READY where this server serves it, UNAVAILABLE
        (with the reason) where it does not. The body is optional: {"ready": true} lists only READY ones."""
        try:
            raw = await request.body()
            try:
                body = RepositoryIndexRequest.model_validate_json(raw or b"{}")
            except ValidationError as e:
                raise V2Error(400, f"not a repository index request: {validation_message(e)}") from None
            stored = await asyncio.to_thread(open_store(self.store_uri).list_models)
        except V2Error as e:
            return v2_error_response(e)
        index = []
        for name in sorted(set(stored) | set(self.manifests)):
            served = self.manifests[name].version if name in self.manifests else None
            for version in stored.get(name) or [served]:
                ready = version == served
                if ready or not body.ready:
                    index.append(RepositoryModel(name=name, version=version, state="READY" if ready else
                                                 "UNAVAILABLE", reason="" if ready else "not loaded by this server"))
        return JSONResponse([m.model_dump() for m in index])

    @router.api_route("/v2/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], name="v2_unknown",
                      include_in_schema=False)
    async def v2_unknown(self, path: str, request: Request) -> Response:
        """Any other /v2 path (model repository, statistics, shared memory, ...) in the protocol's error form."""
        return v2_error_response(V2Error(404, f"no route {request.method} /v2/{path}: genserve implements the "
                                         "v2 health, server and model metadata, model ready and infer APIs"))
