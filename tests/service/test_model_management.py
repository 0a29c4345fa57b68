"""Live model management on a real server in explicit control mode (its own Serve instance, for this module):
versions published, loaded, split, promoted, rolled back and unloaded while clients keep sending records, text
streams and images, with no failed request; a corrupted version refused while the old one serves; Triton's
repository API through tritonclient."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from sklearn.datasets import load_wine
from tritonclient.utils import InferenceServerException

from genserve.artifacts import artifact as art
from genserve.artifacts.tokenizer import train_char_tokenizer
from genserve.service.client import GenserveClient, GenserveError
from genserve.training.gmm_pipeline import GMMTrainConfig, train_gmm
from tests.service.conftest import (
    CPU0,
    Server,
    digits,
    fit_fvsbn,
    free_port,
    metric,
    start_server,
    stop,
    write_image_artifact,
    write_serve_config,
)
from tests.tiny_lm import TEXT as LM_TEXT
from tests.tiny_lm import fit_tiny_gpt

pytestmark = pytest.mark.integration

GMM, LM, IMG, OTHER, SPARE = "gmm", "lm", "img", "other", "spare"
RECORDS = load_wine().data[:2].tolist()
VERSION = "genserve-model-version"


def write_gmm(store: Path, name: str = GMM, dataset: str = "sklearn:wine") -> Path:
    return train_gmm(GMMTrainConfig(dataset=dataset, name=name, components=2, covariance_type="diag", n_init=1,
                                    export_onnx=False), store, progress=False)


def write_lm(store: Path) -> Path:
    tokenizer = train_char_tokenizer([LM_TEXT])
    model = fit_tiny_gpt(tokenizer)
    spec = art.TextInputSpec(tokenizer="char", vocab_size=tokenizer.vocab_size, context_length=64,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return art.write_artifact(store, kind="gpt", name=LM, config=model.config.to_dict(), input_spec=spec,
                              files={art.WEIGHTS: art.module_weights(model),
                                     art.TOKENIZER: tokenizer.to_json().encode()},
                              training={"source": "test"}, metrics={})


@pytest.fixture(scope="module")
def managed(tmp_path_factory: pytest.TempPathFactory) -> Server:
    root = tmp_path_factory.mktemp("managed")
    store = root / "store"
    write_gmm(store)
    write_gmm(store, OTHER, "sklearn:breast_cancer")
    write_gmm(store, SPARE)
    write_lm(store)
    binary, _ = digits(binary=True)
    write_image_artifact(store, IMG, fit_fvsbn(binary[:1500], None, levels=2, steps=50), binary[:1500],
                         binary[1500:], onnx=False)
    port = free_port()
    config = root / "serve.yaml"
    write_serve_config(config, port, {
        "models": [GMM, LM, IMG, OTHER], "management": {"control": "explicit"}, "limits": {"max_new_tokens": 64},
        "deployments": {LM: {**CPU0, "user_config": {"runtime": "torch", "slots": 8}},
                        GMM: {**CPU0, "user_config": {"runtime": "torch", "max_batch_size": 16}}},
        "default_deployment": {**CPU0, "user_config": {"runtime": "torch"}}},
        [{"name": "Gateway", **CPU0}, {"name": "ModelRepository", **CPU0}])
    srv = start_server(config, store, port, root / "serve.log")
    yield srv
    stop(srv)


@dataclass
class Outcome:
    model: str
    sent: float
    done: float
    status: int | str
    version: str | None
    complete: bool = True  # a stream that ended with [DONE] after its finish_reason


class Load:
    """Clients sending requests back to back, each outcome recorded, until stopped."""

    def __init__(self, url: str):
        self.url, self.outcomes, self.stopped = url, [], threading.Event()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def run(self, model: str, send: Callable[[httpx.Client], tuple[int, str | None, bool]], clients: int = 1):
        def loop() -> None:
            with httpx.Client(base_url=self.url, timeout=120) as http:
                while not self.stopped.is_set():
                    sent = time.monotonic()
                    try:
                        status, version, complete = send(http)
                    except httpx.HTTPError as e:
                        status, version, complete = type(e).__name__, None, False
                    with self.lock:
                        self.outcomes.append(Outcome(model, sent, time.monotonic(), status, version, complete))

        for _ in range(clients):
            self.threads.append(threading.Thread(target=loop, daemon=True))
            self.threads[-1].start()

    def stop(self) -> list[Outcome]:
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=120)
        return list(self.outcomes)

    def count(self, model: str, since: float) -> int:
        with self.lock:
            return sum(o.model == model and o.sent >= since for o in self.outcomes)

    def wait_for(self, model: str, since: float, n: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while self.count(model, since) < n:
            assert time.monotonic() < deadline, f"fewer than {n} {model} requests in {timeout:.0f}s"
            time.sleep(0.1)


def records(http: httpx.Client) -> tuple[int, str | None, bool]:
    r = http.post(f"/v1/models/{GMM}/log_prob", json={"records": RECORDS})
    return r.status_code, r.headers.get(VERSION), r.status_code == 200 and len(r.json()["log_prob"]) == 2


def images(http: httpx.Client) -> tuple[int, str | None, bool]:
    binary, _ = digits(binary=True)
    r = http.post(f"/v1/models/{IMG}/log_prob", json={"images": binary[1500:1502].tolist()})
    return r.status_code, r.headers.get(VERSION), r.status_code == 200


def stream(http: httpx.Client) -> tuple[int, str | None, bool]:
    body = {"prompt": "ab", "max_new_tokens": 48, "stream": True, "temperature": 1.0, "seed": 3}
    finished = done = False
    with http.stream("POST", f"/v1/models/{LM}/generate", json=body) as r:
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                finished = finished or json.loads(line[6:]).get("finish_reason") is not None
            elif line.startswith("event: error"):
                return 500, r.headers.get(VERSION), False
        return r.status_code, r.headers.get(VERSION), finished and done


def versions_served(outcomes: list[Outcome], model: str, start: float, end: float = float("inf")) -> list[str]:
    return [o.version for o in outcomes if o.model == model and start <= o.sent and o.done <= end]


def test_versions_change_under_load_with_no_failed_request(managed: Server) -> None:
    client = GenserveClient(managed.url, timeout=300)
    load = Load(managed.url)
    load.run(GMM, records, clients=2)
    load.run(LM, stream, clients=2)
    load.run(IMG, images)
    try:
        begin = time.monotonic()
        load.wait_for(GMM, begin, 10)
        load.wait_for(LM, begin, 2)

        # Publish version 2 of the records model and load it beside version 1: the default stays 1.
        write_gmm(managed.store)
        loading = time.monotonic()
        status = client.load_model(GMM, 2)
        loaded = time.monotonic()
        assert status.default_version == "1" and {v.version: v.state for v in status.versions} == {
            "1": "READY", "2": "READY"}
        pinned = httpx.post(f"{managed.url}/v1/models/{GMM}/versions/2/log_prob", json={"records": RECORDS})
        assert pinned.status_code == 200 and pinned.headers[VERSION] == "2" and pinned.json()["version"] == "2"
        v2 = httpx.post(f"{managed.url}/v2/models/{GMM}/versions/2/infer", json={"inputs": [
            {"name": "records", "datatype": "FP64", "shape": [2, 13], "data": RECORDS}]})
        assert v2.status_code == 200 and v2.json()["model_version"] == "2" and v2.headers[VERSION] == "2"

        # A canary: 30% to version 2.
        split = client.set_traffic(GMM, {"1": 70, "2": 30})
        assert split.traffic == {"1": 70, "2": 30}
        split_at = time.monotonic()
        load.wait_for(GMM, split_at, 200)
        promoting = time.monotonic()
        promote = client.promote(GMM, 2)
        promoted = time.monotonic()
        assert promote.default_version == "2" and promote.traffic == {"2": 100}
        load.wait_for(GMM, promoted, 20)
        rolling_back = time.monotonic()
        client.promote(GMM, 1)  # the rollback
        rolled_back = time.monotonic()
        load.wait_for(GMM, rolled_back, 20)

        # A new text version by the version policy (latest 1): version 2 serves, version 1 drains and goes.
        write_lm(managed.store)
        text = client.load_model(LM)
        reloaded = time.monotonic()
        assert text.default_version == "2"
        assert {v.version: v.state for v in text.versions} == {"1": "UNLOADED", "2": "READY"}
        load.wait_for(LM, reloaded, 4)

        # An unrelated model goes: the others never notice.
        gone = client.unload_model(OTHER)
        assert [v.state for v in gone.versions] == ["UNLOADED"]
        unloaded = httpx.post(f"{managed.url}/v1/models/{OTHER}/log_prob", json={"records": RECORDS})
        assert unloaded.status_code == 404 and OTHER in unloaded.json()["error"]["message"]
        load.wait_for(GMM, time.monotonic(), 10)
    finally:
        outcomes = load.stop()
        client.close()

    failed = [o for o in outcomes if o.status != 200 or not o.complete]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed: {failed[:5]}"
    assert {o.model for o in outcomes} == {GMM, LM, IMG}
    assert set(versions_served(outcomes, GMM, begin, loading)) == {"1"}
    # Each change is in effect when the API answers: requests sent after it see it, until the next change.
    split_versions = versions_served(outcomes, GMM, split_at, promoting)
    share = split_versions.count("2") / len(split_versions)
    # 30% of >= 150 requests: binomial sd <= 0.04; 4 sd either side.
    assert len(split_versions) >= 150 and 0.14 < share < 0.46, (share, len(split_versions))
    assert set(versions_served(outcomes, GMM, promoted, rolling_back)) == {"2"}
    assert set(versions_served(outcomes, GMM, rolled_back)) == {"1"}
    assert set(versions_served(outcomes, LM, begin, loaded)) == {"1"}
    assert set(versions_served(outcomes, LM, reloaded)) == {"2"}
    assert set(versions_served(outcomes, IMG, begin)) == {"1"}
    eventually_metric(managed, "genserve_requests_total", 1, exactly=False, model=GMM, version="2", endpoint="log_prob",
                      status="200")
    eventually_metric(managed, "genserve_model_traffic_percent", 100, model=GMM, version="1")
    eventually_metric(managed, "genserve_model_traffic_percent", 0, model=GMM, version="2")
    eventually_metric(managed, "genserve_model_version_ready", 1, model=LM, version="2")


def eventually_metric(server: Server, name: str, at_least: float, exactly: bool = True, **labels: str) -> None:
    """Wait (10 s at most) for the metric to reach `at_least` (or be exactly it, for a gauge)."""
    deadline = time.monotonic() + 10
    while True:
        value = metric(httpx.get(f"{server.url}/metrics", timeout=10).text, name, **labels)
        if value == at_least or (not exactly and value > at_least):
            return
        assert time.monotonic() < deadline, f"{name}{labels} is {value}, not {at_least}"
        time.sleep(0.2)


def test_a_corrupted_version_is_refused_and_the_old_one_keeps_serving(managed: Server) -> None:
    with GenserveClient(managed.url, timeout=300) as client:
        default = client.management()
        serving = next(m for m in default.models if m.name == GMM).default_version
        path = write_gmm(managed.store)  # the next version, then one byte of its weights flipped
        version = path.name
        weights = path / art.WEIGHTS
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
        with pytest.raises(GenserveError) as e:
            client.load_model(GMM, version)
        assert e.value.status_code == 400 and e.value.error_type == "load_failed"
        assert "sha256" in e.value.message, e.value.message
        row = next(r for r in client.repository() if r.name == GMM and r.version == version)
        assert row.state == "UNAVAILABLE" and "sha256" in row.reason
        after = next(m for m in client.management().models if m.name == GMM)
        assert after.default_version == serving
        r = httpx.post(f"{managed.url}/v1/models/{GMM}/log_prob", json={"records": RECORDS})
        assert r.status_code == 200 and r.headers[VERSION] == serving
        # Triton's load of the model applies its version policy (the latest: the corrupted one) and fails too.
        with triton.InferenceServerClient(managed.url.removeprefix("http://"), network_timeout=300) as tc, \
                pytest.raises(InferenceServerException, match="sha256"):
            tc.load_model(GMM)
        assert next(m for m in client.management().models if m.name == GMM).default_version == serving
    eventually_metric(managed, "genserve_model_load_failures_total", 1, exactly=False, model=GMM, version=version)
    # ... and in the ModelRepository replica's log, where Ray Serve keeps it.
    logs = Path(tempfile.gettempdir(), "ray").glob("session_*/logs/serve/replica_genserve_ModelRepository_*.log")
    assert any(f"model {GMM} version {version} failed to load" in log.read_text(errors="replace") for log in logs)


def test_tritonclient_repository_api(managed: Server) -> None:
    with triton.InferenceServerClient(managed.url.removeprefix("http://"), network_timeout=300) as tc:
        index = {(m["name"], m["version"]): m for m in tc.get_model_repository_index()}
        assert index[(SPARE, "1")]["state"] == "UNLOADED" and "not loaded" in index[(SPARE, "1")]["reason"]
        assert index[(IMG, "1")] == {"name": IMG, "version": "1", "state": "READY", "reason": ""}
        assert not tc.is_model_ready(SPARE)
        tc.load_model(SPARE)
        assert tc.is_model_ready(SPARE)
        x = triton.InferInput("records", [2, 13], "FP32")
        x.set_data_from_numpy(np.asarray(RECORDS, dtype=np.float32))
        assert tc.infer(SPARE, [x]).as_numpy("log_prob").shape == (2,)
        ready = httpx.post(f"{managed.url}/v2/repository/index", json={"ready": True}).json()
        assert {"name": SPARE, "version": "1", "state": "READY", "reason": ""} in ready
        assert all(m["state"] == "READY" for m in ready)
        tc.unload_model(SPARE)
        index = {(m["name"], m["version"]): m for m in tc.get_model_repository_index()}
        assert index[(SPARE, "1")]["state"] == "UNLOADED"
        with pytest.raises(InferenceServerException, match="no model named 'spare'"):
            tc.infer(SPARE, [x])
        with pytest.raises(InferenceServerException, match="no model named 'nope' in the store"):
            tc.load_model("nope")
        with pytest.raises(InferenceServerException, match="config or file overrides"):
            tc.load_model(SPARE, config="{}")


def test_management_refusals_say_what_is_allowed(managed: Server) -> None:
    url = managed.url
    r = httpx.put(f"{url}/v1/admin/models/{GMM}/traffic", json={"split": {"1": 50, "2": 40}})
    assert r.status_code == 422 and "sum to 100" in r.text
    r = httpx.put(f"{url}/v1/admin/models/{GMM}/traffic", json={"split": {"1": 50, "9": 50}})
    assert r.status_code == 400 and "9 are not READY" in r.json()["error"]["message"]
    r = httpx.put(f"{url}/v1/admin/models/{GMM}/default", json={"version": "99"})
    assert r.status_code == 404 and "no version '99' in the store" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/admin/models/nope/unload", json={})
    assert r.status_code == 404 and "not loaded" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/models/{GMM}/versions/77/log_prob", json={"records": RECORDS})
    assert r.status_code == 404 and "no version '77' loaded" in r.json()["error"]["message"]
