"""The served API over real HTTP on loopback, against a real Ray Serve instance (see conftest)."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_wine

from genserve.artifacts import artifact as art
from genserve.service.client import AsyncGenserveClient, GenserveClient, GenserveError
from genserve.service.records_runtime import load_model
from tests.service.conftest import (
    FLOW,
    GAN,
    IMAGE_BIN,
    IMAGE_COND,
    IMAGE_FLOW,
    REPLICATED,
    SINGLE,
    TEXT,
    TEXT_NGRAM,
    TEXT_ONNX,
    VAE,
    Server,
    metric,
    stop,
    wait_for_metric,
)

pytestmark = pytest.mark.integration

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def client(server: Server) -> GenserveClient:
    with GenserveClient(server.url) as c:
        yield c


def bc_records(n: int = 20) -> np.ndarray:
    return load_breast_cancer().data[:n]


def local(server: Server, name: str):
    return load_model(str(art.resolve(server.store, name)), runtime="torch")


# ---- health, discovery, docs -------------------------------------------------------------------


def test_health_ready_and_docs(server: Server, client: GenserveClient) -> None:
    assert client.healthy()
    ready = client.ready()
    assert ready.ready and ready.models == {REPLICATED: True, SINGLE: True, TEXT: True, TEXT_ONNX: True,
                                            TEXT_NGRAM: True, IMAGE_COND: True, IMAGE_BIN: True, FLOW: True,
                                            VAE: True, GAN: True, IMAGE_FLOW: True}
    assert httpx.get(f"{server.url}/docs").status_code == 200
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    for path in ("/v1/models", "/v1/models/{name}/log_prob", "/v1/models/{name}/anomaly",
                 "/v1/models/{name}/sample", "/healthz", "/readyz", "/metrics", "/v1/models/{name}/generate",
                 "/v1/models/{name}/score", "/v1/completions", "/v1/models/{name}/complete"):
        assert path in paths


def test_models_describe_artifacts(server: Server, client: GenserveClient) -> None:
    models = {m.name: m for m in client.models()}
    assert set(models) == {REPLICATED, SINGLE, TEXT, TEXT_ONNX, TEXT_NGRAM, IMAGE_COND, IMAGE_BIN, FLOW, VAE, GAN,
                           IMAGE_FLOW}
    assert {n: m.density for n, m in models.items() if m.density != "exact"} == {
        VAE: "bound", GAN: "none", IMAGE_FLOW: "bound"}
    bc = models[REPLICATED]
    assert bc.runtime == "onnx" and bc.kind == "gmm" and bc.version == "1"
    assert bc.input.n_features == 30 and bc.input.feature_names[0] == "mean radius"
    assert models[SINGLE].runtime == "torch"
    manifest = art.load_artifact(art.resolve(server.store, REPLICATED)).manifest
    assert bc.metrics["validation_nll_nats"] == manifest.metrics["validation_nll_nats"]
    assert bc.calibration.thresholds["nll"] == pytest.approx(manifest.metrics["anomaly_threshold_nll_nats"])
    # The artifact's own default, and why, as its manifest records them.
    default = manifest.metrics["anomaly_default_score"]
    assert bc.calibration.score == default["score"] == "ensemble" and bc.calibration.why == default["why"]
    assert bc.calibration.threshold == pytest.approx(bc.calibration.thresholds["ensemble"])
    assert bc.calibration.ensemble_members[0] == "knn" and set(bc.calibration.ensemble_members) <= {
        "knn", "nll", "likelihood_ratio", "typicality"}
    # records rank by knn and nll together (nll only where choose_members kept it)
    assert bc.calibration.ensemble_primary == [m for m in ("knn", "nll") if m in bc.calibration.ensemble_members]
    assert set(bc.calibration.thresholds) == {"nll", "bits_per_dim", "likelihood_ratio", "knn", "typicality",
                                              "ensemble"}
    assert client.model(SINGLE).config["covariance_type"] == "diag"


# ---- density endpoints -------------------------------------------------------------------------


def test_log_prob_matches_the_model_in_process(server: Server, client: GenserveClient) -> None:
    x = bc_records()
    got = client.log_prob(REPLICATED, x, responsibilities=True)
    want_lp, want_resp = local(server, REPLICATED).runtime.log_prob(x)
    np.testing.assert_allclose(got.log_prob, want_lp, rtol=1e-6)  # served by ONNX Runtime
    np.testing.assert_allclose(got.responsibilities, want_resp, atol=1e-6)
    np.testing.assert_allclose(got.bits_per_dim, -want_lp / (30 * np.log(2)), rtol=1e-6)
    assert client.log_prob(REPLICATED, x[:2]).responsibilities is None

    w = load_wine().data[:5]
    np.testing.assert_array_equal(client.log_prob(SINGLE, w).log_prob, local(server, SINGLE).runtime.log_prob(w)[0])


def test_small_models_of_records_are_scored_in_the_gateway(server: Server, client: GenserveClient) -> None:
    """wine (a diagonal GMM in torch) and the flow are small: each Gateway loads a copy with its replica's runtime
    and scores them itself, with the replica's numbers bit for bit; bc (score_in_gateway_below_ms: 0) stays in
    its two replicas, and a request over the inline size runs off the Gateway's event loop, as exact."""
    deadline = time.monotonic() + 60
    while client.model(SINGLE).scored_in != "gateway" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert client.model(SINGLE).scored_in == "gateway" and client.model(REPLICATED).scored_in == "replica"
    wine = local(server, SINGLE)
    for x in (load_wine().data[:1], np.resize(load_wine().data, (400, 13))):
        np.testing.assert_array_equal(client.log_prob(SINGLE, x).log_prob, wine.runtime.log_prob(x)[0])
    sampled = client.sample(SINGLE, n=20, seed=11).samples
    assert sampled == wine.module.sample(20, torch.Generator().manual_seed(11)).tolist()
    scored = client.anomaly(SINGLE, load_wine().data[:3], score="nll")
    np.testing.assert_array_equal([r.score for r in scored.results], -wine.runtime.log_prob(load_wine().data[:3])[0])


def test_a_flow_is_served_through_the_same_endpoints(server: Server, client: GenserveClient) -> None:
    """RealNVP on records: exact log p(x) as in process, anomaly scores from its calibration, seeded samples."""
    info = client.model(FLOW)
    assert info.kind == "realnvp" and info.density == "exact" and info.runtime in ("torch", "onnx")
    assert info.runtime_choice.requested == "auto"
    w = load_wine().data[:6]
    got = client.log_prob(FLOW, w)
    want, _ = local(server, FLOW).runtime.log_prob(w)
    np.testing.assert_allclose(got.log_prob, want, rtol=1e-6)
    assert got.density == "exact" and got.responsibilities is None
    scored = client.anomaly(FLOW, np.vstack([w[:1], w[:1] * 3]))
    assert [r.is_anomaly for r in scored.results] == [False, True] and scored.density == "exact"
    assert scored.results[0].component is None  # no mixture components
    a, b = (client.sample(FLOW, 5, seed=3).samples for _ in range(2))
    assert a == b and np.asarray(a).shape == (5, 13)
    # Responsibilities are a mixture's: asking a flow for them is a clear 400.
    r = httpx.post(f"{server.url}/v1/models/{FLOW}/log_prob", json={"records": w[:1].tolist(),
                                                                   "responsibilities": True})
    assert r.status_code == 400 and "responsibilities is for Gaussian mixtures" in r.json()["error"]["message"]


def test_anomaly_uses_the_calibration(server: Server, client: GenserveClient) -> None:
    loaded = local(server, REPLICATED)
    nll = loaded.calibration.get("nll")
    normal = bc_records(5)
    odd = normal.copy()
    odd[:, 0] *= 8  # radii far outside anything seen
    res = client.anomaly(REPLICATED, np.vstack([normal, odd]), score="nll")
    assert res.threshold == pytest.approx(nll.threshold) and res.false_positive_rate == 0.01
    scores = np.array([r.score for r in res.results])
    np.testing.assert_allclose(scores, -loaded.runtime.log_prob(np.vstack([normal, odd]))[0], rtol=1e-6)
    assert all(r.is_anomaly == (r.score > res.threshold) for r in res.results)
    assert all(r.is_anomaly and r.percentile == 100.0 for r in res.results[5:])
    np.testing.assert_allclose([r.percentile for r in res.results],
                               nll.percentile(scores), rtol=1e-9)

    looser = client.anomaly(REPLICATED, normal, false_positive_rate=0.5, score="nll")
    assert looser.threshold == pytest.approx(nll.threshold_for(0.5))
    assert looser.threshold < res.threshold
    fixed = client.anomaly(REPLICATED, normal, threshold=-1e9, score="nll")
    assert fixed.threshold == -1e9 and fixed.false_positive_rate is None
    assert all(r.is_anomaly for r in fixed.results)


def test_sample_is_seeded(client: GenserveClient) -> None:
    a = client.sample(SINGLE, n=50, seed=7)
    b = client.sample(SINGLE, n=50, seed=7)
    c = client.sample(SINGLE, n=50, seed=8)
    assert len(a.samples) == 50 and len(a.samples[0]) == 13 and a.feature_names[0] == "alcohol"
    assert a.samples == b.samples and a.samples != c.samples
    # Samples land where the data is: per-feature means within a few data standard deviations.
    data = load_wine().data
    assert np.all(np.abs(np.mean(a.samples, 0) - data.mean(0)) < 1.5 * data.std(0))


# ---- batching -------------------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_unchanged(server: Server, client: GenserveClient) -> None:
    x = bc_records(64)
    sequential = [client.log_prob(REPLICATED, x[i:i + 2]).log_prob for i in range(0, 64, 2)]
    before = client.metrics()

    async def concurrently():
        async with AsyncGenserveClient(server.url) as ac:
            return await asyncio.gather(*(ac.log_prob(REPLICATED, x[i:i + 2]) for i in range(0, 64, 2)))

    batched = asyncio.run(concurrently())
    for seq, got in zip(sequential, batched, strict=True):
        assert got.log_prob == seq  # identical, not merely close
    after = wait_for_metric(client, "genserve_batch_size_requests_sum", {"model": REPLICATED},
                            metric(before, "genserve_batch_size_requests_sum", model=REPLICATED) + 32)
    batches = (metric(after, "genserve_batch_size_requests_count", model=REPLICATED)
               - metric(before, "genserve_batch_size_requests_count", model=REPLICATED))
    assert 1 <= batches < 32, "32 concurrent requests should share forward passes"


def test_metrics_add_up_across_replicas(client: GenserveClient) -> None:
    before = client.metrics()
    x = bc_records(30)
    n_requests = 40

    async def load():
        async with AsyncGenserveClient(client._http.base_url) as ac:
            await asyncio.gather(*(ac.log_prob(REPLICATED, x[: 1 + i % 3]) for i in range(n_requests)))

    asyncio.run(load())
    n_records = sum(1 + i % 3 for i in range(n_requests))
    key = {"model": REPLICATED}
    after = wait_for_metric(client, "genserve_batch_size_records_sum", key,
                            metric(before, "genserve_batch_size_records_sum", **key) + n_records)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("genserve_requests_total", model=REPLICATED, endpoint="log_prob", status="200") == n_requests
    assert delta("genserve_records_scored_total", model=REPLICATED, endpoint="log_prob") == n_records
    # Recorded by the two model replicas themselves, so both replicas' shares are in the sum.
    assert delta("genserve_batch_size_records_sum", **key) == n_records
    assert delta("genserve_batch_size_requests_sum", **key) == n_requests
    assert delta("genserve_request_latency_seconds_count", model=REPLICATED, endpoint="log_prob") == n_requests
    assert "# TYPE genserve_requests_total counter" in after


def test_anomaly_and_sample_metrics(client: GenserveClient) -> None:
    before = client.metrics()
    odd = bc_records(3) * 8
    flagged = sum(r.is_anomaly for r in client.anomaly(REPLICATED, odd).results)
    client.sample(SINGLE, n=5, seed=1)
    after = wait_for_metric(client, "genserve_samples_total", {"model": SINGLE},
                            metric(before, "genserve_samples_total", model=SINGLE) + 5)
    assert metric(after, "genserve_anomalies_flagged_total", model=REPLICATED) - metric(
        before, "genserve_anomalies_flagged_total", model=REPLICATED) == flagged == 3
    assert metric(after, "genserve_samples_total", model=SINGLE) - metric(
        before, "genserve_samples_total", model=SINGLE) == 5


# ---- bad input -------------------------------------------------------------------------------------

BAD_REQUESTS = [
    # (path, body bytes, headers, status, error type, words the message must contain)
    (f"/v1/models/{SINGLE}/log_prob", b'{"records": [[1, 2]]}', JSON, 400, "wrong_feature_count",
     ["records[0] has 2 features", "expects 13", "alcohol"]),
    (f"/v1/models/{SINGLE}/log_prob", b'{"records": [[1, "a"]]}', JSON, 422, "invalid_request",
     ["records[0][1]", "valid number", "'a'"]),
    (f"/v1/models/{SINGLE}/log_prob", b'{"records": [[1, NaN]]}', JSON, 422, "invalid_request",
     ["records[0][1]", "finite number"]),
    (f"/v1/models/{SINGLE}/log_prob", b'{"records": [[Infinity]]}', JSON, 422, "invalid_request",
     ["finite number"]),
    (f"/v1/models/{SINGLE}/log_prob", b'{"records": []}', JSON, 422, "invalid_request",
     ["records", "at least 1"]),
    (f"/v1/models/{SINGLE}/log_prob", b'{"records": [[]]}', JSON, 422, "invalid_request",
     ["records[0]", "at least 1"]),
    (f"/v1/models/{SINGLE}/log_prob", b'{"records": [[1,2]', JSON, 400, "malformed_json", ["not valid JSON"]),
    (f"/v1/models/{SINGLE}/log_prob", b"", JSON, 400, "invalid_request", ["empty"]),
    (f"/v1/models/{SINGLE}/log_prob", b'{"records": [[1]]}', {"Content-Type": "text/plain"}, 415,
     "unsupported_media_type", ["application/json"]),
    ("/v1/models/nope/log_prob", b'{"records": [[1]]}', JSON, 404, "model_not_found",
     ["'nope'", REPLICATED, SINGLE]),
    (f"/v1/models/{SINGLE}/log_prob", b'{"records": [' + b",".join([b"[1]"] * 501) + b"]}", JSON, 413,
     "limit_exceeded", ["501 records", "limit is 500"]),
    (f"/v1/models/{SINGLE}/log_prob", b'{"records": [[' + b"1," * 600_000 + b"1]]}", JSON, 413,
     "body_too_large", ["limit of 1000000 bytes"]),
    (f"/v1/models/{SINGLE}/sample", b'{"n": 1001}', JSON, 413, "limit_exceeded", ["n=1001", "limit is 1000"]),
    (f"/v1/models/{SINGLE}/sample", b'{"n": 0}', JSON, 422, "invalid_request", ["n", "greater than or equal to 1"]),
    (f"/v1/models/{SINGLE}/anomaly", b'{"records": [[1]], "threshold": 1, "false_positive_rate": 0.1}', JSON, 422,
     "invalid_request", ["not both"]),
    (f"/v1/models/{SINGLE}/anomaly", b'{"records": [[1]], "false_positive_rate": 1.5}', JSON, 422,
     "invalid_request", ["false_positive_rate", "less than 1"]),
    ("/v1/nothing-here", b"{}", JSON, 404, "not_found", ["/docs"]),
]


@pytest.mark.parametrize(("path", "body", "headers", "status", "type_", "words"), BAD_REQUESTS,
                         ids=[f"{b[3]}-{b[4]}-{i}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_a_clear_4xx(server: Server, path, body, headers, status, type_, words) -> None:
    response = httpx.post(server.url + path, content=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type_
    for word in words:
        assert word in error["message"], error["message"]


def test_chunked_oversize_body_is_refused(server: Server) -> None:
    def chunks():
        yield b'{"records": [['
        for _ in range(200):
            yield b"1," * 5000
        yield b"1]]}"

    response = httpx.post(f"{server.url}/v1/models/{SINGLE}/log_prob", content=chunks(), headers=JSON, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["type"] == "body_too_large"


def test_bad_requests_do_not_disturb_good_ones_in_the_same_batch(server: Server, client: GenserveClient) -> None:
    w = load_wine().data[:8]
    want = client.log_prob(SINGLE, w).log_prob

    async def mixed():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            good = [http.post(f"/v1/models/{SINGLE}/log_prob", json={"records": w.tolist()}) for _ in range(10)]
            bad = [http.post(f"/v1/models/{SINGLE}/log_prob", content=b'{"records": [[1, NaN]]}', headers=JSON),
                   http.post(f"/v1/models/{SINGLE}/log_prob", json={"records": [[1.0] * 12]})] * 5
            return await asyncio.gather(*good, *bad)

    responses = asyncio.run(mixed())
    assert [r.status_code for r in responses[:10]] == [200] * 10
    assert all(r.json()["log_prob"] == want for r in responses[:10])
    assert sorted({r.status_code for r in responses[10:]}) == [400, 422]
    assert client.ready().ready  # no replica was lost


def test_client_raises_with_the_servers_message(client: GenserveClient) -> None:
    with pytest.raises(GenserveError) as err:
        client.log_prob("nope", [[1.0]])
    assert err.value.status_code == 404 and "available models" in err.value.message
    with pytest.raises(GenserveError) as err:
        client.log_prob(SINGLE, [[float("nan")] * 13])
    assert err.value.status_code == 422 and "finite" in err.value.message


# ---- shutdown (runs last, see conftest: it stops the session's server) --------------------------------


@pytest.mark.shutdown
def test_sigterm_stops_server_and_ray_within_seconds(server: Server) -> None:
    took = stop(server)
    assert server.process.returncode == 0, server.log_tail()
    assert took < 30, f"shutdown took {took:.1f}s"
    time.sleep(1)
    with pytest.raises(ProcessLookupError):  # no Ray process left in the server's process group
        os.killpg(server.process.pid, 0)
