"""The Open Inference Protocol (KServe v2 / Triton HTTP) routes over real HTTP on loopback, against the session's
Ray Serve instance (see conftest): with Triton's own Python client (binary tensors by default), and with raw
HTTP for the protocol's details. Every /v2 answer is checked against the /v1 route it is built on."""

from __future__ import annotations

import gzip
import json
import re
import struct
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from sklearn.datasets import load_breast_cancer, load_wine
from tritonclient.utils import InferenceServerException

from tests.service.conftest import (
    DIGITS_TRAIN,
    IMAGE_BIN,
    IMAGE_COND,
    REPLICATED,
    SINGLE,
    TEXT,
    TEXT_ONNX,
    Server,
    digits,
)

pytestmark = pytest.mark.integration

ANOMALY = ["log_prob", "anomaly_score", "percentile", "is_anomaly"]
GMM = [*ANOMALY, "component", "responsibility"]
TEXTS = ["to be or not to be", "whether tis nobler", "eeee bbb tt"]  # an odd one last


@pytest.fixture(scope="module")
def client(server: Server) -> triton.InferenceServerClient:
    with triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120) as c:
        yield c


def bc_records(n: int = 8) -> np.ndarray:
    return load_breast_cancer().data[:n]


def post(server: Server, path: str, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def infer(server: Server, name: str, body: dict, path: str = "") -> httpx.Response:
    return post(server, f"/v2/models/{name}{path}/infer", body)


def records_input(x: np.ndarray, datatype: str = "FP64", nested: bool = False) -> dict:
    data = x.tolist() if nested else x.reshape(-1).tolist()
    return {"name": "records", "shape": list(x.shape), "datatype": datatype, "data": data}


def v1_anomaly(server: Server, name: str, body: dict) -> dict:
    response = post(server, f"/v1/models/{name}/anomaly", body)
    assert response.status_code == 200, response.text
    return response.json()


def v1_columns(v1: dict, names: list[str]) -> dict[str, list]:
    """The /v1 anomaly results as the v2 output columns."""
    fields = {"anomaly_score": "score"}
    return {n: [r[fields.get(n, n)] for r in v1["results"]] for n in names}


def outputs(response: httpx.Response) -> dict[str, list]:
    assert response.status_code == 200, response.text
    return {o["name"]: o["data"] for o in response.json()["outputs"]}


def error(response: httpx.Response, status: int = 400) -> str:
    """The protocol's error message; the status and body form are checked."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "request_id"} and isinstance(body["error"], str), body
    assert body["request_id"] == response.headers["x-request-id"], body
    return body["error"]


def assert_columns_equal(got: dict, want: dict) -> None:
    for name, values in want.items():
        if isinstance(values[0], float):
            np.testing.assert_allclose(got[name], values, rtol=1e-12, atol=1e-9, err_msg=name)
        else:
            assert list(got[name]) == list(values), name


# ---- health and metadata --------------------------------------------------------------------------------------


def test_server_health_and_metadata(server: Server, client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "genserve" and "binary_tensor_data" in meta["extensions"] and meta["version"]
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200


def test_model_readiness_and_versions(server: Server, client: triton.InferenceServerClient) -> None:
    version = httpx.get(f"{server.url}/v1/models/{REPLICATED}").json()["version"]
    assert client.is_model_ready(REPLICATED) and client.is_model_ready(TEXT)
    assert client.is_model_ready(REPLICATED, model_version=version)
    assert not client.is_model_ready(REPLICATED, model_version="999")
    assert not client.is_model_ready("no-such-model")
    assert "no-such-model" in error(httpx.get(f"{server.url}/v2/models/no-such-model/ready"), 404)


def test_model_metadata_describes_each_kind(server: Server, client: triton.InferenceServerClient) -> None:
    bc = client.get_model_metadata(REPLICATED)
    version = httpx.get(f"{server.url}/v1/models/{REPLICATED}").json()["version"]
    assert bc["name"] == REPLICATED and bc["versions"] == [version] and bc["platform"] == "onnxruntime"
    assert bc["inputs"] == [{"name": "records", "datatype": "FP32", "shape": [-1, 30]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in bc["outputs"]] == [
        ("log_prob", "FP64", [-1]), ("anomaly_score", "FP64", [-1]), ("percentile", "FP64", [-1]),
        ("is_anomaly", "BOOL", [-1]), ("component", "INT64", [-1]), ("responsibility", "FP64", [-1])]
    assert client.get_model_metadata(SINGLE, model_version=version)["platform"] == "pytorch"

    cond = client.get_model_metadata(IMAGE_COND)
    assert cond["inputs"] == [{"name": "images", "datatype": "INT64", "shape": [-1, 8, 8]},
                              {"name": "labels", "datatype": "INT64", "shape": [-1]}]
    assert [o["name"] for o in cond["outputs"]] == ANOMALY
    assert client.get_model_metadata(IMAGE_BIN)["inputs"] == [
        {"name": "images", "datatype": "INT64", "shape": [-1, 6, 6]}]
    text = client.get_model_metadata(TEXT)
    assert text["inputs"] == [{"name": "texts", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in text["outputs"]] == [*ANOMALY, "text_index", "line"]

    with pytest.raises(InferenceServerException, match="no model named 'nope'") as e:
        client.get_model_metadata("nope")
    assert e.value.status() == "404"
    assert "has no version '7'" in error(httpx.get(f"{server.url}/v2/models/{REPLICATED}/versions/7"), 404)


def test_unimplemented_v2_routes_answer_in_the_protocols_form(server: Server,
                                                              client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="no route GET /v2/models/bc/config"):
        client.get_model_config(REPLICATED)
    assert "/v2/repository/models/bc/config" in error(httpx.post(f"{server.url}/v2/repository/models/bc/config",
                                                                json={}), 404)
    # The session server's model control mode is none: loading is refused, saying how to allow it.
    assert "control mode is 'none'" in error(httpx.post(f"{server.url}/v2/repository/models/bc/load", json={}))


def test_repository_index(server: Server, client: triton.InferenceServerClient) -> None:
    """Triton's repository index (keys are off here; with keys it needs the admin role: test_edge_http)."""
    index = client.get_model_repository_index()
    assert {"name": REPLICATED, "version": "1", "state": "READY", "reason": ""} in index
    assert {m["name"] for m in index} >= {REPLICATED, SINGLE, TEXT, IMAGE_COND}
    assert all(m["state"] == "READY" for m in index)  # the session server serves its whole store
    ready = httpx.post(f"{server.url}/v2/repository/index", json={"ready": True}, timeout=30).json()
    assert ready == [m for m in index if m["state"] == "READY"]
    assert "ready" in error(httpx.post(f"{server.url}/v2/repository/index", json={"ready": "maybe"}))


# ---- inference with tritonclient ---------------------------------------------------------------------------


def test_binary_infer_equals_v1(server: Server, client: triton.InferenceServerClient) -> None:
    """tritonclient's defaults: binary inputs, every output binary. FP32 records are widened exactly."""
    x = bc_records().astype(np.float32)
    records = triton.InferInput("records", list(x.shape), "FP32")
    records.set_data_from_numpy(x)
    result = client.infer(REPLICATED, [records], request_id="req-7")
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == REPLICATED
    assert all("binary_data_size" in o["parameters"] and "data" not in o for o in response["outputs"])
    v1 = v1_anomaly(server, REPLICATED, {"records": x.astype(np.float64).tolist()})
    assert response["parameters"]["threshold"] == v1["threshold"]
    got = {name: result.as_numpy(name).tolist() for name in GMM}
    assert result.as_numpy("is_anomaly").dtype == np.bool_ and result.as_numpy("component").dtype == np.int64
    assert_columns_equal(got, v1_columns(v1, GMM))


def test_json_infer_with_requested_outputs(server: Server, client: triton.InferenceServerClient) -> None:
    x = load_wine().data[:6]
    records = triton.InferInput("records", list(x.shape), "FP64")
    records.set_data_from_numpy(x, binary_data=False)
    wanted = [triton.InferRequestedOutput(n, binary_data=False) for n in ("is_anomaly", "log_prob")]
    result = client.infer(SINGLE, [records], outputs=wanted, parameters={"false_positive_rate": 0.5})
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["is_anomaly", "log_prob"]
    assert all("data" in o and "parameters" not in o for o in response["outputs"])
    v1 = v1_anomaly(server, SINGLE, {"records": x.tolist(), "false_positive_rate": 0.5})
    assert response["parameters"]["false_positive_rate"] == 0.5
    assert_columns_equal({n: result.as_numpy(n).tolist() for n in ("is_anomaly", "log_prob")},
                         v1_columns(v1, ["is_anomaly", "log_prob"]))


def test_image_infer_with_labels_and_any_integer_type(server: Server, client: triton.InferenceServerClient) -> None:
    images, labels = digits()
    images, labels = images[DIGITS_TRAIN:DIGITS_TRAIN + 5], labels[DIGITS_TRAIN:DIGITS_TRAIN + 5]
    x = triton.InferInput("images", list(images.shape), "UINT8")
    x.set_data_from_numpy(images.astype(np.uint8))
    y = triton.InferInput("labels", [5], "INT32")
    y.set_data_from_numpy(labels.astype(np.int32))
    result = client.infer(IMAGE_COND, [x, y])
    v1 = v1_anomaly(server, IMAGE_COND, {"images": images.tolist(), "labels": labels.tolist()})
    assert_columns_equal({n: result.as_numpy(n).tolist() for n in ANOMALY}, v1_columns(v1, ANOMALY))

    binary, _ = digits(binary=True)
    b = triton.InferInput("images", [3, 6, 6], "FP32")
    b.set_data_from_numpy(binary[DIGITS_TRAIN:DIGITS_TRAIN + 3].astype(np.float32), binary_data=False)
    got = client.infer(IMAGE_BIN, [b], outputs=[triton.InferRequestedOutput("log_prob")]).as_numpy("log_prob")
    want = post(server, f"/v1/models/{IMAGE_BIN}/log_prob", {"images": binary[DIGITS_TRAIN:DIGITS_TRAIN + 3].tolist()})
    assert got.tolist() == want.json()["log_prob"]


def test_text_infer_with_bytes(server: Server, client: triton.InferenceServerClient) -> None:
    texts = triton.InferInput("texts", [len(TEXTS)], "BYTES")
    texts.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=np.object_))
    result = client.infer(TEXT, [texts])
    v1 = v1_anomaly(server, TEXT, {"texts": TEXTS})
    assert_columns_equal({n: result.as_numpy(n).tolist() for n in ANOMALY}, v1_columns(v1, ANOMALY))
    assert result.get_response()["parameters"]["score_type"] == v1["score_type"]
    scored = post(server, f"/v1/models/{TEXT}/score", {"texts": TEXTS, "per_token": False}).json()
    np.testing.assert_allclose(result.as_numpy("log_prob"), [r["log_prob"] for r in scored["results"]],
                               rtol=1e-12)

    # The same texts as JSON strings, log_prob alone (answered by /score).
    body = {"inputs": [{"name": "texts", "shape": [3], "datatype": "BYTES", "data": TEXTS}],
            "outputs": [{"name": "log_prob"}]}
    assert outputs(infer(server, TEXT, body)) == {"log_prob": [r["log_prob"] for r in scored["results"]]}


def test_text_per_line(server: Server) -> None:
    texts = ["to be or not to be\n\nthat is the question", "whether tis nobler"]
    body = {"inputs": [{"name": "texts", "shape": [2], "datatype": "BYTES", "data": texts}],
            "parameters": {"per_line": True}}
    got = outputs(infer(server, TEXT, body))
    v1 = v1_anomaly(server, TEXT, {"texts": texts, "per_line": True})
    assert got["text_index"] == [0, 0, 1] and got["line"] == [1, 3, 1]
    assert_columns_equal(got, v1_columns(v1, [*ANOMALY, "text_index", "line"]))
    plain = {"inputs": body["inputs"], "outputs": [{"name": "line"}]}
    assert "per_line: true" in error(infer(server, TEXT, plain))
    assert "per_line" in error(infer(server, SINGLE, {"inputs": [records_input(load_wine().data[:1])],
                                                      "parameters": {"per_line": True}}))


def test_client_raises_with_the_servers_message(client: triton.InferenceServerClient) -> None:
    x = np.zeros((2, 5), dtype=np.float32)
    records = triton.InferInput("records", [2, 5], "FP32")
    records.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as e:
        client.infer(REPLICATED, [records])
    assert e.value.status() == "400"
    assert "shape [2, 5]" in e.value.message() and "[-1, 30]" in e.value.message()

    texts = triton.InferInput("texts", [1], "BYTES")
    texts.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match=r"unknown input 'texts'.*takes records"):
        client.infer(SINGLE, [texts])


def test_compressed_request_bodies(server: Server, client: triton.InferenceServerClient) -> None:
    x = bc_records(3)
    records = triton.InferInput("records", list(x.shape), "FP64")
    records.set_data_from_numpy(x)
    for algorithm in ("gzip", "deflate"):
        result = client.infer(REPLICATED, [records], request_compression_algorithm=algorithm)
        want = v1_columns(v1_anomaly(server, REPLICATED, {"records": x.tolist()}), ["anomaly_score"])
        assert result.as_numpy("anomaly_score").tolist() == want["anomaly_score"]


# ---- the protocol's details over raw HTTP ------------------------------------------------------------------


def test_flat_and_nested_data_agree_and_equal_v1(server: Server) -> None:
    x = bc_records(4)
    flat = outputs(infer(server, REPLICATED, {"inputs": [records_input(x)]}))
    nested = outputs(infer(server, REPLICATED, {"inputs": [records_input(x, nested=True)]}))
    assert flat == nested and list(flat) == GMM
    assert_columns_equal(flat, v1_columns(v1_anomaly(server, REPLICATED, {"records": x.tolist()}), GMM))

    lp = post(server, f"/v1/models/{REPLICATED}/log_prob", {"records": x.tolist(), "responsibilities": True}).json()
    only = outputs(infer(server, REPLICATED, {"inputs": [records_input(x)],
                                              "outputs": [{"name": "log_prob"}, {"name": "component"}]}))
    assert only["log_prob"] == lp["log_prob"]
    assert only["component"] == np.argmax(lp["responsibilities"], axis=1).tolist()


def test_request_id_parameters_and_output_subset(server: Server) -> None:
    x = bc_records(5)
    body = {"id": "abc-1", "inputs": [records_input(x, "FP32")], "parameters": {"threshold": -1e9},
            "outputs": [{"name": "percentile"}, {"name": "is_anomaly"}]}
    response = infer(server, REPLICATED, body)
    reply = response.json()
    assert reply["id"] == "abc-1" and reply["model_name"] == REPLICATED and reply["model_version"]
    assert reply["parameters"]["threshold"] == -1e9 and "false_positive_rate" not in reply["parameters"]
    assert [(o["name"], o["datatype"], o["shape"]) for o in reply["outputs"]] == [
        ("percentile", "FP64", [5]), ("is_anomaly", "BOOL", [5])]
    assert outputs(response)["is_anomaly"] == [True] * 5
    assert "id" not in infer(server, REPLICATED, {"inputs": [records_input(x)]}).json()

    versioned = infer(server, REPLICATED, body, path=f"/versions/{reply['model_version']}")
    assert outputs(versioned) == outputs(response)


@pytest.mark.parametrize("score", ["bits_per_dim", "knn", "typicality", "ensemble"])
def test_score_parameter_selects_the_score_type(server: Server, score: str) -> None:
    x = bc_records(3)
    x[2, 0] *= 8  # far from every training record
    response = infer(server, REPLICATED, {"inputs": [records_input(x)], "parameters": {"score": score}})
    v1 = v1_anomaly(server, REPLICATED, {"records": x.tolist(), "score": score})
    assert response.json()["parameters"]["score_type"] == v1["score_type"] == score
    assert_columns_equal(outputs(response), v1_columns(v1, GMM))
    message = error(infer(server, REPLICATED, {"inputs": [records_input(x)], "parameters": {"score": "nope"}}))
    assert "nope" in message and "nll" in message


def test_binary_response_over_raw_http(server: Server) -> None:
    """JSON inputs, binary outputs: the JSON header, then each output's raw little-endian bytes in order."""
    x = bc_records(3)
    body = {"inputs": [records_input(x)], "parameters": {"binary_data_output": True},
            "outputs": [{"name": "log_prob"}, {"name": "is_anomaly"}, {"name": "component",
                                                                       "parameters": {"binary_data": False}}]}
    response = infer(server, REPLICATED, body)
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    n = int(response.headers["inference-header-content-length"])
    header, raw = json.loads(response.content[:n]), response.content[n:]
    sizes = [o.get("parameters", {}).get("binary_data_size") for o in header["outputs"]]
    assert sizes == [24, 3, None] and len(raw) == 27 and header["outputs"][2]["data"] == outputs(
        infer(server, REPLICATED, {"inputs": [records_input(x)], "outputs": [{"name": "component"}]}))["component"]
    v1 = v1_anomaly(server, REPLICATED, {"records": x.tolist()})
    assert np.frombuffer(raw[:24], "<f8").tolist() == v1_columns(v1, ["log_prob"])["log_prob"]
    assert np.frombuffer(raw[24:], np.bool_).tolist() == v1_columns(v1, ["is_anomaly"])["is_anomaly"]


def test_binary_request_over_raw_http(server: Server) -> None:
    """BYTES elements as uint32 length + UTF-8, without a Content-Type (as tritonclient sends)."""
    raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in TEXTS)
    header = json.dumps({"inputs": [{"name": "texts", "shape": [3], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "log_prob"}]}).encode()
    response = httpx.post(f"{server.url}/v2/models/{TEXT}/infer", content=header + raw,
                          headers={"Inference-Header-Content-Length": str(len(header))})
    scored = post(server, f"/v1/models/{TEXT}/score", {"texts": TEXTS, "per_token": False}).json()
    assert outputs(response)["log_prob"] == [r["log_prob"] for r in scored["results"]]

    short = httpx.post(f"{server.url}/v2/models/{TEXT}/infer", content=header + raw[:-2],
                       headers={"Inference-Header-Content-Length": str(len(header)),
                                "Content-Type": "application/octet-stream"})
    assert "runs past the end of the body" in error(short)


BAD_REQUESTS = [
    # (body, words the message must contain)
    ({"inputs": [{"name": "records", "shape": [2, 30], "datatype": "FP32", "data": [0.0] * 59}]},
     ["shape [2, 30] has 60 elements", "data has 59"]),
    ({"inputs": [{"name": "records", "shape": [2, 30], "datatype": "FP32", "data": [[0.0] * 20] * 3}]},
     ["nested data must match shape [2, 30]", "3 entries, expected 2"]),
    ({"inputs": [{"name": "records", "shape": [1, 29], "datatype": "FP32", "data": [0.0] * 29}]},
     ["shape [1, 29]", "[-1, 30]", "records x 30 features"]),
    ({"inputs": [{"name": "records", "shape": [1, 30], "datatype": "BYTES", "data": ["a"] * 30}]},
     ["datatype BYTES is not accepted", "FP32"]),
    ({"inputs": [{"name": "records", "shape": [1, 30], "datatype": "FLOAT32", "data": [0.0] * 30}]},
     ["unknown datatype 'FLOAT32'", "FP64"]),
    ({"inputs": [{"name": "records", "shape": [1, 30], "datatype": "FP32", "data": ["1.0"] * 30}]},
     ["element 0 is \"1.0\"", "FP32 data are each a number"]),
    ({"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP32", "data": [0.0] * 30}]},
     ["unknown input 'x'", "records (FP32 [-1, 30])"]),
    ({"inputs": [{"name": "records", "shape": [0, 30], "datatype": "FP32", "data": []}]},
     ["shape [0, 30]", "any number >= 1"]),
    ({"inputs": [{"name": "records", "shape": [1, 30], "datatype": "FP32"}]}, ["has no data"]),
    ({"inputs": []}, ["inputs", "at least 1"]),
    ({"input": []}, ["not an inference request", "inputs"]),
    ({"inputs": [{"name": "records", "shape": [1, 30], "datatype": "FP32", "data": [0.0] * 30}],
      "outputs": [{"name": "density"}]}, ["unknown output 'density'", "log_prob, anomaly_score"]),
    ({"inputs": [{"name": "records", "shape": [1, 30], "datatype": "FP32", "data": [0.0] * 30}],
      "parameters": {"fpr": 0.1}}, ["unknown request parameter 'fpr'", "false_positive_rate"]),
    ({"inputs": [{"name": "records", "shape": [1, 30], "datatype": "FP32", "data": [0.0] * 30}],
      "parameters": {"false_positive_rate": 2.0}}, ["false_positive_rate", "less than 1"]),
    ({"inputs": [{"name": "records", "shape": [1, 30], "datatype": "FP32", "data": [0.0] * 30}],
      "parameters": {"threshold": 1.0, "false_positive_rate": 0.1}}, ["not both"]),
]


@pytest.mark.parametrize(("body", "words"), BAD_REQUESTS, ids=[w[0][:30] for _, w in BAD_REQUESTS])
def test_bad_requests_get_a_400_saying_what_is_allowed(server: Server, body: dict, words: list[str]) -> None:
    message = error(infer(server, REPLICATED, body))
    for word in words:
        assert word in message, message


def test_bad_images_and_texts(server: Server) -> None:
    images = {"name": "images", "shape": [1, 6, 6], "datatype": "FP32", "data": [0.5] * 36}
    assert re.search(r"whole numbers.*images\[0\]\[0\]\[0\] is 0.5", error(infer(server, IMAGE_BIN,
                                                                                  {"inputs": [images]})))
    levels = {**images, "datatype": "INT64", "data": [3] * 36}
    assert "images[0]" in error(infer(server, IMAGE_BIN, {"inputs": [levels]}))
    labels = {"name": "labels", "shape": [1], "datatype": "INT64", "data": [0]}
    assert "unknown input 'labels'" in error(infer(server, IMAGE_BIN, {"inputs": [{**images, "data": [0] * 36},
                                                                                labels]}))
    assert "input 'images' is missing" in error(infer(server, IMAGE_COND, {"inputs": [labels]}))
    texts = {"name": "texts", "shape": [1], "datatype": "BYTES", "data": [1]}
    assert "a string" in error(infer(server, TEXT, {"inputs": [texts]}))


def test_unknown_model_and_malformed_bodies_never_500(server: Server) -> None:
    assert "no model named 'nope'" in error(infer(server, "nope", {"inputs": []}), 404)
    url = f"{server.url}/v2/models/{REPLICATED}/infer"
    assert "not valid JSON" in error(httpx.post(url, content=b"{not json"))
    assert "Inference-Header-Content-Length" in error(
        httpx.post(url, content=b"{}", headers={"Inference-Header-Content-Length": "99"}))
    leftover = json.dumps({"inputs": [records_input(bc_records(1))]}).encode()
    assert "not claimed by any input" in error(
        httpx.post(url, content=leftover + b"xx", headers={"Inference-Header-Content-Length": str(len(leftover))}))
    assert "gzip data" in error(httpx.post(url, content=b"plain", headers={"Content-Encoding": "gzip"}))
    # Outside /v2 a JSON Content-Type is still required.
    assert httpx.post(f"{server.url}/v1/models/{REPLICATED}/anomaly", content=b"{}").status_code == 415
    assert httpx.post(url, content=b"{}", headers={"Content-Type": "text/plain"}).status_code == 415


def test_limits_still_apply(server: Server) -> None:
    x = np.zeros((501, 30))
    assert "limit is 500" in error(infer(server, REPLICATED, {"inputs": [records_input(x)]}), 413)
    huge = gzip.compress(b" " * 2_000_000)
    assert "once decompressed" in error(httpx.post(f"{server.url}/v2/models/{REPLICATED}/infer", content=huge,
                                                   headers={"Content-Encoding": "gzip"}), 413)


def counted(server: Server, **labels: str) -> float:
    """genserve_requests_total summed over the samples carrying `labels`."""
    total = 0.0
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        m = re.match(r"^genserve_requests_total\{(.*)\} (\S+)$", line)
        if m and all(dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))).get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_v2_requests_are_counted(server: Server) -> None:
    """The middleware's metrics cover /v2 routes, labelled by route name and model."""
    before = counted(server, endpoint="v2_infer", model=SINGLE, status="200")
    bad = counted(server, endpoint="v2_infer", model=SINGLE, status="400")
    infer(server, SINGLE, {"inputs": [records_input(load_wine().data[:2])]})
    infer(server, SINGLE, {"inputs": []})
    want = (before + 1, bad + 1)
    deadline = time.monotonic() + 20
    while True:  # metrics reach the exposition asynchronously
        got = tuple(counted(server, endpoint="v2_infer", model=SINGLE, status=s) for s in ("200", "400"))
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert got == want


def test_uncalibrated_model_answers_log_prob_only(server: Server) -> None:
    # TEXT_ONNX has no calibration.json: a request naming no outputs gets log_prob alone; naming an anomaly
    # output is a 400 that says the model is not calibrated.
    body = {"inputs": [{"name": "texts", "shape": [2], "datatype": "BYTES", "data": TEXTS[:2]}]}
    got = outputs(infer(server, TEXT_ONNX, body))
    scored = post(server, f"/v1/models/{TEXT_ONNX}/score", {"texts": TEXTS[:2], "per_token": False}).json()
    assert got == {"log_prob": [r["log_prob"] for r in scored["results"]]}
    asked = {**body, "outputs": [{"name": "anomaly_score"}]}
    assert "no anomaly calibration" in error(infer(server, TEXT_ONNX, asked))


def test_batch_test_parameter_adds_the_batch_typicality_test(server: Server) -> None:
    x = bc_records(6)
    response = infer(server, REPLICATED, {"inputs": [records_input(x)], "parameters": {"batch_test": True}})
    v1 = v1_anomaly(server, REPLICATED, {"records": x.tolist(), "batch_test": True})
    params = response.json()["parameters"]
    assert {k.removeprefix("batch_"): v for k, v in params.items() if k.startswith("batch_")} == v1["batch"]
    assert params["batch_score_type"] == "nll" and params["batch_n"] == 6
    assert "batch_p_value" not in infer(server, REPLICATED, {"inputs": [records_input(x)]}).json()["parameters"]
    assert "must be a boolean" in error(infer(server, REPLICATED, {"inputs": [records_input(x)],
                                                                    "parameters": {"batch_test": "yes"}}))
