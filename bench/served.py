"""Served performance: genserve on Ray Serve, measured over real HTTP on loopback.

    .venv/bin/python -m bench.served [--quick]

One Ray Serve instance serves three models trained for the occasion into a temporary store (on the shipped
data; speed does not depend on how well they are trained): a GMM of breast_cancer (log_prob of records), a
character GPT of Shakespeare of the default served size (generate), and a MADE of sklearn's digits (log_prob of
images), GMM and MADE with their ONNX graphs as the pipelines export them. The deployments take their options
from deploy/serve/genserve.yaml (the models carry the names it configures), and each model is deployed twice
from the same artifact: as configured, batching on (max_batch_size 32; 16 decoding slots), and as a copy named
NAME-unbatched whose user_config turns batching off (max_batch_size 1; 1 slot). Both copies stay up, so batching
on and off are measured in turn at each load, side by side, instead of a redeploy per switch (a redeploy restarts
every replica: 20-40 s here), and a change in the shared machine's load touches both alike.

1. throughput and latency under a closed-loop load (N clients, each sending its next request as soon as the
   last one is answered) at 1, 8 and 32 clients, batching on and off;
2. the overhead of serving: one client's latency over HTTP against the same work called in-process;
3. the peak resident memory (VmHWM) of every replica process after the load;
4. the data plane against the model's own speed (bench/dataplane.py): large requests over JSON and binary
   tensors, one record against GET /healthz, a plain FastAPI + uvicorn + ONNX Runtime app as the baseline, and
   served generate against the in-process Engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import dataplane
from bench.common import Goal, Report, load_average, load_note, ratio, table
from genserve.service.metrics import FLUSH_INTERVAL_S

# The names deploy/serve/genserve.yaml configures, so the shipped per-deployment options apply.
RECORDS, TEXT, IMAGES = "breast-cancer", "shakespeare", "digits"
UNBATCHED = "-unbatched"  # the suffix of each model's batching-off copy
CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "serve" / "genserve.yaml"
NEW_TOKENS = 96  # as README's generate examples ask for (100); the model's context is 128 characters
PROMPT = "ROMEO:\n"
IMAGES_PER_REQUEST = 4
TEXT_TRAIN_STEPS = 20  # a few optimiser steps: the weights only need to be a real model's shape
THREADS = "1"  # torch threads of every replica and of the in-process baseline (OMP_NUM_THREADS)
# Logical CPUs for Ray: the shipped options ask for 0.2 (Gateway) + 2 x 1.05 (each model twice). They are Ray's
# bookkeeping only; every process shares the machine's cores.
RAY_CPUS = 4
BATCHING_ON = {RECORDS: {"max_batch_size": 32}, IMAGES: {"max_batch_size": 32}, TEXT: {"slots": 16}}
BATCHING_OFF = {RECORDS: {"max_batch_size": 1}, IMAGES: {"max_batch_size": 1}, TEXT: {"slots": 1}}


@dataclass(frozen=True)
class Plan:
    """How long and how hard to load the server."""

    clients: tuple[int, ...]
    warmup_s: float  # each load's first seconds, not recorded: connections open, batches form
    window_s: float  # then requests started within this window are recorded
    rounds: int  # 1: on, off; 2: on, off, off, on (each configuration's rounds pooled)
    overhead_pairs: int  # HTTP / in-process pairs for the overhead table (generate: a quarter)


QUICK = Plan(clients=(1, 8), warmup_s=0.3, window_s=1.0, rounds=1, overhead_pairs=24)
FULL = Plan(clients=(1, 8, 32), warmup_s=1.0, window_s=4.0, rounds=2, overhead_pairs=120)


@dataclass(frozen=True)
class Endpoint:
    key: str  # "generate"
    title: str
    model: str  # the batching-on deployment; the batching-off one is model + UNBATCHED
    route: str  # "generate", "log_prob"
    body: bytes
    count_tokens: bool = False

    def path(self, batching: bool) -> str:
        return f"/v1/models/{self.model}{'' if batching else UNBATCHED}/{self.route}"


@dataclass
class Load:
    """What one closed-loop load recorded: requests started within the window, however they ended."""

    clients: int
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    errors: int = 0  # non-2xx answers and failed connections
    tokens: int = 0
    seconds: float = 0.0  # from the window's start to the last recorded answer
    batches: float = 0.0  # forward passes the replica ran meanwhile (its genserve_batch_size_requests histogram)
    batched: float = 0.0  # requests in them
    round_p50s: list[float] = field(default_factory=list)  # ms, each pooled round's own median

    def merge(self, other: Load) -> None:
        self.round_p50s += other.round_p50s
        self.latencies += other.latencies
        self.errors += other.errors
        self.tokens += other.tokens
        self.seconds += other.seconds
        self.batches += other.batches
        self.batched += other.batched

    @property
    def mean_batch(self) -> float:
        return self.batched / self.batches if self.batches else float("nan")

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else float("nan")


Results = dict[tuple[str, bool, int], Load]  # (endpoint key, batching, clients) -> pooled load


# ---- the model store ----------------------------------------------------------------------------


def build_store(store: Path) -> dict[str, Path]:
    """Train the three models into `store`, each with its batching-off copy; returns each model's directory."""
    from genserve.training.gmm_pipeline import GMMTrainConfig, train_gmm
    from genserve.training.image_pipeline import ImageTrainConfig, train_image

    # As DEFAULT_MODELS trains breast-cancer, but 2 components and one EM start instead of a BIC search.
    gmm = train_gmm(GMMTrainConfig(dataset="sklearn:breast_cancer", name=RECORDS, covariance_type="full",
                                   components=2, n_init=1), store, progress=False)
    # The served digits model's architecture (default preset) for one epoch on a few hundred images.
    image = train_image(ImageTrainConfig(model="made", dataset="digits", name=IMAGES, preset="default", epochs=1,
                                         max_train_images=300, sample_every=0, grid_size=2, threads=1),
                        store, progress=False)
    paths = {RECORDS: gmm, IMAGES: image, TEXT: write_text_model(store)}
    for name, path in paths.items():
        copy_artifact(path, store, name + UNBATCHED)
    return paths


def copy_artifact(path: Path, store: Path, name: str) -> None:
    """The same artifact under another model name (the manifest is not among the files it checksums)."""
    target = store / name / path.name
    shutil.copytree(path, target)
    manifest = json.loads((target / "manifest.json").read_text())
    (target / "manifest.json").write_text(json.dumps({**manifest, "name": name}))


def write_text_model(store: Path) -> Path:
    """A character GPT of the default served size (default preset: 4 layers, 4 heads, 96 wide, context 128)
    after a few steps on Shakespeare. train_text would also evaluate the whole validation split and
    calibrate (a minute here), which generation speed does not depend on; the text runtime decodes with
    torch (its KV cache is the faster here), so no ONNX graphs are exported."""
    from genserve.artifacts import artifact as art
    from genserve.training.text_data import random_windows
    from genserve.training.text_pipeline import TextTrainConfig, build_module, prepare_data

    cfg = TextTrainConfig(name=TEXT, preset="default").resolved()
    data = prepare_data(cfg)
    vocab = data.tokenizer.vocab_size
    torch.manual_seed(0)
    model = build_module(cfg, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    generator = torch.Generator().manual_seed(0)
    for _ in range(TEXT_TRAIN_STEPS):
        x, y = random_windows(data.train, cfg.batch_size, cfg.context_length, generator)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    spec = art.TextInputSpec(tokenizer="char", vocab_size=vocab, context_length=cfg.context_length,
                             bos_token_id=data.tokenizer.bos_token_id, eos_token_id=data.tokenizer.eos_token_id)
    return art.write_artifact(store, kind="gpt", name=TEXT, config=cfg.model_config(vocab), input_spec=spec,
                              training={"source": "bench/served.py", "steps": TEXT_TRAIN_STEPS},
                              metrics={"train_loss": loss.item()},
                              files={art.WEIGHTS: art.module_weights(model.eval()),
                                     art.TOKENIZER: data.tokenizer.to_json().encode()})


def endpoints() -> list[Endpoint]:
    from sklearn.datasets import load_breast_cancer, load_digits

    record = load_breast_cancer().data[:1].tolist()
    images = load_digits().images[:IMAGES_PER_REQUEST].astype(int).tolist()
    generate = {"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    return [
        Endpoint("generate", f"generate: {TEXT} (char GPT), {NEW_TOKENS} new tokens, greedy, ignore_eos", TEXT,
                 "generate", json.dumps(generate).encode(), count_tokens=True),
        Endpoint("records", f"log_prob of records: {RECORDS} (GMM, ONNX Runtime), 1 record per request", RECORDS,
                 "log_prob", json.dumps({"records": record}).encode()),
        Endpoint("images", f"log_prob of images: {IMAGES} (MADE, ONNX Runtime), {IMAGES_PER_REQUEST} 8x8 digits "
                 "per request", IMAGES, "log_prob", json.dumps({"images": images}).encode()),
    ]


# ---- the server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deployment_options() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(app args, overrides of the application's own deployments): the shipped Serve config's, its per-model
    options (args.deployments) batching on for each model and off for its copy."""
    from genserve.service.cli import read_serve_config

    _, args, overrides = read_serve_config(CONFIG)
    shipped = args.get("deployments", {})
    deployments = {}
    for name in (RECORDS, TEXT, IMAGES):
        for copy, options in ((name, BATCHING_ON[name]), (name + UNBATCHED, BATCHING_OFF[name])):
            deployments[copy] = {**shipped[name], "user_config": {**shipped[name].get("user_config", {}), **options}}
    return {**args, "deployments": deployments}, overrides


# Ray Serve's own defaults for the settings genserve changes (service.cli.SERVE_ENV), for --ray-serve-defaults.
RAY_SERVE_DEFAULTS = {"RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1",
                      "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1", "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}


@contextmanager
def ray_started(ray_serve_defaults: bool = False) -> Iterator[None]:
    """Ray in this process, with Serve's HTTP proxy on a free loopback port; shut down on the way out. Its processes
    run with the Ray Serve settings `genserve serve` uses, or with Ray Serve's defaults for them."""
    import ray

    if ray.is_initialized():
        raise RuntimeError("bench.served starts its own Ray; this process already has one")
    from genserve.service.cli import SERVE_ENV, apply_serve_env

    if ray_serve_defaults:
        os.environ.update(RAY_SERVE_DEFAULTS)
    else:
        for name in RAY_SERVE_DEFAULTS:
            os.environ[name] = SERVE_ENV[name]
    apply_serve_env()
    # Workers inherit the driver's environment: one torch thread per replica, as in the in-process baseline.
    os.environ["OMP_NUM_THREADS"] = THREADS
    # A small object store leaves the shared machine's memory alone (requests here are kilobytes).
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False, namespace="genserve-bench",
             object_store_memory=100 * 1024 * 1024)
    try:
        yield
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


def start_serve(port: int) -> None:
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": port})


def deploy(url: str, store: Path) -> None:
    """Deploy the application (every model twice, batching on and off) and wait until each one is ready."""
    import httpx
    from ray import serve

    from genserve.service.app import AppArgs, build

    args, overrides = deployment_options()
    models = [m for name in (RECORDS, TEXT, IMAGES) for m in (name, name + UNBATCHED)]
    serve.run(build(AppArgs.model_validate({**args, "store": str(store), "models": models}), overrides),
              name="genserve", route_prefix="/")
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/readyz", timeout=5).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("genserve not ready 120 s after serve.run")
        time.sleep(0.2)
    # The Gateway loads its copy of a small records model once the version is READY (service/hosted.py): wait
    # for it, so no load measures the replica path for a while and the Gateway path after.
    deadline = time.monotonic() + 30
    while set(scored_in(url, [RECORDS, RECORDS + UNBATCHED]).values()) != {"gateway"} and time.monotonic() < deadline:
        time.sleep(0.2)


def scored_in(url: str, models: list[str]) -> dict[str, str]:
    """Where each model's requests are scored: "gateway" or "replica" (GET /v1/models/{name})."""
    import httpx

    return {m: httpx.get(f"{url}/v1/models/{m}", timeout=10).json().get("scored_in", "replica") for m in models}


# ---- the load generator -------------------------------------------------------------------------


async def post(session, url: str, body: bytes, count_tokens: bool) -> tuple[bool, int]:
    """One request: (answered 2xx, generated tokens)."""
    import aiohttp

    try:
        async with session.post(url, data=body) as response:
            payload = await response.read()
            ok = 200 <= response.status < 300
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False, 0
    return ok, (json.loads(payload)["usage"]["completion_tokens"] if ok and count_tokens else 0)


def session():
    # aiohttp (a dependency of ray[serve]) costs the shared cores less per request than httpx's async client.
    import aiohttp

    # No connection limit: each client keeps its own keep-alive connection, as separate clients would.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=300),
                                 headers={"Content-Type": "application/json"})


async def closed_loop(url: str, body: bytes, count_tokens: bool, clients: int, plan: Plan) -> Load:
    """`clients` clients, each sending its next request as soon as its last one is answered, for warm-up plus
    window seconds; requests started within the window are recorded (the last ones finish after it)."""
    load = Load(clients)
    async with session() as s:
        begin = time.perf_counter()
        start_at, stop_at = begin + plan.warmup_s, begin + plan.warmup_s + plan.window_s
        last = [start_at]

        async def client() -> None:
            while (began := time.perf_counter()) < stop_at:
                ok, tokens = await post(s, url, body, count_tokens)
                ended = time.perf_counter()
                if began < start_at:
                    continue
                last[0] = max(last[0], ended)
                if ok:
                    load.latencies.append(ended - began)
                    load.tokens += tokens
                else:
                    load.errors += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    load.seconds = last[0] - start_at
    load.round_p50s = [load.ms(50)]
    return load


def batch_histogram(url: str, model: str) -> tuple[float, float]:
    """(forward passes, requests in them) so far of a model's replicas, from the server's /metrics."""
    import httpx

    values = {"count": 0.0, "sum": 0.0}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        for kind in values:  # summed over the model's versions (one here)
            if line.startswith(f'genserve_batch_size_requests_{kind}{{model="{model}",'):
                values[kind] += float(line.rsplit(" ", 1)[1])
    return values["count"], values["sum"]


async def alternating_client(url: str, endpoint: Endpoint, plan: Plan) -> dict[bool, Load]:
    """One client sending its requests to the batching-on and -off deployments in turn (on, off, on, off, ...):
    its requests never overlap, so neither deployment sees a load the other does not, and both see the shared
    machine in the same state, request by request. Each side's req/s is its answered requests over the time
    they took (1 / mean latency, as for any single closed-loop client)."""
    loads = {True: Load(1), False: Load(1)}
    async with session() as s:
        begin = time.perf_counter()
        start_at, stop_at = begin + plan.warmup_s, begin + plan.warmup_s + plan.window_s
        batching = True
        while (began := time.perf_counter()) < stop_at:
            ok, tokens = await post(s, url + endpoint.path(batching), endpoint.body, endpoint.count_tokens)
            ended = time.perf_counter()
            if began >= start_at:
                load = loads[batching]
                if ok:
                    load.latencies.append(ended - began)
                    load.tokens += tokens
                    load.seconds += ended - began
                else:
                    load.errors += 1
            batching = not batching
    for load in loads.values():
        load.round_p50s = [load.ms(50)]
    return loads


def measure_loads(url: str, eps: list[Endpoint], plan: Plan) -> Results:
    """Every endpoint at every client count, batching on and off; for @serve.batch models, with the batches the
    replica ran meanwhile (read from /metrics before and after). Several clients: on and off in turn (on, off,
    then off, on when there are two rounds), each configuration's rounds pooled. One client: its requests
    alternate between the two (alternating_client), for as many windows as there are rounds."""
    results: Results = {}

    def add(key: tuple[str, bool, int], load: Load) -> None:
        if key in results:
            results[key].merge(load)
        else:
            results[key] = load

    for endpoint in eps:
        models = {batching: endpoint.model + ("" if batching else UNBATCHED) for batching in (True, False)}
        for clients in plan.clients:
            if clients == 1:
                for _ in range(plan.rounds):
                    before = {b: batch_histogram(url, m) for b, m in models.items()}
                    loads = asyncio.run(alternating_client(url, endpoint, plan))
                    time.sleep(3 * FLUSH_INTERVAL_S)  # replicas send their metrics every interval: let the last land
                    for batching, load in loads.items():
                        after = batch_histogram(url, models[batching])
                        load.batches = after[0] - before[batching][0]
                        load.batched = after[1] - before[batching][1]
                        add((endpoint.key, batching, 1), load)
                continue
            for batching in [True, False, False, True][: 2 * plan.rounds]:
                before = batch_histogram(url, models[batching])
                load = asyncio.run(closed_loop(url + endpoint.path(batching), endpoint.body, endpoint.count_tokens,
                                               clients, plan))
                time.sleep(3 * FLUSH_INTERVAL_S)
                after = batch_histogram(url, models[batching])
                load.batches, load.batched = after[0] - before[0], after[1] - before[1]
                add((endpoint.key, batching, clients), load)
    return results


# ---- serving overhead: HTTP against in-process ---------------------------------------------------


def in_process_calls(paths: dict[str, Path], eps: list[Endpoint]) -> dict[str, Callable[[], object]]:
    """The work each endpoint's replica does for one request, called in this process: the same runtime call on
    the same artifact (GMM and MADE: ONNX Runtime; GPT: the continuous-batching Engine with the served slots)."""
    from genserve.service.decoding import Engine, GenerationParams
    from genserve.service.image_runtime import load_image_model
    from genserve.service.records_runtime import load_model
    from genserve.service.text_runtime import load_text_model

    bodies = {e.key: json.loads(e.body) for e in eps}
    density = load_model(str(paths[RECORDS]), "auto")
    record = np.asarray(bodies["records"]["records"], dtype=np.float64)
    image_model = load_image_model(paths[IMAGES], "auto")
    images = np.asarray(bodies["images"]["images"], dtype=np.int64)
    text = load_text_model(paths[TEXT], "auto")
    engine = Engine(text.model, text.tokenizer, slots=BATCHING_ON[TEXT]["slots"])
    prompt = [text.tokenizer.bos_token_id, *text.tokenizer.encode(PROMPT)]  # as the Gateway encodes a prompt
    params = GenerationParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)

    def generate() -> None:
        request = engine.submit(prompt, params)
        while not request.finished:
            engine.step()

    return {"generate": generate, "records": lambda: density.runtime.log_prob(record),
            "images": lambda: image_model.runtime.score(images, None)}


def text_engine(path: Path) -> tuple[Callable[[], Any], Callable[[], object]]:
    """(submit one generate request as the load tables send it, run one decoding step) of a fresh Engine on the
    GPT with the served slots: the in-process side of the text data-plane goal."""
    from genserve.service.decoding import Engine, GenerationParams
    from genserve.service.text_runtime import load_text_model

    text = load_text_model(path, "auto")
    engine = Engine(text.model, text.tokenizer, slots=BATCHING_ON[TEXT]["slots"])
    prompt = [text.tokenizer.bos_token_id, *text.tokenizer.encode(PROMPT)]
    params = GenerationParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return (lambda: engine.submit(prompt, params)), engine.step


async def overhead_pairs(url: str, endpoint: Endpoint, call: Callable[[], object], pairs: int
                         ) -> tuple[list[float], list[float]]:
    """One HTTP request, then the same work in-process, `pairs` times in turn (after 3 warm-up pairs), so a
    change in the machine's load touches both alike. Returns (HTTP seconds, in-process seconds)."""
    http, local = [], []
    async with session() as s:
        for i in range(pairs + 3):
            started = time.perf_counter()
            ok, _ = await post(s, url + endpoint.path(True), endpoint.body, endpoint.count_tokens)
            middle = time.perf_counter()
            call()
            ended = time.perf_counter()
            if not ok:
                raise RuntimeError(f"{endpoint.path(True)} failed during the overhead measurement")
            if i >= 3:
                http.append(middle - started)
                local.append(ended - middle)
    return http, local


async def ingress_seconds(url: str, pairs: int) -> float:
    """p50 of GET /healthz: the proxy and the Gateway, no model replica."""
    times = []
    async with session() as s:
        for i in range(pairs + 3):
            started = time.perf_counter()
            async with s.get(f"{url}/healthz") as response:
                await response.read()
            if i >= 3:
                times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_overhead(url: str, paths: dict[str, Path], eps: list[Endpoint], plan: Plan
                     ) -> dict[str, tuple[float, float]]:
    """Per endpoint: (HTTP p50, in-process p50) in seconds, one client, batching on (the shipped config); and
    "healthz": (GET /healthz p50, 0)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(THREADS))  # as the replicas run
    try:
        calls = in_process_calls(paths, eps)
        out = {}
        for endpoint in eps:
            pairs = plan.overhead_pairs // 4 if endpoint.count_tokens else plan.overhead_pairs
            http, local = asyncio.run(overhead_pairs(url, endpoint, calls[endpoint.key], pairs))
            out[endpoint.key] = (statistics.median(http), statistics.median(local))
        out["healthz"] = (asyncio.run(ingress_seconds(url, plan.overhead_pairs)), 0.0)
        return out
    finally:
        torch.set_num_threads(previous)


# ---- peak memory of the replicas -----------------------------------------------------------------


def descendants(root: int) -> list[int]:
    """Process ids under `root` (Ray's GCS, raylet and workers are children of the driver that started them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        for pid in children.get(stack.pop(), []):
            found.append(pid)
            stack.append(pid)
    return found


def status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def serve_processes() -> list[tuple[str, int]]:
    """(role, pid) of each Serve process: one replica per deployment, the HTTP proxy, the controller and the
    metrics actor. Ray
    titles an actor's process `ray::ServeReplica:APP:DEPLOYMENT` (with `.method` while it runs one); the role
    is the deployment: a model's name, Gateway or ModelRepository."""
    found = []
    for pid in descendants(os.getpid()):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if title.startswith("ray::ServeReplica:"):
            # APP:DEPLOYMENT; a model's own application is genserve--NAME--vN with one deployment named NAME.
            deployment = title.split(":", 3)[3].split(".")[0].split()[0].split(":")[-1]
            found.append((deployment + " replica", pid))
        elif title.startswith(("ray::ProxyActor", "ray::ServeController", "ray::MetricsAggregator")):
            found.append((title[5:].split(".")[0].split()[0], pid))
    return sorted(found)


# ---- the report ---------------------------------------------------------------------------------


def load_table(endpoint: Endpoint, plan: Plan, results: Results) -> list[str]:
    header = ["clients", "batching", "requests", "errors", "req/s"]
    header += ["tokens/s"] if endpoint.count_tokens else []
    header += ["p50 ms", "p95 ms", "p99 ms"]
    header += [] if endpoint.count_tokens else ["mean batch"]
    header += ["req/s on/off"]
    rows = []
    for clients in plan.clients:
        on, off = results[(endpoint.key, True, clients)], results[(endpoint.key, False, clients)]
        for batching, load in (("on", on), ("off", off)):
            row: list[object] = [clients, batching, len(load.latencies), load.errors, f"{load.requests_per_s:.1f}"]
            row += [f"{load.tokens_per_s:.0f}"] if endpoint.count_tokens else []
            row += [f"{load.ms(50):.1f}", f"{load.ms(95):.1f}", f"{load.ms(99):.1f}"]
            row += [] if endpoint.count_tokens else [
                f"{load.mean_batch:.1f}" if load.batches else "none (scored in the Gateway)"]
            row += [ratio(on.requests_per_s, off.requests_per_s) if batching == "on" else ""]
            rows.append(row)
    return table(header, rows)


def goals(eps: list[Endpoint], plan: Plan, results: Results, overhead: dict[str, tuple[float, float]],
          hosted: set[str]) -> list[Goal]:
    """`hosted`: the endpoints whose model (both copies) is scored in the Gateway."""
    top = plan.clients[-1]
    out = []
    for e in eps:
        on, off = results[(e.key, True, top)], results[(e.key, False, top)]
        gain = on.requests_per_s / off.requests_per_s if off.requests_per_s > 0 else float("nan")
        http, local = overhead[e.key]
        note = "" if gain >= 3 else (
            "both copies of the model are scored in the Gateway itself (score_in_gateway_below_ms), each request "
            "as it arrives, so batching on and off are the same path and max_batch_size has no pass to share; "
            f"the model's own work is {local * 1000:.2f} ms of the {http * 1000:.2f} ms a request takes over HTTP "
            f"at 1 client (GET /healthz alone: {overhead['healthz'][0] * 1000:.2f} ms), so no batching of the "
            f"model could raise throughput by more than {http / max(http - local, 1e-9):.2f}x"
        ) if e.key in hosted else (
            f"the model's own work is {local * 1000:.2f} ms of the {http * 1000:.2f} ms one request takes over "
            f"HTTP at 1 client (GET /healthz alone: {overhead['healthz'][0] * 1000:.2f} ms); the rest (proxy, "
            "Gateway, handle call, JSON) is paid per request whether or not the model batches, so batching has "
            "little to save: the serving path, not the model, bounds the throughput"
            + ("" if e.count_tokens else f", and requests reach the replica too thinly spread to share a pass (mean "
               f"batch {on.mean_batch:.1f})") if local < 0.5 * http else
            "the model's work dominates a request, yet batching did not multiply throughput; see the table")
        if gain < 3 and top < 32:
            note += f"; only {top} clients in quick mode, so at most {top} requests can share a batch"
        out.append(Goal(f"served {e.key}: batching at {top} clients", ">= 3x the req/s of unbatched",
                        f"{gain:.2f}x ({on.requests_per_s:.1f} vs {off.requests_per_s:.1f} req/s)", gain >= 3,
                        note))
        one_on, one_off = results[(e.key, True, 1)], results[(e.key, False, 1)]
        p_on, p_off = one_on.ms(50), one_off.ms(50)
        met = p_on <= max(p_off * 1.1, p_off + 1.0)
        spread = (f"each window's p50: on {' / '.join(f'{p:.1f}' for p in one_on.round_p50s)} ms, off "
                  f"{' / '.join(f'{p:.1f}' for p in one_off.round_p50s)} ms")
        cause = ("no batching delay is configured (batch_wait_timeout_s 0; an empty decoding slot costs nothing), "
                 "so the two differ only by what their replicas' processes meet on the shared cores; " + spread)
        out.append(Goal(f"served {e.key}: batching p50 at 1 client", "within 10% or 1 ms of unbatched",
                        f"{p_on:.1f} vs {p_off:.1f} ms ({p_on - p_off:+.1f} ms)", met,
                        "" if met else cause))
    return out


def overhead_table(eps: list[Endpoint], overhead: dict[str, tuple[float, float]]) -> list[str]:
    rows = []
    for e in eps:
        http, local = overhead[e.key]
        rows.append([e.key, f"{http * 1000:.2f}", f"{local * 1000:.2f}", f"{(http - local) * 1000:.2f}",
                     ratio(http, local)])
    rows.append(["GET /healthz (no model)", f"{overhead['healthz'][0] * 1000:.2f}", "", "", ""])
    return table(["endpoint", "HTTP p50 ms", "in-process p50 ms", "difference ms", "HTTP / in-process"], rows)


def memory_table(processes: list[tuple[str, int]]) -> list[str]:
    rows = []
    for role, pid in processes:
        peak, now = status_kib(pid, "VmHWM"), status_kib(pid, "VmRSS")
        if peak is not None:
            rows.append([role, f"{peak / 1024:.0f}", f"{(now or 0) / 1024:.0f}"])
    return table(["process", "peak RSS (VmHWM) MiB", "RSS now MiB"], rows)


def markdown(eps: list[Endpoint], plan: Plan, results: Results, overhead: dict[str, tuple[float, float]],
             memory: list[str], timings: str, note: str) -> list[str]:
    order = "on, off, off, on" if plan.rounds == 2 else "on, off"
    lines = ["## Served: throughput and latency over HTTP", "",
             f"genserve on one Ray Serve instance on loopback (OMP_NUM_THREADS={THREADS} in every replica), "
             "deployments as in deploy/serve/genserve.yaml, each model deployed twice from one artifact: batching on "
             "(max_batch_size 32 for the GMM and the MADE, 16 decoding slots for the GPT) and off (max_batch_size 1, "
             "1 slot). A closed-loop load generator (aiohttp, in the benchmark's process, on the same cores) runs N "
             "clients that each send their next request as soon as the last one is answered: "
             f"{plan.warmup_s:g} s of warm-up, then requests started in the next {plan.window_s:g} s are recorded; "
             f"at each client count above 1 batching {order} in turn, each configuration's rounds pooled, and req/s "
             "counts answered requests over the time from the window's start to the last answer. A single client "
             "alternates its requests between the two (on, off, on, ...), so both see the shared machine in the "
             "same state, and each side's req/s is its requests over the time they took. Errors are non-2xx "
             "answers and failed connections; mean batch is the requests per forward pass of the model's "
             f"replica meanwhile, from its genserve_batch_size_requests histogram. {timings}", ""]
    for e in eps:
        lines += [f"### {e.title}", "", *load_table(e, plan, results), ""]
    lines += ["## Served: overhead of serving", "",
              "One client, batching on (the shipped config): a request over HTTP (proxy, Gateway, handle call to "
              "the replica and back; for a model scored in the Gateway, proxy and Gateway only) and then the same "
              "work called in this process (the replica's runtime call on "
              "the same artifact; generate: the decoding Engine with 16 slots), in turn, "
              f"{plan.overhead_pairs} pairs ({plan.overhead_pairs // 4} for generate); medians. GET /healthz "
              "goes through the proxy and the Gateway only: what every request pays before any model.", "",
              *overhead_table(eps, overhead), "",
              "## Served: peak memory of the replicas", "",
              "VmHWM (the peak resident set) of each Serve process after all the loads above, read from "
              "/proc/PID/status: one replica per deployment (NAME-unbatched: the batching-off copy), the HTTP "
              "proxy, the controller and genserve's metrics actor.", "", *memory, "", note, ""]
    return lines


def run(quick: bool = False, ray_serve_defaults: bool = False) -> Report:
    plan = QUICK if quick else FULL
    load_before = load_average()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="genserve-bench-") as tmp, ThreadPoolExecutor(1) as pool:
        store = Path(tmp) / "store"
        # Train while Ray and Serve start: both mostly wait (Ray on its new processes), and quick mode has 90 s.
        building = pool.submit(build_store, store)
        with ray_started(ray_serve_defaults):
            port = free_port()
            start_serve(port)
            paths = building.result()
            url = f"http://127.0.0.1:{port}"
            deploy(url, store)
            setup_s = time.perf_counter() - started
            eps = endpoints()
            hosted = {e.key for e in eps if set(scored_in(url, [e.model, e.model + UNBATCHED]).values()) == {"gateway"}}
            overhead = measure_overhead(url, paths, eps, plan)
            results = measure_loads(url, eps, plan)
            memory = memory_table(serve_processes())
            plane = measure_data_plane(url, paths, plan, results)
            timings = (f"Store trained and Ray and Serve started in {setup_s:.0f} s, then measured in "
                       f"{time.perf_counter() - started - setup_s:.0f} s.")
            if ray_serve_defaults:
                timings += (" **Run with Ray Serve's default settings** (--ray-serve-defaults: "
                            + ", ".join(f"{k}={v}" for k, v in RAY_SERVE_DEFAULTS.items()) + "), not genserve's.")
            if hosted:
                timings += (" Scored in the Gateway itself (score_in_gateway_below_ms, both copies): "
                            + ", ".join(e.model for e in eps if e.key in hosted) + ".")
            lines = markdown(eps, plan, results, overhead, memory, timings, load_note(load_before, load_average()))
            lines[-2:-2] = dataplane.markdown(plane)  # before the load note
    return Report(markdown=lines, goals=goals(eps, plan, results, overhead, hosted) + dataplane.goals(plane))


def measure_data_plane(url: str, paths: dict[str, Path], plan: Plan, results: Results) -> dataplane.DataPlane:
    """bench/dataplane.py's measurements on this server, with one torch thread as the replicas run."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(THREADS))
    try:
        top = plan.clients[-1]
        generate = next(e for e in endpoints() if e.key == "generate")

        def serve_text(seconds: float) -> float:
            """Tokens/s of `top` closed-loop generate clients over `seconds` (after a second of warm-up)."""
            window = Plan(clients=(top,), warmup_s=1.0, window_s=seconds, rounds=1, overhead_pairs=0)
            return asyncio.run(closed_loop(url + generate.path(True), generate.body, True, top, window)).tokens_per_s

        return dataplane.measure(url, {"records": paths[RECORDS], "images": paths[IMAGES]},
                                 {"records": RECORDS, "images": IMAGES}, plan is QUICK, serve_text, top,
                                 lambda: text_engine(paths[TEXT]), NEW_TOKENS, paths[RECORDS] / "model.onnx",
                                 free_port())
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, 1 and 8 clients only (< 90 s)")
    parser.add_argument("--ray-serve-defaults", action="store_true",
                        help="run Ray with Ray Serve's defaults for the settings genserve serve changes (SERVE_ENV)")
    args = parser.parse_args(argv)
    report = run(quick=args.quick, ray_serve_defaults=args.ray_serve_defaults)
    print("\n".join(report.markdown))
    for goal in report.goals:
        print(f"- {'met' if goal.met else 'MISSED'}: {goal.name}: {goal.measured} (target {goal.target})"
              + (f"; {goal.note}" if goal.note else ""))
    return report


if __name__ == "__main__":
    main()
