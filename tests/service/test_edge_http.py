"""API keys, roles, rate limits, request ids and the access log over real HTTP, with the official clients.

Keys change every answer of a server, so this module starts a second, small server of its own (a GMM and a
tiny character GPT) with keys on: three keys from a keys file (one stored as a sha256 hash) and one from
`genserve serve --api-key`; tight rate limits held by one shared actor for two Gateway replicas; /metrics
protected; the access log as JSON."""

from __future__ import annotations

import glob
import hashlib
import json
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton
from sklearn.datasets import load_wine
from tritonclient.http.auth import BasicAuth
from tritonclient.utils import InferenceServerException

from genserve.service.client import GenserveClient, GenserveError
from genserve.service.file_scorer import score_file
from genserve.training.gmm_pipeline import GMMTrainConfig, train_gmm
from tests.service.conftest import (
    CPU0,
    TEXT,
    Server,
    free_port,
    metric,
    start_server,
    stop,
    write_serve_config,
    write_text_models,
)
from tests.service.test_ui import make_driver, needs_browser, open_page, script_errors, set_value, wait

pytestmark = pytest.mark.integration

GMM = "wine"
INFER_KEY = "infer-3b9d0c1e5f7a"  # role infer, named 'analytics' in the keys file
BURST_KEY = "burst-8c2e4a6b0d1f"  # role infer: the requests-per-second test's own
TOKENS_KEY = "tokens-5e7f9a1b3c5d"  # role infer: the generated-tokens test's own
ADMIN_KEY = "admin-0a1b2c3d4e5f"  # role admin, stored as its sha256 in the keys file
CLI_KEY = "cli-f0e1d2c3b4a5"  # from `genserve serve --api-key` (role admin)
ALL_KEYS = (INFER_KEY, BURST_KEY, TOKENS_KEY, ADMIN_KEY, CLI_KEY)
RATE = {"requests_per_second": 4, "burst": 20, "generated_tokens_per_minute": 50, "mode": "shared"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Server:
    root = tmp_path_factory.mktemp("edge")
    store = root / "store"
    train_gmm(GMMTrainConfig(dataset="sklearn:wine", name=GMM, components=2, covariance_type="diag", n_init=1,
                             export_onnx=False), store, progress=False)
    write_text_models(store)
    keys = root / "api-keys"
    admin_hash = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    keys.write_text(f"# role per key\n{INFER_KEY} infer analytics\n{BURST_KEY} infer burst\n"
                    f"{TOKENS_KEY} infer tokens\nsha256:{admin_hash} admin ops\n")
    port = free_port()
    config = root / "serve.yaml"
    write_serve_config(
        config, port,
        {"models": [GMM, TEXT], "limits": {"max_new_tokens": 40}, "auth": {"protect_metrics": True},
         "rate_limits": RATE, "access_log": {"format": "json"}},
        # The layout from before live model management (model options beside the Gateway's): `genserve serve`
        # still reads it, moving them into args.deployments.
        [{"name": "Gateway", "num_replicas": 2, **CPU0},
         {"name": GMM, **CPU0, "user_config": {"runtime": "torch", "score_in_gateway_below_ms": 0}},
         {"name": TEXT, **CPU0, "user_config": {"runtime": "torch", "slots": 4}}])
    srv = start_server(config, store, port, root / "serve.log", extra_args=("--api-key", CLI_KEY),
                       env={"GENSERVE_API_KEYS_FILE": str(keys)})
    yield srv
    stop(srv)


def wine(n: int = 3) -> list[list[float]]:
    return load_wine().data[:n].tolist()


def post(edge: Server, path: str, body, key: str | None = None, **headers: str) -> httpx.Response:
    return httpx.post(edge.url + path, json=body, headers={**(bearer(key) if key else {}), **headers}, timeout=60)


# ---- keys and roles -------------------------------------------------------------------------------------------


def test_probes_stay_open(edge: Server):
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/ui/"):
        assert httpx.get(edge.url + path, timeout=10).status_code == 200, path
    assert httpx.get(edge.url + "/v1/models", timeout=10).status_code == 401  # what the playground then calls


def test_missing_or_wrong_key_is_401_in_each_protocols_shape(edge: Server):
    for key in (None, INFER_KEY[:-1] + "x"):
        r = post(edge, f"/v1/models/{GMM}/log_prob", {"records": wine()}, key)
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"].startswith("Bearer")
        error = r.json()["error"]
        assert error["type"] == "authentication_error" and error["request_id"] == r.headers["x-request-id"]
        assert ("needs an API key" if key is None else "not valid") in error["message"]
        r = post(edge, "/v1/completions", {"model": TEXT, "prompt": "to be", "max_tokens": 2}, key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
        r = post(edge, f"/v2/models/{GMM}/infer", {"inputs": []}, key)
        assert r.status_code == 401 and isinstance(r.json()["error"], str), r.text
    for key in ALL_KEYS:  # no key shows up in any answer
        assert key not in r.text


def test_every_key_source_and_header_form_works(edge: Server):
    ok = []
    for key in ALL_KEYS:
        r = post(edge, f"/v1/models/{GMM}/log_prob", {"records": wine(1)}, key)
        ok.append(r.status_code)
    r = httpx.post(f"{edge.url}/v1/models/{GMM}/log_prob", json={"records": wine(1)},
                   headers={"X-API-Key": INFER_KEY}, timeout=30)
    ok.append(r.status_code)
    assert ok == [200] * (len(ALL_KEYS) + 1)


def test_admin_routes_need_the_admin_role(edge: Server):
    r = post(edge, "/v2/repository/index", None, INFER_KEY)
    assert r.status_code == 403, r.text
    assert "role 'infer'" in r.json()["error"] and "needs role 'admin'" in r.json()["error"]
    for key in (ADMIN_KEY, CLI_KEY):
        r = post(edge, "/v2/repository/index", {"ready": True}, key)
        assert r.status_code == 200, r.text
        assert {"name": GMM, "version": "1", "state": "READY", "reason": ""} in r.json()
    index = post(edge, "/v2/repository/index", None, ADMIN_KEY).json()
    unserved = [m for m in index if m["name"] == "bard-onnx"]  # in the store, not in args.models
    assert unserved and unserved[0]["state"] == "UNLOADED" and "not loaded" in unserved[0]["reason"]


def test_metrics_and_docs_follow_the_settings(edge: Server):
    assert httpx.get(edge.url + "/metrics", timeout=10).status_code == 401  # auth.protect_metrics
    assert httpx.get(edge.url + "/openapi.json", timeout=10).status_code == 401  # auth.public_docs is off
    assert httpx.get(edge.url + "/openapi.json", headers=bearer(INFER_KEY), timeout=10).status_code == 200
    assert httpx.get(edge.url + "/docs", headers=bearer(INFER_KEY), timeout=10).status_code == 200
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(edge.url + "/metrics", headers=bearer(INFER_KEY), timeout=10).text
        if metric(text, "genserve_requests_rejected_total", reason="unauthenticated") > 0:
            break
        assert time.monotonic() < deadline, "no rejected requests counted"
        time.sleep(0.2)
    assert not any(key in text for key in ALL_KEYS)


# ---- the official clients ------------------------------------------------------------------------------------


def test_openai_client_with_keys(edge: Server):
    client = openai.OpenAI(base_url=f"{edge.url}/v1", api_key=INFER_KEY, max_retries=0)
    completion = client.completions.create(model=TEXT, prompt="to be", max_tokens=4, temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens == 4
    chunks = list(client.completions.create(model=TEXT, prompt="to be", max_tokens=3, stream=True,
                                                     temperature=0))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text[:3]
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=f"{edge.url}/v1", api_key="not-a-key-000", max_retries=0).completions.create(
            model=TEXT, prompt="to be", max_tokens=2)
    assert e.value.status_code == 401 and "not valid" in e.value.message


def test_tritonclient_with_keys(edge: Server):
    x = np.asarray(wine(2), dtype=np.float32)
    with triton.InferenceServerClient(edge.url.removeprefix("http://"), network_timeout=60) as client:
        records = triton.InferInput("records", list(x.shape), "FP32")
        records.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as e:
            client.infer(GMM, [records])
        assert "API key" in e.value.message()
        result = client.infer(GMM, [records], headers=bearer(INFER_KEY))
        assert result.as_numpy("log_prob").shape == (2,)
        client.register_plugin(BasicAuth("anyone", ADMIN_KEY))  # the key as Basic auth's password
        again = client.infer(GMM, [records])
        np.testing.assert_array_equal(again.as_numpy("log_prob"), result.as_numpy("log_prob"))
        index = client.get_model_repository_index()
        assert any(m["name"] == GMM and m["state"] == "READY" for m in index)


def test_genserve_client_and_score_file_with_keys(edge: Server, tmp_path: Path, monkeypatch):
    with GenserveClient(edge.url) as anonymous, pytest.raises(GenserveError) as e:
        anonymous.log_prob(GMM, wine(1))
    assert e.value.status_code == 401
    with GenserveClient(edge.url, api_key=INFER_KEY) as client:
        expected = client.log_prob(GMM, wine(4)).log_prob
    monkeypatch.setenv("GENSERVE_API_KEY", INFER_KEY)
    with GenserveClient(edge.url) as client:  # the key from the environment
        assert client.log_prob(GMM, wine(4)).log_prob == expected
    monkeypatch.delenv("GENSERVE_API_KEY")
    data = tmp_path / "wine.csv"
    names = load_wine().feature_names
    data.write_text(",".join(names) + "\n" + "\n".join(",".join(map(str, r)) for r in wine(4)) + "\n")
    summary = score_file(data, GMM, tmp_path / "out.jsonl", url=edge.url, api_key=INFER_KEY)
    assert summary.rows == 4
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all("score" in r for r in rows)


# ---- rate limits -----------------------------------------------------------------------------------------------


def test_requests_per_second_per_key_with_retry_after(edge: Server):
    started = time.monotonic()
    statuses, refused = [], None
    with httpx.Client(base_url=edge.url, headers=bearer(BURST_KEY), timeout=30) as client:
        for _ in range(80):
            r = client.get(f"/v1/models/{GMM}")
            statuses.append(r.status_code)
            if r.status_code == 429:
                refused = r
    elapsed = time.monotonic() - started
    admitted = statuses.count(200)
    assert set(statuses) <= {200, 429} and refused is not None
    # One shared bucket for both Gateway replicas: at most the burst plus what refilled meanwhile.
    assert admitted <= RATE["burst"] + RATE["requests_per_second"] * elapsed + 1, (admitted, elapsed)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_exceeded"
    assert "4 requests per second" in refused.json()["error"]["message"]
    # Another key is not slowed by this one's limit.
    assert httpx.get(f"{edge.url}/v1/models/{GMM}", headers=bearer(INFER_KEY), timeout=30).status_code == 200


def test_generated_tokens_per_minute(edge: Server):
    body = {"prompt": "to be or", "max_new_tokens": 30, "temperature": 0}
    first = post(edge, f"/v1/models/{TEXT}/generate", body, TOKENS_KEY)
    second = post(edge, f"/v1/models/{TEXT}/generate", body, TOKENS_KEY)
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    third = post(edge, f"/v1/models/{TEXT}/generate", body, TOKENS_KEY)  # 60 of 50 tokens used: in debt
    assert third.status_code == 429, third.text
    assert "50 generated tokens per minute" in third.json()["error"]["message"]
    assert int(third.headers["retry-after"]) >= 1
    scored = post(edge, f"/v1/models/{TEXT}/score", {"texts": ["to be"]}, TOKENS_KEY)  # not a generation
    assert scored.status_code == 200, scored.text


# ---- request ids and logs ------------------------------------------------------------------------------------


def test_request_ids_echoed_generated_and_validated(edge: Server):
    rid = f"edge-test-{time.time_ns()}"
    r = post(edge, f"/v1/models/{GMM}/log_prob", {"records": [[1.0]]}, INFER_KEY, **{"X-Request-ID": rid})
    assert r.status_code == 400 and r.headers["x-request-id"] == rid and r.json()["error"]["request_id"] == rid
    r = post(edge, f"/v1/models/{GMM}/log_prob", {"records": wine(1)}, INFER_KEY)
    assert r.status_code == 200 and len(r.headers["x-request-id"]) >= 16
    r = post(edge, f"/v1/models/{GMM}/log_prob", {"records": wine(1)}, INFER_KEY, **{"X-Request-ID": "no spaces"})
    assert r.status_code == 400 and "X-Request-ID" in r.json()["error"]["message"], r.text
    with httpx.stream("POST", f"{edge.url}/v1/models/{TEXT}/generate", headers={**bearer(INFER_KEY),
                      "X-Request-ID": rid + "-sse"}, json={"prompt": "to", "max_new_tokens": 2, "stream": True},
                      timeout=30) as stream:
        assert stream.headers["x-request-id"] == rid + "-sse"
        lines = list(stream.iter_lines())
        assert stream.status_code == 200 and "data: [DONE]" in lines, (stream.status_code, stream.headers, lines)


def serve_logs(needle: str) -> list[tuple[str, str]]:
    """(file name, line) of this machine's Ray Serve log lines that hold `needle`."""
    found = []
    for path in glob.glob("/tmp/ray/session_*/logs/serve/*.log"):
        with open(path, errors="replace") as f:
            found += [(Path(path).name, line) for line in f if needle in line]
    return found


def test_access_log_line_and_replica_logs_carry_the_request_id(edge: Server):
    rid = f"edge-log-{time.time_ns()}"
    r = post(edge, f"/v1/models/{GMM}/log_prob", {"records": wine(2)}, INFER_KEY, **{"X-Request-ID": rid})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 15  # replicas flush their logs every second (service.metrics.start_log_flusher)
    while True:
        found = serve_logs(rid)
        access = [json.loads(line[line.index("{"):]) for _, line in found if '"event":"access"' in line]
        # The model version's own application: genserve--NAME--vN (service/repository.py).
        served = [line for name, line in found if name.startswith(f"replica_genserve--{GMM}--v1_{GMM}_")]
        if (access and served) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert access and served, found  # the Gateway's access line, and the model replica's line for its call
    record = access[0]
    assert record["method"] == "POST" and record["route"] == "/v1/models/{name}/log_prob"
    assert record["model"] == GMM and record["version"] == "1" and record["status"] == 200
    assert record["items"] == 2 and record["key_id"] == "analytics" and record["latency_ms"] > 0
    for key in ALL_KEYS:  # no key in any log
        assert not serve_logs(key)


# ---- the playground with keys on ---------------------------------------------------------------------------


@needs_browser
def test_playground_asks_for_a_key_then_works(edge: Server):
    """In a real browser: /ui loads without a key, the API's 401 is shown as a readable message, and once the
    key is entered (kept in sessionStorage, so it survives the reload) the models appear."""
    from selenium.webdriver.common.by import By

    driver = make_driver()
    try:
        driver.get(f"{edge.url}/ui/#models")
        error = wait(driver, lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, ".error")
                                             if e.is_displayed() and "401" in e.text), None), 30, "the 401")
        assert "needs an API key" in error.text
        set_value(driver.find_element(By.ID, "api-key"), INFER_KEY)
        driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
        page = open_page(driver, edge.url, "models")
        wait(driver, lambda d: d.find_elements(By.ID, f"model-{GMM}"), 30, "the models once the key is in")
        assert page.find_element(By.ID, f"model-{TEXT}")
        assert driver.execute_script("return sessionStorage.getItem('genserve.apiKey')") == INFER_KEY
        assert not script_errors(driver)
    finally:
        driver.quit()


def test_failed_key_checks_spend_the_addresss_rate_limit(edge: Server):
    """Last in this module: it spends this machine's address bucket, which every keyless request shares."""
    statuses = []
    with httpx.Client(base_url=edge.url, headers=bearer("guess-00000000"), timeout=30) as client:
        for _ in range(80):
            statuses.append(client.get(f"/v1/models/{GMM}").status_code)
            if statuses[-1] == 429:
                break
    assert statuses[0] == 401 and statuses[-1] == 429, statuses
    # A valid key is its own caller, not slowed by the guesses from its address.
    assert httpx.get(f"{edge.url}/v1/models/{GMM}", headers=bearer(INFER_KEY), timeout=30).status_code == 200
