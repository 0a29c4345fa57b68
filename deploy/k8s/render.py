"""Render the RayService's serveConfigV2 from the repository's Serve config, deploy/serve/genserve.yaml.

One source of truth: the application, its args (limits, management) and each deployment's options and
user_config are taken from deploy/serve/genserve.yaml as they are; only what differs between a laptop and a
cluster is changed here, in CLUSTER_* below. The deployments are the application's own (`deployments:`,
the Gateway and the ModelRepository) and each model's (`args.deployments`, options every version of that
model is deployed with, as an application of its own, genserve--NAME--vN; `args.default_deployment` for a
model not listed): the same cluster settings apply to both kinds, and `args.management` polls the store.

KubeRay takes serveConfigV2 as one string, which a Kustomize patch cannot change in part, so both variants are
written in full:

- deploy/k8s/base/rayservice.yaml: the block under `serveConfigV2: |` (the rest of the file is hand-written);
- deploy/k8s/overlays/gpu/serve-config-gpu.yaml: a patch that replaces it with the GPU variant.

    .venv/bin/python deploy/k8s/render.py           # rewrite both
    .venv/bin/python deploy/k8s/render.py --check   # exit 1, with a diff, if either is stale (tests run this)
"""

from __future__ import annotations

import argparse
import copy
import difflib
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "deploy" / "serve" / "genserve.yaml"
RAYSERVICE = ROOT / "deploy" / "k8s" / "base" / "rayservice.yaml"
GPU_PATCH = ROOT / "deploy" / "k8s" / "overlays" / "gpu" / "serve-config-gpu.yaml"
RAYSERVICE_NAME = "genserve"

# Every Ray node runs a Serve proxy where it hosts replicas (and the head always does), and KubeRay's
# `genserve-serve-svc` balances over the pods whose proxy is healthy: ingress capacity grows with the worker
# pods and no single pod carries all HTTP traffic. HeadOnly, the laptop's setting, would send every request
# through the head's one proxy, a bottleneck and a single point of failure next to the GCS.
CLUSTER_PROXY_LOCATION = "EveryNode"
# Reachable from the pod network (the proxy listens inside each pod); 8000 is the container port named
# `serve` that KubeRay's serve Service exposes.
CLUSTER_HTTP_OPTIONS = {"host": "0.0.0.0", "port": 8000}

# Logical CPUs per replica. Ray sets each replica's OMP_NUM_THREADS (so torch's and ONNX Runtime's thread
# pools) from num_cpus, so on 8-core worker pods the neural models get whole cores instead of the laptop's
# fractions, which were chosen for the Gateway and the five models to fit 2 cores together.
CLUSTER_NUM_CPUS = {"Gateway": 0.5, "breast-cancer": 1, "wine": 1, "shakespeare": 2, "mnist": 2, "digits": 1}
DEFAULT_NUM_CPUS = 1  # a model added to genserve.yaml and not listed above, and args.default_deployment

# Serve autoscaling instead of fixed num_replicas. target_ongoing_requests is what one replica handles at
# full speed: a text model's decoding `slots` (more than that wait for a slot), a batching model's
# max_batch_size (one full forward pass in flight). The Gateway only parses and forwards (async), so it
# holds many requests cheaply; two at least, so that one failing replica does not take the API down.
CLUSTER_REPLICAS = {"Gateway": (2, 8)}  # (min_replicas, max_replicas)
DEFAULT_REPLICAS = (1, 4)
GATEWAY_TARGET_ONGOING_REQUESTS = 64
DEFAULT_TARGET_ONGOING_REQUESTS = 32
# Ray Serve's own defaults, written out because docs/deploy.md explains the behaviour with them: scale up
# after 30 s above target, down after 10 minutes below (so a bursty load keeps its replicas).
UPSCALE_DELAY_S = 30.0
DOWNSCALE_DELAY_S = 600.0

# GPU overlay: GPUs for the neural models (the GMMs and the Gateway stay on CPU). These models are small
# (under 10 MB of weights; the text model's KV cache for 16 slots is a few MB), so fractions let the three
# share one GPU at their minimum replicas; Ray packs fractions but does not isolate memory.
GPU_NUM_GPUS = {"shakespeare": 0.5, "mnist": 0.25, "digits": 0.25}
GPU_NUM_CPUS = 1  # a GPU replica's CPU work is feeding the GPU; one thread does it

# Live model management on the cluster: the ModelRepository lists the store (the PVC or s3://, whichever
# GENSERVE_STORE names) every 30 s and loads each newly published version, at 0% traffic: it serves only once
# promoted (`genserve models promote`, after a canary split if wanted), so publishing never changes what
# clients get by itself, and no RayService change is needed to serve a new version (docs/deploy.md, "Live
# model management"). A listing is one LIST request on S3, so 30 s costs nothing worth counting.
CLUSTER_MANAGEMENT = {"control": "poll", "poll_interval_s": 30, "promote_new": False}

# The ModelRepository (one replica, no CPUs) runs on the head, the only node offering this custom resource
# (its rayStartParams in deploy/k8s/base/rayservice.yaml): a 0-CPU replica does not keep a worker pod busy
# in the Ray autoscaler's eyes, so on a worker it would be moved whenever that pod is scaled down, and a
# restarted repository forgets promotions, rollbacks and traffic splits (it adopts the running versions and
# serves each model's newest). The head lives as long as the cluster; one unit also means one replica at most.
CONTROL_DEPLOYMENTS = ("Gateway", "ModelRepository")
REPOSITORY = "ModelRepository"
CONTROL_RESOURCE = "genserve_control"

HEADER = ("# Generated by deploy/k8s/render.py from deploy/serve/genserve.yaml; edit those, then run\n"
          "# `.venv/bin/python deploy/k8s/render.py`. Variant: {variant}.\n")


def target_ongoing_requests(name: str, deployment: dict[str, Any]) -> int:
    if name == "Gateway":
        return GATEWAY_TARGET_ONGOING_REQUESTS
    user_config = deployment.get("user_config") or {}
    target = user_config.get("slots") or user_config.get("max_batch_size") or DEFAULT_TARGET_ONGOING_REQUESTS
    limit = deployment.get("max_ongoing_requests")
    return min(int(target), int(limit)) if limit else int(target)


def cluster_deployment(name: str | None, deployment: dict[str, Any], gpu: bool) -> None:
    """A deployment's options (a model's, the Gateway's; `name` None: args.default_deployment) for the cluster,
    in place: autoscaling instead of a replica count, CPUs (and GPUs) for the cluster's pods."""
    deployment.pop("num_replicas", None)  # Serve refuses both a number and autoscaling_config
    low, high = CLUSTER_REPLICAS.get(name, DEFAULT_REPLICAS)
    deployment["autoscaling_config"] = {
        "min_replicas": low,
        "max_replicas": high,
        "target_ongoing_requests": target_ongoing_requests(name or "", deployment),
        "upscale_delay_s": UPSCALE_DELAY_S,
        "downscale_delay_s": DOWNSCALE_DELAY_S,
    }
    options = dict(deployment.get("ray_actor_options") or {})
    options["num_cpus"] = CLUSTER_NUM_CPUS.get(name, DEFAULT_NUM_CPUS)
    options["num_gpus"] = 0
    if gpu and name in GPU_NUM_GPUS:
        options["num_cpus"] = GPU_NUM_CPUS
        options["num_gpus"] = GPU_NUM_GPUS[name]
    deployment["ray_actor_options"] = options
    # Keep autoscaling_config next to the replica settings and user_config last, as in the source.
    if "user_config" in deployment:
        deployment["user_config"] = deployment.pop("user_config")


def cluster_config(source: dict[str, Any], gpu: bool = False) -> dict[str, Any]:
    """The Serve config for the cluster: `source` with the adjustments above."""
    config = copy.deepcopy(source)
    config["proxy_location"] = CLUSTER_PROXY_LOCATION
    config["http_options"] = {**(config.get("http_options") or {}), **CLUSTER_HTTP_OPTIONS}
    for app in config["applications"]:
        args = app.setdefault("args", {})
        args["management"] = {**(args.get("management") or {}), **CLUSTER_MANAGEMENT}
        for name, options in (args.get("deployments") or {}).items():
            cluster_deployment(name, options, gpu)
        if "default_deployment" in args:
            cluster_deployment(None, args["default_deployment"], gpu)
        for deployment in app.get("deployments") or []:
            name = deployment["name"]
            if name not in CONTROL_DEPLOYMENTS:
                raise SystemExit(f"{SOURCE}: deployment {name!r} is not one of the application's own "
                                 f"({', '.join(CONTROL_DEPLOYMENTS)}); a model's options go in args.deployments")
            if name == REPOSITORY:  # one replica, never autoscaled; on the head (see CONTROL_RESOURCE)
                options = dict(deployment.get("ray_actor_options") or {})
                options.update(num_cpus=0, num_gpus=0, resources={CONTROL_RESOURCE: 1})
                deployment["ray_actor_options"] = options
                continue
            cluster_deployment(name, deployment, gpu)
    return config


def serve_config_text(gpu: bool = False) -> str:
    source = yaml.safe_load(SOURCE.read_text())
    config = cluster_config(source, gpu=gpu)
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=100)
    return HEADER.format(variant="GPU (num_gpus on the neural models)" if gpu else "CPU") + body


def indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "".join(pad + line if line.strip() else line for line in text.splitlines(keepends=True))


# `  serveConfigV2: |` and the lines indented deeper than it (or blank) that follow.
BLOCK = re.compile(r"^(?P<key>(?P<pad> *)serveConfigV2: \|\n)(?P<body>(?:(?:(?P=pad) {2,}.*)?\n)*)", re.MULTILINE)


def render_rayservice(current: str) -> str:
    match = BLOCK.search(current)
    if match is None:
        raise SystemExit(f"{RAYSERVICE}: no `serveConfigV2: |` block to fill")
    body = match.group("body")
    content = body.rstrip("\n")
    trailing = "\n" * (len(body) - len(content) - (1 if content else 0))  # the blank lines after the block
    pad = len(match.group("pad")) + 2
    new = match.group("key") + indent(serve_config_text(gpu=False), pad) + trailing
    return current[: match.start()] + new + current[match.end():]


def render_gpu_patch() -> str:
    return (
        "# The GPU overlay's serveConfigV2, whole: a Kustomize patch cannot change part of a string.\n"
        "# Generated by deploy/k8s/render.py; run `.venv/bin/python deploy/k8s/render.py` after editing\n"
        "# deploy/serve/genserve.yaml or the renderer.\n"
        "apiVersion: ray.io/v1\n"
        "kind: RayService\n"
        "metadata:\n"
        f"  name: {RAYSERVICE_NAME}\n"
        "spec:\n"
        "  serveConfigV2: |\n" + indent(serve_config_text(gpu=True), 4)
    )


def outputs() -> dict[Path, str]:
    """Each generated file and the text it should have."""
    return {RAYSERVICE: render_rayservice(RAYSERVICE.read_text()), GPU_PATCH: render_gpu_patch()}


def stale() -> dict[Path, str]:
    """The generated files whose committed text differs from what would be rendered, with a diff each."""
    diffs = {}
    for path, text in outputs().items():
        current = path.read_text() if path.exists() else ""
        if current != text:
            rel = path.relative_to(ROOT)
            diffs[path] = "".join(difflib.unified_diff(current.splitlines(keepends=True),
                                                       text.splitlines(keepends=True),
                                                       f"a/{rel}", f"b/{rel} (rendered)"))
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is stale")
    args = parser.parse_args(argv)
    if args.check:
        diffs = stale()
        for diff in diffs.values():
            sys.stdout.write(diff)
        if diffs:
            print(f"stale: {', '.join(str(p.relative_to(ROOT)) for p in diffs)}; "
                  "run `.venv/bin/python deploy/k8s/render.py`", file=sys.stderr)
        return 1 if diffs else 0
    for path, text in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
