"""The data plane against the model's own speed, measured by bench/served.py on its server (same run, same
models), as ratios:

1. large requests: records/s at 10,000 records per request and images/s at 256 per request, over /v1 JSON and
   over /v2 with binary tensors (Triton's binary_tensor_data extension, inputs and outputs), against the same
   runtime called in this process on the same batch;
2. small requests: one record's p50 against GET /healthz on the same server;
3. the baseline a user would otherwise write: FastAPI and uvicorn around one ONNX Runtime session on the same
   artifact (bench/baseline_app.py), in one process, measured the same ways;
4. text: served generate tokens/s at the most clients against the decoding Engine in this process with the
   same slots and the same number of concurrent requests, in turns.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from bench.common import Goal, ratio, table

LARGE_RECORDS = 10_000  # limits.max_records_per_request
LARGE_IMAGES = 256  # limits.max_images_per_request
TEXT_TURNS = 3  # served / in-process turns of the text comparison
LARGE_CLIENTS = 2  # one per core: the Gateway parses one request while the replica scores another
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class Body:
    """One request: where it goes, its bytes and headers, and the items it holds."""

    path: str
    data: bytes
    headers: dict[str, str]
    items: int


def json_body(path: str, payload: dict, items: int) -> Body:
    return Body(path, json.dumps(payload).encode(), {"Content-Type": "application/json"}, items)


def binary_body(path: str, name: str, values: np.ndarray, datatype: str, output: str) -> Body:
    """A v2 infer request with `values` as binary tensor data, asking for `output` as binary data too."""
    raw = np.ascontiguousarray(values).tobytes()
    header = json.dumps({
        "inputs": [{"name": name, "datatype": datatype, "shape": list(values.shape),
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": output, "parameters": {"binary_data": True}}],
    }).encode()
    return Body(path, header + raw, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))},
                len(values))


def large_inputs() -> tuple[np.ndarray, np.ndarray]:
    """10,000 breast_cancer records (its 569, repeated) and 256 digits (8x8, levels 0..16)."""
    from sklearn.datasets import load_breast_cancer, load_digits

    records = np.resize(load_breast_cancer().data, (LARGE_RECORDS, 30))
    images = np.resize(load_digits().images.astype(np.int64), (LARGE_IMAGES, 8, 8))
    return records, images


def large_bodies(records_model: str, images_model: str) -> dict[tuple[str, str], Body]:
    records, images = large_inputs()
    return {
        ("records", "JSON"): json_body(f"/v1/models/{records_model}/log_prob", {"records": records.tolist()},
                                       LARGE_RECORDS),
        ("records", "binary"): binary_body(f"/v2/models/{records_model}/infer", "records", records, "FP64",
                                           "log_prob"),
        ("images", "JSON"): json_body(f"/v1/models/{images_model}/log_prob", {"images": images.tolist()},
                                      LARGE_IMAGES),
        ("images", "binary"): binary_body(f"/v2/models/{images_model}/infer", "images", images.astype(np.uint8),
                                          "UINT8", "log_prob"),
    }


# ---- load ---------------------------------------------------------------------------------------------------


async def closed_loop(url: str, body: Body, clients: int, warmup_s: float, window_s: float) -> tuple[float, int]:
    """`clients` clients sending `body` back to back: (items answered per second in the window, failures)."""
    import aiohttp

    answered, failed = [0], [0]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as s:
        start_at = time.perf_counter() + warmup_s
        stop_at = start_at + window_s
        last = [start_at]

        async def client() -> None:
            while (began := time.perf_counter()) < stop_at:
                async with s.post(url + body.path, data=body.data, headers=body.headers) as response:
                    await response.read()
                    ok = response.status == 200
                if began >= start_at:
                    last[0] = max(last[0], time.perf_counter())
                    answered[0] += body.items if ok else 0
                    failed[0] += not ok

        await asyncio.gather(*(client() for _ in range(clients)))
    return answered[0] / (last[0] - start_at), failed[0]


async def one_by_one(url: str, requests: list[Body | str], pairs: int) -> list[float]:
    """p50 seconds of each request (a Body to POST, or a path to GET), sent in turn by one client."""
    import aiohttp

    times: list[list[float]] = [[] for _ in requests]
    async with aiohttp.ClientSession() as s:
        for i in range(pairs + 3):
            for j, request in enumerate(requests):
                started = time.perf_counter()
                if isinstance(request, str):
                    call = s.get(url + request)
                else:
                    call = s.post(url + request.path, data=request.data, headers=request.headers)
                async with call as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{request if isinstance(request, str) else request.path}: "
                                           f"{response.status} during the data-plane measurement")
                if i >= 3:
                    times[j].append(time.perf_counter() - started)
    return [statistics.median(t) for t in times]


def rate_in_process(call: Callable[[], object], items: int, seconds: float) -> float:
    """Items per second of `call` (which handles `items`), median over repeats for about `seconds`."""
    call()
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return items / statistics.median(times)


# ---- the baseline app -------------------------------------------------------------------------------------


@contextmanager
def baseline_server(onnx: Path, port: int) -> Iterator[str]:
    """bench/baseline_app.py under uvicorn (one process, one ONNX Runtime thread) on `port`, until the block ends."""
    import httpx

    env = {**os.environ, "BASELINE_ONNX": str(onnx), "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.baseline_app:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", "--no-access-log"], cwd=root, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the baseline app (uvicorn bench.baseline_app:app) did not start")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


# ---- the measurement ----------------------------------------------------------------------------------------


@dataclass
class DataPlane:
    served: dict[tuple[str, str], float]  # (records|images, JSON|binary) -> items/s over HTTP
    in_process: dict[str, float]  # records|images -> items/s of the runtime call on the same batch
    baseline_large: float  # records/s of the baseline app at 10,000 records per request (JSON)
    single: float  # p50 s of one record over /v1 JSON
    healthz: float  # p50 s of GET /healthz
    baseline_single: float
    baseline_healthz: float
    failures: int
    text_served: float  # tokens/s of generate at the most clients (median of the turns)
    text_in_process: float  # tokens/s of the Engine with as many concurrent requests
    text_clients: int
    records_hosted: bool = False  # the records model is scored in the Gateway (service/hosted.py)
    json_parse_rate: float = 0.0  # records/s of parsing the large JSON body alone (orjson, as the routes do)


def text_in_process(engine_factory: Callable[[], tuple[Callable[[], object], Callable[[], bool]]],
                    clients: int, new_tokens: int, seconds: float) -> float:
    """Tokens/s of the Engine kept at `clients` concurrent requests (each finished one replaced at once, as
    closed-loop clients do): engine_factory() gives (submit a request, step; True while any is unfinished)."""
    submit, step = engine_factory()
    running = [submit() for _ in range(clients)]
    done_tokens, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        for i, request in enumerate(running):
            if request.finished:
                done_tokens += new_tokens
                running[i] = submit()
    return done_tokens / (time.perf_counter() - started)


def measure(url: str, paths: dict[str, Path], names: dict[str, str], quick: bool,
            serve_text: Callable[[float], float], text_clients: int, engine_factory, new_tokens: int,
            records_onnx: Path, port: int) -> DataPlane:
    from genserve.service.image_runtime import load_image_model
    from genserve.service.records_runtime import load_model

    window = 1.5 if quick else 5.0
    bodies = large_bodies(names["records"], names["images"])
    served, failures = {}, 0
    for key, body in bodies.items():
        rate, failed = asyncio.run(closed_loop(url, body, LARGE_CLIENTS, 0.5, window))
        served[key], failures = rate, failures + failed
    records, images = large_inputs()
    records_json = bodies[("records", "JSON")].data
    json_parse_rate = rate_in_process(lambda: orjson.loads(records_json), LARGE_RECORDS, window / 2)
    density = load_model(str(paths["records"]), "auto")
    image_model = load_image_model(paths["images"], "auto")
    in_process = {"records": rate_in_process(lambda: density.runtime.log_prob(records), LARGE_RECORDS, window / 2),
                  "images": rate_in_process(lambda: image_model.runtime.score(images, None), LARGE_IMAGES,
                                            window / 2)}
    one = json_body(f"/v1/models/{names['records']}/log_prob", {"records": records[:1].tolist()}, 1)
    pairs = 40 if quick else 200
    single, healthz = asyncio.run(one_by_one(url, [one, "/healthz"], pairs))
    with baseline_server(records_onnx, port) as base:
        base_one = json_body("/log_prob", {"records": records[:1].tolist()}, 1)
        baseline_single, baseline_healthz = asyncio.run(one_by_one(base, [base_one, "/healthz"], pairs))
        base_large = json_body("/log_prob", {"records": records.tolist()}, LARGE_RECORDS)
        baseline_large, failed = asyncio.run(closed_loop(base, base_large, LARGE_CLIENTS, 0.5, window))
        failures += failed
    # Served and in process in turns (served, in process, ...), so a busy neighbour slows both alike; medians.
    text_served, text = [], []
    for _ in range(1 if quick else TEXT_TURNS):
        text_served.append(serve_text(window))
        text.append(text_in_process(engine_factory, text_clients, new_tokens, window))
    with urllib.request.urlopen(f"{url}/v1/models/{names['records']}", timeout=10) as info:
        hosted = json.load(info).get("scored_in") == "gateway"
    return DataPlane(served, in_process, baseline_large, single, healthz, baseline_single, baseline_healthz,
                     failures, statistics.median(text_served), statistics.median(text), text_clients, hosted,
                     json_parse_rate)


# ---- the report -------------------------------------------------------------------------------------------


TARGETS = {"binary": 0.50, "JSON": 0.25}


def goals(d: DataPlane) -> list[Goal]:
    out = []
    baseline_share = d.baseline_large / d.in_process["records"]
    for kind, per in (("records", LARGE_RECORDS), ("images", LARGE_IMAGES)):
        for encoding, target in TARGETS.items():
            share = d.served[(kind, encoding)] / d.in_process[kind]
            call_ms = per / d.in_process[kind] * 1000
            hosted = kind == "records" and d.records_hosted
            path = ("read by the proxy, passed to the Gateway, parsed, checked and scored there (the model is "
                    "scored in the Gateway: no second hop) and answered back through the proxy" if hosted else
                    "read by the proxy, passed to the Gateway, parsed and checked there, passed to the replica and "
                    "answered back")
            bound = d.json_parse_rate / d.in_process[kind]
            parse = (f"; parsing the JSON body alone (orjson, in process) takes {per / d.json_parse_rate * 1000:.1f} "
                     f"ms, which caps JSON at {bound:.0%} of the in-process rate before any other step"
                     if kind == "records" and encoding == "JSON" and d.json_parse_rate else "")
            note = "" if share >= target else (
                f"the model scores {per:,} {kind} in {call_ms:.1f} ms in process; served, each request's "
                f"{'2.4 MB' if kind == 'records' else 'payload'} is {path}, each step a process on the same 2 "
                f"cores: the baseline app, one process with no hop, reaches {baseline_share:.0%} over JSON "
                f"(records){parse}")
            out.append(Goal(f"served {kind}, {per} per request, {encoding}", f">= {target:.0%} of in-process",
                            f"{share:.0%} ({d.served[(kind, encoding)]:,.0f} vs {d.in_process[kind]:,.0f} {kind}/s)",
                            share >= target, note))
    times = d.single / d.healthz
    out.append(Goal("served records: one record's p50", "<= 2x GET /healthz p50",
                    f"{times:.2f}x ({d.single * 1000:.2f} vs {d.healthz * 1000:.2f} ms)", times <= 2.0,
                    "" if times <= 2.0 else (
                        f"the record is scored in the Gateway, one Ray Serve hop as GET /healthz; its "
                        f"{(d.single - d.healthz) * 1000:.1f} ms more are the body's passage from the proxy, the "
                        "route, the checks and the response" if d.records_hosted else
                        f"GET /healthz makes one Ray Serve hop (proxy to Gateway), a record two (then Gateway to the "
                        f"model replica and back, {(d.single - d.healthz) * 1000:.1f} ms more)")
                    + f"; in one process the baseline app's record costs "
                      f"{d.baseline_single / d.baseline_healthz:.2f}x its healthz"))
    share = d.text_served / d.text_in_process
    out.append(Goal(f"served generate at {d.text_clients} clients", ">= 70% of the in-process Engine",
                    f"{share:.0%} ({d.text_served:,.0f} vs {d.text_in_process:,.0f} tokens/s)", share >= 0.70,
                    "" if share >= 0.70 else
                    "the served replica spends its time in the model (py-spy: decode steps), but shares the 2 "
                    "cores with the proxy, the Gateway and the load generator's clients, while the in-process "
                    "Engine has them to itself"))
    return out


def markdown(d: DataPlane) -> list[str]:
    rows = []
    for kind, per in (("records", LARGE_RECORDS), ("images", LARGE_IMAGES)):
        for encoding in ("JSON", "binary"):
            rate = d.served[(kind, encoding)]
            route = "/v1 log_prob, JSON" if encoding == "JSON" else "/v2 infer, binary tensors in and out"
            rows.append([f"{kind}, {per:,} per request", route, f"{rate:,.0f}", f"{d.in_process[kind]:,.0f}",
                         f"{rate / d.in_process[kind]:.0%}"])
    rows.append([f"records, {LARGE_RECORDS:,} per request", "baseline app (FastAPI + uvicorn + ONNX Runtime), JSON",
                 f"{d.baseline_large:,.0f}", f"{d.in_process['records']:,.0f}",
                 f"{d.baseline_large / d.in_process['records']:.0%}"])
    server = "genserve (Ray Serve: proxy, Gateway scoring the model)" if d.records_hosted else \
        "genserve (Ray Serve: proxy, Gateway, model replica)"
    small = [[server, f"{d.single * 1000:.2f}",
              f"{d.healthz * 1000:.2f}", ratio(d.single, d.healthz)],
             ["baseline app (one process)", f"{d.baseline_single * 1000:.2f}", f"{d.baseline_healthz * 1000:.2f}",
              ratio(d.baseline_single, d.baseline_healthz)]]
    text = [[d.text_clients, f"{d.text_served:,.0f}", f"{d.text_in_process:,.0f}",
             f"{d.text_served / d.text_in_process:.0%}"]]
    return [
        "## Served: the data plane against the model's own speed", "",
        f"Large requests: {LARGE_CLIENTS} closed-loop clients (one per core) sending the same request back to back; "
        "items answered per second, against the model's runtime called in this process on the same batch (the "
        "replica's own call: ONNX Runtime where the shipped 'auto' picks it, one thread). Records are breast_cancer "
        f"repeated to {LARGE_RECORDS:,} (2.4 MB of JSON, 2.4 MB as FP64 binary); images are sklearn's 8x8 digits "
        f"repeated to {LARGE_IMAGES} (UINT8 binary). Failed requests in all of this section: {d.failures}.", "",
        *table(["request", "route", "served items/s", "in-process items/s", "served / in-process"], rows), "",
        "Small requests: one client, one record per request, in turn with GET /healthz on the same server "
        "(medians); the baseline app measured the same way.", "",
        *table(["server", "one record p50 ms", "GET /healthz p50 ms", "record / healthz"], small), "",
        "Text: served generate tokens/s at the most clients of the load table (batching on, closed-loop clients) "
        "against the decoding Engine in this process with the same 16 slots kept at as many concurrent requests "
        "(each finished one replaced at once), greedy, the same tokens per request; the two measured in turns "
        f"(served, in process, ...; {TEXT_TURNS} each, 1 in quick mode), medians.", "",
        *table(["concurrent requests", "served tokens/s", "in-process tokens/s", "served / in-process"], text), "",
    ]
