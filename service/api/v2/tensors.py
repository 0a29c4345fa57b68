"""Tensors of the Open Inference Protocol: which inputs and outputs each family of models takes and gives, and
reading them from JSON or binary tensor data (Triton's binary_tensor_data extension) and writing them back.
Every problem is an InvalidInput naming the tensor, the element and what is allowed."""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi.responses import Response
from pydantic import ValidationError

from genserve.artifacts import artifact as art
from genserve.service.api import fast_json
from genserve.service.api.v2.schemas import V2InferRequest, V2Input
from genserve.service.errors import InvalidInput, TooLarge

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
              "threshold": "a number", "per_line": "a boolean (text models)", "batch_test": "a boolean",
              "binary_data_output": "a boolean"}
IGNORED_PARAMETERS = frozenset({"priority", "timeout"})


@dataclass(frozen=True)
class TensorSpec:
    """One input tensor a model takes: its advertised datatype and shape, and the datatypes accepted."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    accepted: tuple[str, ...]
    meaning: str
    required: bool = True

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def input_specs(manifest: art.Manifest) -> list[TensorSpec]:
    spec = manifest.input
    if spec.type == "records":
        return [TensorSpec("records", "FP32", (-1, spec.n_features), FLOAT_TYPES + INT_TYPES,
                          f"records x {spec.n_features} features")]
    if spec.type == "image":
        images = TensorSpec("images", "INT64", (-1, spec.height, spec.width), INT_TYPES + FLOAT_TYPES,
                           f"images x {spec.height} rows x {spec.width} columns of grey levels 0..{spec.levels - 1}")
        if not spec.n_classes:
            return [images]
        return [images, TensorSpec("labels", "INT64", (-1,), INT_TYPES, f"one label in 0..{spec.n_classes - 1} "
                                  "per image", required=False)]
    return [TensorSpec("texts", "BYTES", (-1,), ("BYTES",), "texts, UTF-8 strings")]


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
        raise InvalidInput(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidInput(f"request body is not valid {encoding} data: {e}") from None
    if len(out) > limit:
        raise TooLarge(f"request body exceeds the limit of {limit} bytes once decompressed")
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
            raise InvalidInput(f"{HEADER_LENGTH}: {header_length!r} is not a length in 1..{len(body)} (the body's "
                          "size): it must be the byte length of the JSON request at the start of the body")
    try:
        header = fast_json.loads(body[:n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        hint = "" if header_length is not None else f" (binary tensor data need the {HEADER_LENGTH} header)"
        raise InvalidInput(f"request is not valid JSON: {e}{hint}") from None
    try:
        return V2InferRequest.model_validate(header), memoryview(body)[n:]
    except ValidationError as e:
        raise InvalidInput(f"not an inference request: {validation_message(e)}") from None


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


def check_input(t: V2Input, spec: TensorSpec, model: str) -> None:
    """The tensor's shape and datatype against what the model takes, before its data are read."""
    fixed = all(want in (-1, got) for want, got in zip(spec.shape, t.shape, strict=False))
    if len(t.shape) != len(spec.shape) or not fixed or t.shape[0] < 1:
        raise InvalidInput(f"input {t.name!r} has shape {t.shape}; model {model!r} takes shape {list(spec.shape)} "
                      f"({spec.meaning}; -1: any number >= 1)")
    if t.datatype not in DATATYPES:
        raise InvalidInput(f"input {t.name!r}: unknown datatype {t.datatype!r}; the protocol's datatypes are "
                      f"{', '.join(DATATYPES)}")
    if t.datatype not in spec.accepted:
        raise InvalidInput(f"input {t.name!r}: datatype {t.datatype} is not accepted; model {model!r} takes "
                      f"{spec.datatype} (also {', '.join(d for d in spec.accepted if d != spec.datatype) or 'none'})")


def tensor_values(t: V2Input, binary: memoryview | None) -> np.ndarray | list[str]:
    """The tensor's elements, row-major: float64, int64 or bool arrays of its shape; a flat list for BYTES."""
    count = math.prod(t.shape)
    if binary is not None:
        return binary_values(t, binary, count)
    if t.data is None:
        raise InvalidInput(f"input {t.name!r} has no data: give data (a JSON array, flat or nested) or, with the "
                      f"binary tensor data extension, parameters.binary_data_size")
    flat = flatten(t.data, t.shape, t.name)
    if len(flat) != count:
        raise InvalidInput(f"input {t.name!r}: shape {t.shape} has {count} elements, but data has {len(flat)}")
    return json_values(t, flat)


def flatten(data: Any, shape: list[int], name: str) -> list[Any]:
    """Row-major elements of JSON data given flat, or nested exactly as `shape`."""
    if not isinstance(data, list):
        raise InvalidInput(f"input {name!r}: data must be a JSON array (flat, or nested as the shape), not "
                      f"{type(data).__name__}")
    if not any(isinstance(x, list) for x in data):
        return data
    flat: list[Any] = []

    def walk(node: Any, depth: int, where: str) -> None:
        if not isinstance(node, list) or len(node) != shape[depth]:
            got = f"{len(node)} entries" if isinstance(node, list) else "a single value"
            raise InvalidInput(f"input {name!r}: nested data must match shape {shape}: data{where} has {got}, "
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
            raise InvalidInput(f"input {t.name!r}: element {i} is {shown}; {t.datatype} data are each {what}")
    if t.datatype == "BYTES":
        return flat
    if t.datatype in INT_TYPES:
        info = np.iinfo(np.dtype(DATATYPES[t.datatype]))
        low, high = min(flat), max(flat)
        if low < info.min or high > info.max:
            raise InvalidInput(f"input {t.name!r}: {low if low < info.min else high} is out of range for "
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
        raise InvalidInput(f"input {t.name!r}: binary_data_size is {len(raw)} bytes, but shape {t.shape} of "
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
            raise InvalidInput(f"input {name!r}: binary BYTES data end inside the length of element {len(out)}")
        (size,) = struct.unpack_from("<I", raw, offset)
        chunk = bytes(raw[offset + 4:offset + 4 + size])
        if len(chunk) != size:
            raise InvalidInput(f"input {name!r}: binary BYTES element {len(out)} is {size} bytes long, but only "
                          f"{len(chunk)} follow")
        try:
            out.append(chunk.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInput(f"input {name!r}: element {len(out)} is not UTF-8 text") from None
        offset += 4 + size
    if len(out) != count:
        raise InvalidInput(f"input {name!r}: shape has {count} elements, but the binary data hold {len(out)}")
    return out


def binary_sections(inputs: list[V2Input], binary: memoryview) -> dict[str, memoryview]:
    """Each binary input's bytes, cut from the data after the JSON in input order."""
    out, offset = {}, 0
    for t in inputs:
        size = t.parameters.get("binary_data_size")
        if size is None:
            continue
        if type(size) is not int or size < 0:
            raise InvalidInput(f"input {t.name!r}: parameters.binary_data_size must be a byte count, got {size!r}")
        if t.data is not None:
            raise InvalidInput(f"input {t.name!r} has both data and binary_data_size; give one")
        if offset + size > len(binary):
            raise InvalidInput(f"input {t.name!r}: binary_data_size {size} runs past the end of the body "
                          f"({len(binary)} bytes of binary data after the JSON, {offset} used by earlier inputs)")
        out[t.name] = binary[offset:offset + size]
        offset += size
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes after the JSON request are not claimed by any input's "
                      f"binary_data_size ({HEADER_LENGTH} may be wrong)")
    return out


def integral(name: str, values: np.ndarray) -> np.ndarray:
    """Whole-number values as int64 (images given as floats)."""
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            where = "".join(f"[{i}]" for i in np.argwhere(bad)[0])
            raise InvalidInput(f"input {name!r}: values must be whole numbers (grey levels); {name}{where} is "
                          f"{values[tuple(np.argwhere(bad)[0])]}")
    return values.astype(np.int64)


# ---- the response -------------------------------------------------------------------------------------------


def encode_response(body: dict[str, Any], columns: dict[str, list[Any] | np.ndarray],
                    wanted: list[tuple[str, bool]]) -> Response:
    """The inference response: JSON, or JSON then raw tensors when some output is binary. A column is a list or
    an array (turned into a list only for JSON)."""
    outputs, chunks = [], []
    for name, binary in wanted:
        values, datatype = columns[name], OUTPUTS[name]
        output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": [len(values)]}
        if binary:
            raw = np.asarray(values, dtype=DATATYPES[datatype]).tobytes()
            output["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            output["data"] = values.tolist() if isinstance(values, np.ndarray) else values
        outputs.append(output)
    header = json.dumps({**body, "outputs": outputs}).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})
