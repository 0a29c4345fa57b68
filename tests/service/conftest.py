"""One real genserve server per test session: `genserve serve` in a subprocess (Ray + Serve),
over HTTP on loopback, with two small GMMs trained into a temporary store, one of them on two
replicas. The last test of test_http.py stops it with SIGTERM and checks it went quietly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from training.gmm_pipeline import GMMTrainConfig, train_gmm

REPLICATED = "bc"  # breast_cancer, full covariances, ONNX Runtime, 2 replicas
SINGLE = "wine"  # wine, diagonal covariances, torch, 1 replica
STARTUP_TIMEOUT_S = 180


@dataclass
class Server:
    url: str
    store: Path
    process: subprocess.Popen
    log: Path

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, port: int) -> None:
    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "genserve",
            "route_prefix": "/",
            "import_path": "service.app:build_app",
            "args": {"limits": {"max_records_per_request": 500, "max_samples_per_request": 1000,
                                "max_body_bytes": 1_000_000}},
            "deployments": [
                {"name": "Gateway", "ray_actor_options": {"num_cpus": 0}},
                {"name": REPLICATED, "num_replicas": 2, "ray_actor_options": {"num_cpus": 0},
                 "user_config": {"runtime": "onnx", "max_batch_size": 16, "batch_wait_timeout_s": 0.05}},
                {"name": SINGLE, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0},
                 "user_config": {"runtime": "torch", "max_batch_size": 8, "batch_wait_timeout_s": 0.01}},
            ],
        }],
    }
    path.write_text(yaml.safe_dump(config))


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    root = tmp_path_factory.mktemp("genserve")
    store = root / "store"
    train_gmm(GMMTrainConfig(dataset="sklearn:breast_cancer", name=REPLICATED, components=2, n_init=1),
              store, progress=False)
    train_gmm(GMMTrainConfig(dataset="sklearn:wine", name=SINGLE, components=2, covariance_type="diag",
                             n_init=1, export_onnx=False), store, progress=False)
    port = free_port()
    config = root / "serve.yaml"
    write_config(config, port)
    log = root / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--config", str(config), "--store", str(store),
             "--no-train-if-empty"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    srv = Server(url=f"http://127.0.0.1:{port}", store=store, process=process, log=log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"genserve serve exited with {process.returncode}:\n{srv.log_tail()}")
        try:
            if httpx.get(f"{srv.url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop(srv)
            pytest.fail(f"genserve serve not ready after {STARTUP_TIMEOUT_S}s:\n{srv.log_tail()}")
        time.sleep(0.5)
    yield srv
    stop(srv)


def stop(srv: Server, timeout: float = 60) -> float:
    """SIGTERM the server, wait, and return how long it took (kill the group if it hangs)."""
    if srv.process.poll() is not None:
        return 0.0
    started = time.monotonic()
    srv.process.send_signal(signal.SIGTERM)
    try:
        srv.process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(srv.process.pid, signal.SIGKILL)
        srv.process.wait()
    return time.monotonic() - started
