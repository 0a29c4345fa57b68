"""One real genserve server per test session: `genserve serve` in a subprocess (Ray + Serve),
over HTTP on loopback, with two small GMMs (one of them on two replicas) and a small character
transformer trained into a temporary store. The test marked `shutdown` runs last: it stops the
server with SIGTERM and checks it went quietly."""

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
import torch
import yaml

from models.gpt import GPT, GPTConfig
from models.ngram import NGramConfig, NGramLM
from training import artifact as art
from training.gmm_pipeline import GMMTrainConfig, train_gmm
from training.onnx_export import export_gpt_onnx
from training.tokenizer import train_char_tokenizer

REPLICATED = "bc"  # breast_cancer, full covariances, ONNX Runtime, 2 replicas
SINGLE = "wine"  # wine, diagonal covariances, torch, 1 replica
TEXT = "bard"  # a character GPT fitted to TEXT_CORPUS for a moment, torch, 1 replica
TEXT_CORPUS = "to be or not to be, that is the question.\nwhether tis nobler in the mind to suffer\n" * 4
TEXT_ONNX = "bard-onnx"  # the same weights with prefill/decode graphs, served by ONNX Runtime
TEXT_NGRAM = "bard-ngram"  # a 4-gram counted on TEXT_CORPUS
TEXT_CONTEXT = 64
TEXT_SLOTS = 8
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
                                "max_body_bytes": 1_000_000, "max_new_tokens": 40, "max_num_beams": 4, "max_n": 4,
                                "max_texts_per_request": 8}},
            "deployments": [
                {"name": "Gateway", "ray_actor_options": {"num_cpus": 0}},
                {"name": REPLICATED, "num_replicas": 2, "ray_actor_options": {"num_cpus": 0},
                 "user_config": {"runtime": "onnx", "max_batch_size": 16, "batch_wait_timeout_s": 0.05}},
                {"name": SINGLE, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0},
                 "user_config": {"runtime": "torch", "max_batch_size": 8, "batch_wait_timeout_s": 0.01}},
                {"name": TEXT, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0},
                 "user_config": {"runtime": "torch", "slots": TEXT_SLOTS, "max_waiting": 64}},
                {"name": TEXT_ONNX, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0},
                 "user_config": {"runtime": "onnx", "slots": 4}},
                {"name": TEXT_NGRAM, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
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
    write_text_models(store)
    port = free_port()
    config = root / "serve.yaml"
    write_config(config, port)
    log = root / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--config", str(config), "--store", str(store),
             "--no-train-defaults"],
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


def write_text_models(store: Path) -> None:
    """A tiny character GPT that has seen TEXT_CORPUS for a few seconds (enough to continue it), the same
    weights with ONNX graphs, and an n-gram model of the corpus."""
    tokenizer = train_char_tokenizer([TEXT_CORPUS])
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, context_length=TEXT_CONTEXT, n_layer=2, n_head=2, n_embd=48)
    model = GPT(config)
    data = torch.tensor([0, *tokenizer.encode(TEXT_CORPUS)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(data) - TEXT_CONTEXT - 1, (16,), generator=g)
        x = torch.stack([data[s : s + TEXT_CONTEXT] for s in starts])
        y = torch.stack([data[s + 1 : s + TEXT_CONTEXT + 1] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    spec = art.TextInputSpec(tokenizer="char", vocab_size=tokenizer.vocab_size, context_length=TEXT_CONTEXT,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    files = {art.WEIGHTS: art.module_weights(model.eval()), art.TOKENIZER: tokenizer.to_json().encode()}
    common = {"input_spec": spec, "training": {"source": "test"}, "metrics": {"train_loss": loss.item()}}
    art.write_artifact(store, kind="gpt", name=TEXT, config=config.to_dict(), files=files, **common)
    prefill, decode = export_gpt_onnx(model)
    art.write_artifact(store, kind="gpt", name=TEXT_ONNX, config=config.to_dict(),
                       files={**files, art.ONNX_PREFILL: prefill, art.ONNX_DECODE: decode}, **common)
    ngram = NGramLM.fit(data, NGramConfig(vocab_size=tokenizer.vocab_size, order=4))
    art.write_artifact(store, kind="ngram", name=TEXT_NGRAM, config=ngram.config.to_dict(),
                       files={**files, art.WEIGHTS: art.module_weights(ngram)},
                       **{**common, "input_spec": spec.model_copy(update={"context_length": None})})


def pytest_collection_modifyitems(config, items):
    """The shutdown test stops the shared server: run it after every other test."""
    items.sort(key=lambda item: item.get_closest_marker("shutdown") is not None)


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
