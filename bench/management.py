"""Live model management, measured: how soon a published version serves, and what loading one costs the models
already serving.

    .venv/bin/python -m bench.management [--quick]

One Ray Serve instance in poll control mode (the store listed every POLL_S seconds) serves a GMM of
breast_cancer and a character GPT of the default served size (shakespeare), trained for the occasion into a
temporary store, with the shipped Serve config's options (deploy/serve/genserve.yaml). Then, in rounds:

1. a new version of a model lands in the store (its directory renamed into place, as `genserve train` writes one,
   manifest included) and a client asks the model every 20 ms until a response names the new version: the time
   from landing to that first response (the poll's wait, the artifact's checks, the new replicas' start and
   the routing change together);
2. while clients send breast-cancer log_prob requests back to back, a new shakespeare version is published and
   loaded: those requests' latency during the load (landing to the new version's first response), against
   the same clients in an equal window at rest just before it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import Report, load_average, load_note, ratio, table
from bench.served import (
    CONFIG,
    RECORDS,
    TEXT,
    free_port,
    ray_started,
    start_serve,
    write_text_model,
)

POLL_S = 1.0
VERSION = "genserve-model-version"
RECORD_CLIENTS = 4


def build_store(store: Path) -> dict[str, Path]:
    from genserve.training.gmm_pipeline import GMMTrainConfig, train_gmm

    gmm = train_gmm(GMMTrainConfig(dataset="sklearn:breast_cancer", name=RECORDS, covariance_type="full",
                                   components=2, n_init=1), store, progress=False)
    return {RECORDS: gmm, TEXT: write_text_model(store)}


def publish(source: Path, store: Path, version: int) -> float:
    """`source`'s artifact as version `version` of its model: copied beside, then renamed into place (what a
    reader of the store sees at once, complete). Returns when it landed (time.monotonic())."""
    model = store / source.parent.name
    staging = model / f".staging-{version}"
    shutil.copytree(source, staging)
    manifest = json.loads((staging / "manifest.json").read_text())
    (staging / "manifest.json").write_text(json.dumps({**manifest, "version": str(version)}))
    staging.rename(model / str(version))
    return time.monotonic()


def first_served(http, url: str, body: dict, version: int, timeout: float = 300) -> float:
    """When a response first names `version` (time.monotonic())."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = http.post(url, json=body)
        if r.headers.get(VERSION) == str(version):
            return time.monotonic()
        time.sleep(0.02)
    raise RuntimeError(f"version {version} not served after {timeout:.0f} s")


class Clients:
    """Closed-loop clients of one endpoint, each latency recorded with when its request was sent."""

    def __init__(self, url: str, body: dict, n: int):
        import httpx

        self.samples: list[tuple[float, float]] = []
        self.errors = 0
        self.stopped = threading.Event()

        def loop() -> None:
            with httpx.Client(timeout=60) as http:
                while not self.stopped.is_set():
                    sent = time.monotonic()
                    try:
                        ok = http.post(url, json=body).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    if ok:
                        self.samples.append((sent, time.monotonic() - sent))
                    else:
                        self.errors += 1

        self.threads = [threading.Thread(target=loop, daemon=True) for _ in range(n)]
        for thread in self.threads:
            thread.start()

    def between(self, start: float, end: float) -> list[float]:
        return [latency for sent, latency in self.samples if start <= sent < end]

    def stop(self) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=60)


def ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000) if values else float("nan")


def run(quick: bool = False) -> Report:
    import httpx
    from ray import serve
    from sklearn.datasets import load_breast_cancer

    from genserve.service.app import AppArgs, build
    from genserve.service.cli import read_serve_config

    rounds = 2 if quick else 4
    load_before = load_average()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="genserve-bench-") as tmp, ray_started():
        store = Path(tmp) / "store"
        sources = build_store(store)
        port = free_port()
        start_serve(port)
        _, args, overrides = read_serve_config(CONFIG)
        args = {**args, "store": str(store), "models": [RECORDS, TEXT],
                "management": {"control": "poll", "poll_interval_s": POLL_S}}
        serve.run(build(AppArgs.model_validate(args), overrides), name="genserve", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        while httpx.get(f"{url}/readyz", timeout=5).status_code != 200:
            time.sleep(0.2)
        setup_s = time.perf_counter() - started
        record = {"records": [load_breast_cancer().data[0].tolist()]}
        prompt = {"prompt": "ROMEO:\n", "max_new_tokens": 1, "temperature": 0}
        records_url, text_url = f"{url}/v1/models/{RECORDS}/log_prob", f"{url}/v1/models/{TEXT}/generate"

        landing: dict[str, list[float]] = {RECORDS: [], TEXT: []}
        rest: list[float] = []
        during: list[float] = []
        version = 1
        with httpx.Client(timeout=60) as http:
            for _ in range(rounds):  # 1. landing to first served, each model in turn
                version += 1
                for name, target, body in ((RECORDS, records_url, record), (TEXT, text_url, prompt)):
                    landed = publish(sources[name], store, version)
                    landing[name].append(first_served(http, target, body, version) - landed)
            clients = Clients(records_url, record, RECORD_CLIENTS)
            try:
                time.sleep(2.0)
                for _ in range(rounds):  # 2. the other model's latency at rest, then during a load
                    version += 1
                    time.sleep(POLL_S * 2)  # past the previous version's unload
                    quiet = time.monotonic()
                    time.sleep(statistics.median(landing[TEXT]))  # a window at rest as long as a load takes
                    landed = publish(sources[TEXT], store, version)
                    served = first_served(http, text_url, prompt, version)
                    rest += clients.between(quiet, landed)
                    during += clients.between(landed, served)
            finally:
                clients.stop()
        measured_s = time.perf_counter() - started - setup_s
    lines = markdown(landing, rest, during, clients.errors, rounds, setup_s, measured_s,
                     load_note(load_before, load_average()))
    return Report(markdown=lines)


def markdown(landing: dict[str, list[float]], rest: list[float], during: list[float], errors: int, rounds: int,
             setup_s: float, measured_s: float, load: str) -> list[str]:
    rows = [(name, len(times), f"{statistics.median(times):.1f}", f"{min(times):.1f}", f"{max(times):.1f}")
            for name, times in landing.items()]
    lines = [
        "## Live model management",
        "",
        f"`python -m bench.management`: one Ray Serve instance in poll control mode (the store listed every "
        f"{POLL_S:g} s) serving breast-cancer (GMM) and shakespeare (character GPT, default served size) with the "
        f"shipped Serve config's options. Set up in {setup_s:.0f} s, measured in {measured_s:.0f} s. {load}",
        "",
        "### From a version landing in the store to its first served response",
        "",
        f"Each version's directory renamed into place, then a client asking every 20 ms until a response's "
        f"Genserve-Model-Version names it: the poll's wait (about {POLL_S / 2:g} s on average), the artifact's "
        "sha256 checks, its new Serve application's replicas starting, and every ingress routing to it.",
        "",
        *table(["model", "versions", "median s", "min s", "max s"], rows),
        "",
        "### Other models' latency while a version loads",
        "",
        f"{RECORD_CLIENTS} closed-loop clients of breast-cancer log_prob (1 record) while a new shakespeare "
        f"version loads (landing to first served), against the same clients for an equal window at rest just "
        f"before, {rounds} rounds pooled; {errors} failed requests in all.",
        "",
        *table(["window", "requests", "p50 ms", "p99 ms"],
               [("at rest", len(rest), f"{ms(rest, 50):.1f}", f"{ms(rest, 99):.1f}"),
                ("during a load", len(during), f"{ms(during, 50):.1f}", f"{ms(during, 99):.1f}")]),
        "",
        f"p99 during a load / at rest: {ratio(ms(during, 99), ms(rest, 99))}; p50: "
        f"{ratio(ms(during, 50), ms(rest, 50))}. On 2 shared cores a new replica's start (Python imports, "
        "torch, the artifact's load) takes CPU from the serving replicas: what a larger machine, or replicas "
        "on other nodes, does not pay.",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 4")
    report = run(quick=parser.parse_args(argv).quick)
    print("\n".join(report.markdown))
    return report


if __name__ == "__main__":
    main()
