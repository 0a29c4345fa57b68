"""One real genserve server per test session: `genserve serve` in a subprocess (Ray + Serve),
over HTTP on loopback, with two small GMMs (one of them on two replicas), a small character
transformer and two small image models (FVSBNs on sklearn's digits) trained into a temporary store.
The test marked `shutdown` runs last: it stops the server with SIGTERM and checks it went quietly."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml

from genserve.artifacts import artifact as art
from genserve.artifacts.calibration import fit_anomaly_calibration
from genserve.artifacts.class_gaussians import class_gaussian_files, fit_class_gaussians
from genserve.artifacts.neighbours import fit_neighbours, neighbour_files
from genserve.artifacts.reference import fit_bigram, fit_local_pixels, reference_files
from genserve.artifacts.scores import class_evidence_scores, compute_scores, png_bits
from genserve.artifacts.tokenizer import train_char_tokenizer
from genserve.models.fvsbn import FVSBN, FVSBNConfig
from genserve.models.gpt import GPT, GPTConfig
from genserve.models.ngram import NGramConfig, NGramLM
from genserve.training.gan_pipeline import GANTrainConfig, train_gan
from genserve.training.gmm_pipeline import GMMTrainConfig, train_gmm
from genserve.training.image_flow_pipeline import ImageFlowTrainConfig, train_image_flow
from genserve.training.onnx_export import export_gpt_onnx, export_image_onnx
from genserve.training.records_pipeline import RecordsTrainConfig, train_records
from genserve.training.text_pipeline import calibrate_text, fit_text_neighbours
from genserve.training.vae_pipeline import VAETrainConfig, train_vae

REPLICATED = "bc"  # breast_cancer, full covariances, ONNX Runtime, 2 replicas
SINGLE = "wine"  # wine, diagonal covariances, torch, 1 replica
TEXT = "bard"  # a character GPT fitted to TEXT_CORPUS for a moment, torch, 1 replica
TEXT_CORPUS = "to be or not to be, that is the question.\nwhether tis nobler in the mind to suffer\n" * 4
TEXT_ONNX = "bard-onnx"  # the same weights with prefill/decode graphs, served by ONNX Runtime; not calibrated
TEXT_NGRAM = "bard-ngram"  # a 4-gram counted on TEXT_CORPUS
TEXT_CONTEXT = 64
TEXT_SLOTS = 8
IMAGE_COND = "digits-cond"  # class-conditional FVSBN on sklearn digits (8x8, 17 levels), ONNX Runtime
IMAGE_BIN = "tiny-bin"  # unconditional binary FVSBN on thresholded 6x6 digit crops, torch
FLOW = "wine-flow"  # a small RealNVP on wine, runtime auto (torch or ONNX Runtime, timed at load)
VAE = "digits-vae"  # a tiny convolutional VAE on the 8x8 digits: density `bound`
GAN = "digits-gan"  # a tiny class-conditional GAN on the 8x8 digits: density `none`, sampling only
IMAGE_FLOW = "digits-flow"  # a tiny RealNVP on the dequantised 8x8 digits: density `bound`
DIGITS_TRAIN = 1500  # digits 0..1499 train the image models; the rest are held out (calibration, tests)
MAX_IMAGES = 64  # limits.max_images_per_request of the test server
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


def model_deployments() -> dict[str, dict]:
    """Each test model's Ray Serve deployment options (args.deployments)."""
    return {
        # Scored by its two replicas (batching and per-replica metrics are tested on it); wine and the flow are
        # small enough to be scored in the Gateway (service/hosted.py).
        REPLICATED: {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0},
                     "user_config": {"runtime": "onnx", "max_batch_size": 16, "batch_wait_timeout_s": 0.05,
                                     "score_in_gateway_below_ms": 0}},
        SINGLE: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0},
                 "user_config": {"runtime": "torch", "max_batch_size": 8, "batch_wait_timeout_s": 0.01}},
        TEXT: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0},
               "user_config": {"runtime": "torch", "slots": TEXT_SLOTS, "max_waiting": 64}},
        TEXT_ONNX: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}, "user_config": {"runtime": "onnx",
                                                                                             "slots": 4}},
        TEXT_NGRAM: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
        IMAGE_COND: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0},
                     "user_config": {"runtime": "onnx", "max_batch_size": 16, "batch_wait_timeout_s": 0.01}},
        IMAGE_BIN: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}, "user_config": {"runtime": "torch"}},
        FLOW: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}, "user_config": {"runtime": "auto"}},
        VAE: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
        GAN: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
        IMAGE_FLOW: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
    }


CPU0 = {"ray_actor_options": {"num_cpus": 0}}  # a test's replicas reserve no CPU: many share 2 cores


def write_serve_config(path: Path, port: int, args: dict, deployments: list[dict] | None = None) -> None:
    """A Serve config file with the one genserve application on loopback `port`: `args` are its build args,
    `deployments` its deployment options (by default the Gateway's, reserving no CPU)."""
    path.write_text(yaml.safe_dump({
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "genserve", "route_prefix": "/", "import_path": "genserve.service.app:build_app",
            "args": args, "deployments": deployments or [{"name": "Gateway", **CPU0}],
        }],
    }))


def write_config(path: Path, port: int) -> None:
    write_serve_config(path, port, {
        "limits": {"max_records_per_request": 500, "max_samples_per_request": 1000, "max_body_bytes": 1_000_000,
                   "max_new_tokens": 40, "max_num_beams": 4, "max_n": 4, "max_texts_per_request": 8,
                   "max_images_per_request": MAX_IMAGES},
        "deployments": model_deployments()})


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    root = tmp_path_factory.mktemp("genserve")
    store = root / "store"
    train_gmm(GMMTrainConfig(dataset="sklearn:breast_cancer", name=REPLICATED, components=2, n_init=1),
              store, progress=False)
    train_gmm(GMMTrainConfig(dataset="sklearn:wine", name=SINGLE, components=2, covariance_type="diag",
                             n_init=1, export_onnx=False), store, progress=False)
    train_records(RecordsTrainConfig(model="realnvp", dataset="sklearn:wine", name=FLOW, epochs=20,
                                     architecture={"n_layers": 4, "hidden": 32}), store, progress=False)
    # One thread each: small convolutions on a busy 2-core machine run many times slower on two.
    train_vae(VAETrainConfig(dataset="digits", name=VAE, preset="tiny", epochs=3, max_train_images=600, threads=1),
              store, progress=False)
    train_gan(GANTrainConfig(dataset="digits", name=GAN, conditional=True, preset="tiny", sample_every=0,
                             max_train_images=600, threads=1), store, progress=False)
    train_image_flow(ImageFlowTrainConfig(dataset="digits", name=IMAGE_FLOW, preset="tiny", max_train_images=600,
                                          threads=1), store, progress=False)
    write_text_models(store)
    write_image_models(store)
    port = free_port()
    config = root / "serve.yaml"
    write_config(config, port)
    srv = start_server(config, store, port, root / "serve.log")
    yield srv
    stop(srv)


def start_server(config: Path, store: Path, port: int, log: Path, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> Server:
    """`genserve serve` with `config` on `port` in a subprocess, once /readyz answers 200."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "genserve.service.cli", "serve", "--config", str(config), "--store", str(store),
             "--no-train-defaults", *extra_args],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )
    srv = Server(url=f"http://127.0.0.1:{port}", store=store, process=process, log=log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"genserve serve exited with {process.returncode}:\n{srv.log_tail()}")
        try:
            if httpx.get(f"{srv.url}/readyz", timeout=2).status_code == 200:
                return srv
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop(srv)
            pytest.fail(f"genserve serve not ready after {STARTUP_TIMEOUT_S}s:\n{srv.log_tail()}")
        time.sleep(0.5)


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
    reference = fit_bigram(data, tokenizer.vocab_size)

    def anomaly_files(module, context):  # calibrated on the corpus's lines and on lines of its words in other
        # orders, as texts and as lines (text_pipeline calibrates on held-out paragraphs and lines): varied enough
        # for every score type to rank them its own way, so the GPT's ensemble has members; its knn index holds the
        # corpus's lines
        words = TEXT_CORPUS.split()
        rng = random.Random(0)
        shuffled = [" ".join(rng.sample(words, rng.randint(3, 8))) for _ in range(40)]
        lines = "\n\n".join([*TEXT_CORPUS.splitlines(), *shuffled])
        neighbours = fit_text_neighbours(module, tokenizer, {"corpus": TEXT_CORPUS}, context)
        calibration, _ = calibrate_text(module, reference, tokenizer, {"corpus": lines}, context, neighbours)
        return {art.CALIBRATION: json.dumps(calibration.to_dict()).encode(), **reference_files(reference),
                **(neighbour_files(neighbours) if neighbours is not None else {})}

    art.write_artifact(store, kind="gpt", name=TEXT, config=config.to_dict(),
                       files={**files, **anomaly_files(model, TEXT_CONTEXT)}, **common)
    prefill, decode = export_gpt_onnx(model)
    art.write_artifact(store, kind="gpt", name=TEXT_ONNX, config=config.to_dict(),
                       files={**files, art.ONNX_PREFILL: prefill, art.ONNX_DECODE: decode}, **common)
    ngram = NGramLM.fit(data, NGramConfig(vocab_size=tokenizer.vocab_size, order=4))
    art.write_artifact(store, kind="ngram", name=TEXT_NGRAM, config=ngram.config.to_dict(),
                       files={**files, art.WEIGHTS: art.module_weights(ngram), **anomaly_files(ngram, None)},
                       **{**common, "input_spec": spec.model_copy(update={"context_length": None})})


def digits(binary: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as int64 images (1797, 8, 8) of levels 0..16 and their labels; binary: 6x6 centre
    crops thresholded at 5 (levels 0..1)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = data.images.astype(np.int64)
    if binary:
        images = (images[:, 1:7, 1:7] > 4).astype(np.int64)
    return images, data.target.astype(np.int64)


def fit_fvsbn(images: np.ndarray, labels: np.ndarray | None, levels: int, steps: int = 200, batch: int = 200,
              seed: int = 0) -> FVSBN:
    """An FVSBN (class-conditional when labels are given) fitted by minibatch Adam for a moment."""
    torch.manual_seed(seed)
    x = torch.as_tensor(images)
    y = None if labels is None else torch.as_tensor(labels)
    n_classes = 0 if labels is None else int(labels.max()) + 1
    model = FVSBN(FVSBNConfig(height=x.shape[1], width=x.shape[2], levels=levels, n_classes=n_classes))
    if y is not None:
        model.set_class_prior(y)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, len(x), (batch,), generator=g)
        loss = -model.log_prob(x[rows], None if y is None else y[rows]).mean() / model.n_pixels
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def write_image_artifact(store: Path, name: str, model: FVSBN, train: np.ndarray, heldout: np.ndarray, onnx: bool,
                         class_names: list[str] | None = None, train_labels: np.ndarray | None = None) -> Path:
    """An image artifact as training/image_pipeline.py writes one: weights, optionally model.onnx, the
    reference model, the knn index and the class Gaussians fitted on `train`, and every score type calibrated on
    held-out images (the marginal)."""
    levels = model.config.levels
    reference = fit_local_pixels(train, levels)
    with torch.no_grad():
        log_prob = model.log_prob(torch.as_tensor(heldout)).double().numpy()
        ref = reference.log_prob(torch.as_tensor(heldout)).numpy()
        class_scores = None if not model.n_classes else class_evidence_scores(
            model.class_log_probs(torch.as_tensor(heldout)).double().numpy(), model.class_log_prior.double().numpy())
    neighbours = fit_neighbours(train, "pixels", levels=levels)
    gaussians = fit_class_gaussians(train, train_labels, levels)
    calibration = fit_anomaly_calibration("image", compute_scores(
        "image", log_prob, model.n_pixels, reference_log_prob=ref, complexity_bits=png_bits(heldout, levels),
        knn_distance=neighbours.distance(heldout), mahalanobis=gaussians.distance(heldout),
        class_scores=class_scores))
    scores = -log_prob
    files = {art.WEIGHTS: art.module_weights(model), art.CALIBRATION: json.dumps(calibration.to_dict()).encode(),
             **reference_files(reference), **neighbour_files(neighbours), **class_gaussian_files(gaussians)}
    if onnx:
        files[art.ONNX] = export_image_onnx(model)
    c = model.config
    spec = art.ImageInputSpec(height=c.height, width=c.width, levels=c.levels, n_classes=c.n_classes,
                              class_names=class_names)
    return art.write_artifact(store, kind="fvsbn", name=name, config=dataclasses.asdict(c), input_spec=spec,
                              training={"source": "test", "dataset": "sklearn:digits"},
                              metrics={"heldout_nll_nats": float(scores.mean())}, files=files)


def write_image_models(store: Path) -> None:
    """A class-conditional FVSBN of the digits with its ONNX graph, and an unconditional binary one (torch)."""
    torch.set_num_threads(1)
    images, labels = digits()
    model = fit_fvsbn(images[:DIGITS_TRAIN], labels[:DIGITS_TRAIN], levels=17)
    write_image_artifact(store, IMAGE_COND, model, images[:DIGITS_TRAIN], images[DIGITS_TRAIN:], onnx=True,
                         class_names=[str(d) for d in range(10)], train_labels=labels[:DIGITS_TRAIN])
    binary, _ = digits(binary=True)
    write_image_artifact(store, IMAGE_BIN, fit_fvsbn(binary[:DIGITS_TRAIN], None, levels=2), binary[:DIGITS_TRAIN],
                         binary[DIGITS_TRAIN:], onnx=False)


# ---- metrics ---------------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """Value of one sample in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


def wait_for_metric(client, name: str, labels: dict[str, str], target: float) -> str:
    """Metrics arrive asynchronously from every replica; poll briefly until they have."""
    deadline = time.monotonic() + 10
    while True:
        text = client.metrics()
        if metric(text, name, **labels) >= target or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


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
