"""Poll control mode on a real server, once with a local store and once with an s3:// store (moto's S3 server on
loopback): a version that `genserve train` publishes is loaded and becomes the default while a client keeps
sending requests, with none failing; a rollback sticks across polls; a model deleted from the store is unloaded."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sklearn.datasets import load_wine

from genserve.artifacts.store import open_store
from genserve.service.client import GenserveClient
from genserve.training.gmm_pipeline import GMMTrainConfig, train_gmm
from tests.s3 import s3_server
from tests.service.conftest import CPU0, Server, free_port, start_server, stop, write_serve_config

pytestmark = pytest.mark.integration

WINE, FRESH = "wine", "fresh"
RECORDS = load_wine().data[:2].tolist()
VERSION = "genserve-model-version"


def publish(store: str, name: str) -> None:
    """A new version by `genserve train`, as a user publishes one."""
    subprocess.run([sys.executable, "-m", "genserve.service.cli", "train", "gmm", "--dataset", "sklearn:wine",
                    "--name", name, "--store", store, "--components", "2", "--covariance", "diag"],
                   check=True, capture_output=True, timeout=300)


def delete(store: str, name: str) -> None:
    if store.startswith("s3://"):
        import boto3

        bucket, _, prefix = store.removeprefix("s3://").partition("/")
        objects = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{name}/")["Contents"]
        boto3.client("s3").delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": o["Key"]} for o in objects]})
    else:
        shutil.rmtree(Path(store) / name)


@pytest.fixture(scope="module", params=["local", "s3"])
def polled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp(f"poll-{request.param}")
    with s3_server("polled", root / "cache") if request.param == "s3" else contextlib.nullcontext(str(root)) as base:
        store = f"{base}/models"
        with open_store(store).writing() as mirror:
            train_gmm(GMMTrainConfig(dataset="sklearn:wine", name=WINE, components=2, covariance_type="diag",
                                     n_init=1, export_onnx=False), mirror, progress=False)
        port = free_port()
        config = root / "serve.yaml"
        write_serve_config(config, port, {"management": {"poll_interval_s": 0.5},
                                          "default_deployment": {**CPU0, "user_config": {"runtime": "torch"}}})
        srv = start_server(config, store, port, root / "serve.log", extra_args=("--model-control", "poll"))
        srv.store = store
        yield srv
        stop(srv)


def served_version(server: Server, name: str) -> str | None:
    r = httpx.post(f"{server.url}/v1/models/{name}/log_prob", json={"records": RECORDS}, timeout=30)
    return r.headers.get(VERSION) if r.status_code == 200 else None


def wait_until(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.25)


def test_poll_serves_a_published_version_and_a_rollback_sticks(polled: Server) -> None:
    outcomes: list[tuple[int, str | None]] = []
    stopped = threading.Event()

    def send() -> None:
        with httpx.Client(timeout=60) as http:
            while not stopped.is_set():
                r = http.post(f"{polled.url}/v1/models/{WINE}/log_prob", json={"records": RECORDS})
                outcomes.append((r.status_code, r.headers.get(VERSION)))

    client = GenserveClient(polled.url, timeout=300)
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        assert served_version(polled, WINE) == "1"
        publish(polled.store, WINE)
        wait_until(lambda: served_version(polled, WINE) == "2", "version 2 to serve")
        # Its version policy (the latest) unloads version 1 once version 2 serves.
        wait_until(lambda: {(r.version, r.state) for r in client.repository() if r.name == WINE} == {
            ("1", "UNLOADED"), ("2", "READY")}, "version 1 to be unloaded")
        status = client.management()
        assert status.control == "poll"
        # Loading and unloading are the store's business in poll mode; promoting (a rollback) is allowed.
        r = httpx.post(f"{polled.url}/v1/admin/models/{WINE}/load", json={"version": "1"}, timeout=30)
        assert r.status_code == 400 and "control mode is 'poll'" in r.json()["error"]["message"]
        client.promote(WINE, 1)
        assert served_version(polled, WINE) == "1"
        time.sleep(2.0)  # several polls: the rollback sticks, version 2 stays loaded beside it
        assert served_version(polled, WINE) == "1"
        assert {(r.version, r.state) for r in client.repository() if r.name == WINE} == {
            ("1", "READY"), ("2", "READY")}
    finally:
        stopped.set()
        sender.join(timeout=60)
        client.close()
    assert outcomes and all(status == 200 for status, _ in outcomes), [o for o in outcomes if o[0] != 200][:5]
    assert {version for _, version in outcomes} <= {"1", "2"}


def test_poll_loads_a_new_model_and_unloads_a_deleted_one(polled: Server) -> None:
    publish(polled.store, FRESH)
    wait_until(lambda: served_version(polled, FRESH) == "1", "the new model to serve")
    delete(polled.store, FRESH)
    wait_until(lambda: httpx.post(f"{polled.url}/v1/models/{FRESH}/log_prob", json={"records": RECORDS},
                                  timeout=30).status_code == 404, "the deleted model to be unloaded")
    assert served_version(polled, WINE) == "1"  # the other model is untouched
