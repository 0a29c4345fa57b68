"""The Kubernetes manifests (deploy/k8s): every file and every kustomization's output valid against the
KubeRay CRDs and Kubernetes' own schemas, and consistent with the code (Serve settings, routes, ports,
store, metrics, the models the training job writes)."""

from __future__ import annotations

import re
import shlex
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import ray
import typer.main
import yaml

from genserve.service.cli import DEFAULT_MODELS, SERVE_ENV
from tests.deploy.manifests import (
    CRDS,
    DEFAULT_DEPLOYMENT,
    K8S,
    KUBECTL,
    RAY_KINDS,
    ROOT,
    SHARED_CRDS,
    app_deployments,
    container_ports,
    kustomization,
    kustomization_dirs,
    kustomize_build,
    label_selector_matches,
    load_all,
    patch_files,
    pod_labels,
    ray_container,
    ray_groups,
    replica_bounds,
    resource_files,
    serve_config,
    start_param_resources,
    validate,
)
from tests.deploy.test_docker import DOCKERFILES, base_image

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: cannot run `kubectl kustomize`")
BUILDS = [d for d in kustomization_dirs() if kustomization(d).get("kind", "Kustomization") == "Kustomization"]
STORE_MOUNT = "/mnt/model-store"
SERVE_PROXY_HEALTH = "/-/healthz"  # Ray Serve's proxy health route, on every proxy


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict[str, Any]]]:
    """`kubectl kustomize` of every kustomization, by its path relative to deploy/k8s (in parallel: fast).
    Without kubectl none: the tests that need a build are skipped, the others check the files alone."""
    if KUBECTL is None:
        return {}
    with ThreadPoolExecutor(8) as pool:
        outputs = pool.map(kustomize_build, BUILDS)
    return {str(d.relative_to(K8S)): docs for d, docs in zip(BUILDS, outputs, strict=True)}


def all_objects(built: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """(origin, object) for every file's objects and every build's."""
    objects = [(rel(f), doc) for f in resource_files() for doc in load_all(f)]
    objects += [(f"kustomize {name}", doc) for name, docs in built.items() for doc in docs]
    return objects


def ray_objects(built) -> list[tuple[str, dict[str, Any]]]:
    return [(origin, obj) for origin, obj in all_objects(built) if obj["kind"] in RAY_KINDS]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (obj,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return obj


@pytest.fixture(scope="module")
def routes() -> set[str]:
    from genserve.service.api.builder import build_api

    return set(build_api().openapi()["paths"])


# ---- the CRD copies ------------------------------------------------------------------------------------------


def test_crd_copies_are_the_shared_ones():
    if not SHARED_CRDS.is_dir():
        pytest.skip(f"{SHARED_CRDS} does not exist here; the copies in {CRDS.relative_to(ROOT)} are used")
    for name in RAY_KINDS.values():
        assert (CRDS / name).read_bytes() == (SHARED_CRDS / name).read_bytes(), f"{name} differs from {SHARED_CRDS}"


# ---- validity --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", resource_files(), ids=rel)
def test_manifest_file_is_valid(path):
    docs = load_all(path)
    assert docs, f"{rel(path)} is empty"
    for doc in docs:
        errors = validate(doc)
        assert not errors, f"{rel(path)} {doc['kind']}/{doc['metadata']['name']}:\n" + "\n".join(errors)


def test_every_yaml_file_is_used():
    """Each YAML file is a kustomization, a resource of one, or a patch of one: none is left unvalidated."""
    used = set(resource_files()) | set(patch_files()) | {d / "kustomization.yaml" for d in kustomization_dirs()}
    stray = [rel(p) for p in K8S.rglob("*.yaml") if p.resolve() not in used]
    assert not stray, f"not part of any kustomization: {stray}"


@needs_kubectl
@pytest.mark.parametrize("directory", BUILDS, ids=lambda d: str(d.relative_to(K8S)))
def test_kustomize_output_is_valid(built, directory):
    docs = built[str(directory.relative_to(K8S))]
    assert docs
    for doc in docs:
        errors = validate(doc)
        assert not errors, f"{doc['kind']}/{doc['metadata']['name']}:\n" + "\n".join(errors)


@needs_kubectl
def test_ingress_component(tmp_path):
    """The optional Ingress, added to an overlay as docs/deploy.md says, builds and points at the
    Service KubeRay creates for the RayService (`<name>-serve-svc`, port `serve`)."""
    shutil.copytree(K8S, tmp_path / "k8s")
    overlay = tmp_path / "k8s" / "overlays" / "cpu-ingress"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../cpu"], "components": ["../../components/ingress"]}))
    docs = kustomize_build(overlay)
    for doc in docs:
        assert not validate(doc), doc["kind"]
    ingress = one(docs, "Ingress")
    service = one(docs, "RayService")
    (backend,) = [p["backend"]["service"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    assert backend == {"name": f"{service['metadata']['name']}-serve-svc", "port": {"name": "serve"}}
    assert "serve" in container_ports(ray_container(service["spec"]["rayClusterConfig"]["headGroupSpec"]))


# ---- the overlays ----------------------------------------------------------------------------------------------


def gpu_groups(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [g for g in cluster.get("workerGroupSpecs") or []
            if "nvidia.com/gpu" in (ray_container(g).get("resources", {}).get("limits") or {})]


@needs_kubectl
def test_cpu_overlay_has_no_gpus(built):
    service = one(built["overlays/cpu"], "RayService")
    assert not gpu_groups(service["spec"]["rayClusterConfig"])
    for app in serve_config(service)["applications"]:
        for name, d in app_deployments(app).items():
            assert d.get("ray_actor_options", {}).get("num_gpus", 0) == 0, name
    images = {ray_container(g)["image"] for _, _, g in ray_groups(service)}
    assert all("genserve-cpu" in i for i in images), images


@needs_kubectl
def test_gpu_overlay(built):
    service = one(built["overlays/gpu"], "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    (gpu,) = gpu_groups(cluster)
    container = ray_container(gpu)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    assert "genserve-cuda" in container["image"]
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"].get("tolerations") or [])
    # Only the neural models get GPUs; the GMMs, the Gateway and the ModelRepository stay on CPU.
    (app,) = serve_config(service)["applications"]
    with_gpu = {name for name, d in app_deployments(app).items()
                if d.get("ray_actor_options", {}).get("num_gpus", 0) > 0}
    neural = {name for name, spec in DEFAULT_MODELS.items() if spec["kind"] in ("text", "image")}
    assert with_gpu == neural
    # Every other group keeps the CPU image.
    for _, _, group in ray_groups(service):
        if group is not gpu:
            assert "genserve-cpu" in ray_container(group)["image"]


# ---- consistency with the code ------------------------------------------------------------------------------


def test_serve_env_on_every_ray_container(built):
    """service.cli.SERVE_ENV, exactly, on every Ray container: head and workers of serving, training and
    the interactive cluster (a cluster `genserve serve --address` joins keeps its pods' environment)."""
    checked = 0
    for origin, obj in ray_objects(built):
        for where, _, group in ray_groups(obj):
            env = {e["name"]: e.get("value") for e in ray_container(group).get("env") or []}
            serve_vars = {k: v for k, v in env.items() if k.startswith("RAY_SERVE_")}
            assert serve_vars == SERVE_ENV, f"{origin} {where}"
            checked += 1
    assert checked >= 6


def test_store_on_every_ray_pod(built):
    """The shared store (PVC genserve-model-store) at the path GENSERVE_STORE names, on every Ray pod;
    GENSERVE_STORE from the genserve-env ConfigMap (where an s3:// URI can replace it), the images' default."""
    (configmap,) = load_all(K8S / "store" / "env-configmap.yaml")
    assert configmap["data"]["GENSERVE_STORE"] == STORE_MOUNT
    (pvc,) = load_all(K8S / "store" / "pvc.yaml")
    assert pvc["metadata"]["name"] == "genserve-model-store"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for origin, obj in ray_objects(built):
        for where, _, group in ray_groups(obj):
            spec = group["template"]["spec"]
            container = ray_container(group)
            volumes = {v["name"]: v for v in spec.get("volumes") or []}
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts") or []}
            assert STORE_MOUNT in mounts, f"{origin} {where}: no store mount"
            claim = volumes[mounts[STORE_MOUNT]].get("persistentVolumeClaim", {}).get("claimName")
            assert claim == pvc["metadata"]["name"], f"{origin} {where}"
            env_from = [e.get("configMapRef", {}).get("name") for e in container.get("envFrom") or []]
            assert configmap["metadata"]["name"] in env_from, f"{origin} {where}"
            secrets = [e["secretRef"] for e in container.get("envFrom") or [] if "secretRef" in e]
            assert all(s.get("optional") for s in secrets), f"{origin} {where}: a required Secret blocks pods"
            env = {e["name"]: e.get("value") for e in container.get("env") or []}
            assert env.get("GENSERVE_CACHE") in mounts, f"{origin} {where}: GENSERVE_CACHE is not a volume"


def test_ports_and_ray_metrics_export(built):
    """Ray's metrics on 8080 (metrics-export-port and a port named `metrics`) on every Ray node; the head's
    GCS and dashboard ports; serving pods' `serve` port is the Serve config's HTTP port."""
    for origin, obj in ray_objects(built):
        for where, node_type, group in ray_groups(obj):
            ports = container_ports(ray_container(group))
            assert group["rayStartParams"].get("metrics-export-port") == "8080", f"{origin} {where}"
            assert ports.get("metrics") == 8080, f"{origin} {where}"
            if node_type == "head":
                assert ports.get("gcs-server") == 6379 and ports.get("dashboard") == 8265, f"{origin} {where}"
            if obj["kind"] == "RayService":
                assert ports.get("serve") == serve_config(obj)["http_options"]["port"] == 8000, f"{origin} {where}"


def test_ray_version_is_the_images(built):
    image_versions = {base_image(p).split(":")[1].split("-")[0] for p in DOCKERFILES.values()}
    assert image_versions == {ray.__version__}
    for origin, obj in ray_objects(built):
        spec = obj["spec"].get("rayClusterConfig") or obj["spec"].get("rayClusterSpec") or obj["spec"]
        assert spec.get("rayVersion") == ray.__version__, origin


def test_images_are_the_dockerfiles(built):
    """Each Ray container runs an image built from deploy/docker: genserve-cpu or genserve-cuda."""
    for origin, obj in ray_objects(built):
        for where, _, group in ray_groups(obj):
            name = ray_container(group)["image"].rsplit("/", 1)[-1].split(":")[0]
            variant = name.removeprefix("genserve-")
            assert name.startswith("genserve-") and variant in DOCKERFILES, f"{origin} {where}: {name}"


def test_resources_requests_and_limits(built):
    for origin, obj in ray_objects(built):
        for where, _, group in ray_groups(obj):
            resources = ray_container(group).get("resources") or {}
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind) or {}), f"{origin} {where}: {kind}"
            # Memory requested as limited: a Ray node is never the first to be evicted for overcommit.
            assert resources["requests"]["memory"] == resources["limits"]["memory"], f"{origin} {where}"


def http_paths(probe: dict[str, Any] | None, port: int) -> list[str]:
    """The paths a probe requests on `port`, httpGet or wget/curl in an exec probe."""
    if not probe:
        return []
    if "httpGet" in probe:
        get = probe["httpGet"]
        return [get.get("path", "/")] if get.get("port") in (port, "serve") else []
    command = " ".join(probe.get("exec", {}).get("command") or [])
    return re.findall(rf"http://(?:localhost|127\.0\.0\.1):{port}(/\S*)", command)


def test_probes_use_real_routes(built, routes):
    """Probes on the Serve port ask for routes the application has (or Ray Serve's proxy health route);
    none on the head, and no liveness probe on it at all (see the comments in rayservice.yaml)."""
    worker_readiness = 0
    for origin, obj in ray_objects(built):
        for where, node_type, group in ray_groups(obj):
            container = ray_container(group)
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                paths = http_paths(container.get(kind), 8000)
                for path in paths:
                    assert path in routes or path == SERVE_PROXY_HEALTH, f"{origin} {where} {kind}: {path}"
                if node_type == "head" or kind != "readinessProbe":
                    assert not paths, f"{origin} {where} {kind} on the Serve port"
                elif paths:
                    # Keeps KubeRay's draining signal: the proxy answers 503 before a node is removed.
                    assert SERVE_PROXY_HEALTH in paths and "/healthz" in paths, f"{origin} {where}"
                    worker_readiness += 1
    assert worker_readiness, "no worker readiness probe on the Serve port"


def test_metrics_service_selects_serving_heads_only(built, routes):
    """genserve's /metrics is a cluster-wide sum: the scraped Service must select one pod per cluster."""
    (service,) = load_all(K8S / "base" / "metrics-service.yaml")
    (rayservice,) = load_all(K8S / "base" / "rayservice.yaml")
    selector = {"matchLabels": service["spec"]["selector"]}
    selected = []
    for origin, obj in ray_objects(built):
        for _, node_type, group in ray_groups(obj):
            if label_selector_matches(selector, pod_labels(node_type, group)):
                selected.append((origin, obj["kind"], node_type))
                assert container_ports(ray_container(group)).get(service["spec"]["ports"][0]["targetPort"]) == 8000
    assert selected and all(kind == "RayService" and node == "head" for _, kind, node in selected), selected
    # The ServiceMonitor scrapes that Service, on its port, at a real route.
    (monitor,) = load_all(K8S / "monitoring" / "servicemonitor.yaml")
    assert label_selector_matches(monitor["spec"]["selector"], service["metadata"]["labels"])
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] in routes
    assert rayservice["spec"]["excludeHeadPodFromServeSvc"] is True


def test_podmonitor_selects_every_ray_pod(built):
    (monitor,) = load_all(K8S / "monitoring" / "podmonitor.yaml")
    for origin, obj in ray_objects(built):
        for where, node_type, group in ray_groups(obj):
            assert label_selector_matches(monitor["spec"]["selector"], pod_labels(node_type, group)), \
                f"{origin} {where}"
            ports = container_ports(ray_container(group))
            for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                assert endpoint["port"] in ports, f"{origin} {where}"


def quantity(value: str | int | float) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@needs_kubectl
@pytest.mark.parametrize("overlay", ["overlays/cpu", "overlays/gpu"])
def test_worker_groups_fit_serve_autoscaling(built, overlay):
    """The workers at minReplicas host every deployment (the Gateway, the ModelRepository, each model's one
    version) at min_replicas, and at maxReplicas every one at max_replicas plus one replica of any model: two
    versions of a model sharing its traffic (a new version loading, a canary) need one replica more than one
    version would. So Serve autoscaling is never stuck waiting for a pod the autoscaler may not add."""
    service = one(built[overlay], "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # nothing is placed on the head
    groups = cluster["workerGroupSpecs"]
    for g in groups:
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]

    def capacity(key: str, resource: str) -> float:
        return sum(g[key] * quantity(ray_container(g)["resources"]["limits"].get(resource, 0)) for g in groups)

    (app,) = serve_config(service)["applications"]
    deployments = {n: d for n, d in app_deployments(app).items() if n != DEFAULT_DEPLOYMENT}
    models = set(app["args"]["deployments"])

    def need(options: dict[str, Any], resource: str) -> float:
        return (options.get("ray_actor_options") or {}).get(resource, 0)

    def demand(bound: int, resource: str) -> float:
        return sum(replica_bounds(d)[bound] * need(d, resource) for d in deployments.values())

    def second_version(resource: str) -> float:
        return max(need(deployments[m], resource) for m in models)

    assert demand(0, "num_cpus") <= capacity("minReplicas", "cpu")
    assert demand(1, "num_cpus") + second_version("num_cpus") <= capacity("maxReplicas", "cpu")
    assert demand(1, "num_gpus") + second_version("num_gpus") <= capacity("maxReplicas", "nvidia.com/gpu")
    # Custom resources (the ModelRepository's, which pins it to the head) are offered where they are asked for.
    offered = start_param_resources(cluster["headGroupSpec"])
    for g in groups:
        for key, value in start_param_resources(g).items():
            offered[key] = offered.get(key, 0) + g["maxReplicas"] * value
    for name, d in deployments.items():
        for key, value in ((d.get("ray_actor_options") or {}).get("resources") or {}).items():
            assert replica_bounds(d)[1] * value <= offered.get(key, 0), (name, key)


# ---- the training job ------------------------------------------------------------------------------------------


def rayjob() -> dict[str, Any]:
    (job,) = load_all(K8S / "training" / "rayjob.yaml")
    return job


def entrypoint_commands() -> list[list[str]]:
    """The genserve commands of the RayJob's entrypoint, as the driver's shell will see them."""
    entrypoint = rayjob()["spec"]["entrypoint"]
    # The submitter's shell passes one argument to `bash -c`: the script, $GENSERVE_STORE unexpanded.
    words = shlex.split(entrypoint)
    assert words[:2] == ["bash", "-c"] and len(words) == 3, "the entrypoint must be bash -c 'SCRIPT'"
    script = words[2]
    assert "$GENSERVE_STORE" in script
    commands = []
    for line in script.splitlines():
        argv = shlex.split(line.replace('"$GENSERVE_STORE"', "/mnt/model-store"))
        if argv and argv[0] == "genserve":
            commands.append(argv[1:])
    return commands


def options(args: list[str]) -> dict[str, str | bool]:
    """--key value and --flag (no value) as a dict."""
    out: dict[str, str | bool] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else True
            out[arg] = value
    return out


def test_rayjob_trains_every_served_model_as_genserve_serve_would():
    """The job writes each model serving's config has options for (args.deployments), with the settings of
    service.cli.DEFAULT_MODELS, into the store."""
    source = yaml.safe_load((ROOT / "deploy" / "serve" / "genserve.yaml").read_text())
    (app,) = source["applications"]
    served = set(app["args"]["deployments"])
    trained = {}
    for argv in entrypoint_commands():
        if argv[0] != "train":
            continue
        opts = options(argv[2:])
        assert opts.get("--store") == STORE_MOUNT, argv
        trained[opts["--name"]] = (argv[1], opts)
    assert set(trained) == served == set(DEFAULT_MODELS)
    for name, spec in DEFAULT_MODELS.items():
        command, opts = trained[name]
        assert opts["--dataset"] == spec["dataset"], name
        if spec["kind"] == "gmm":
            assert command == "gmm" and opts.get("--covariance", "full") == spec["covariance_type"]
        elif spec["kind"] == "text":
            assert command == "text"
            for key in ("tokenizer", "model", "preset"):
                assert opts[f"--{key}"] == spec[key], (name, key)
        else:
            assert command == spec["model"] and opts.get("--preset") == spec["preset"]
            assert bool(opts.get("--conditional")) == spec["conditional"], name


def test_rayjob_distributes_text_training_over_its_workers():
    job = rayjob()
    (text,) = [argv for argv in entrypoint_commands() if argv[:2] == ["train", "text"]]
    workers = int(text[text.index("--workers") + 1])
    cluster = job["spec"]["rayClusterSpec"]
    pods = sum(g["replicas"] for g in cluster["workerGroupSpecs"])
    assert workers == pods >= 2, "one Ray Train worker per worker pod"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # A cluster of its own that goes away with the job (docs/deploy.md explains the choice).
    assert job["spec"]["shutdownAfterJobFinishes"] is True and "clusterSelector" not in job["spec"]


def test_rayjob_commands_parse_with_the_cli():
    cli = typer.main.get_command(__import__("genserve.service.cli", fromlist=["app"]).app)
    text = cli.commands["train"].commands["text"]
    if "workers" not in {p.name for p in text.params}:
        pytest.skip("`genserve train text` has no --workers yet (being added to service/cli.py in parallel)")
    for argv in entrypoint_commands():
        group, *rest = argv
        command = cli.commands[group]
        if hasattr(command, "commands") and rest and rest[0] in command.commands:
            command, rest = command.commands[rest[0]], rest[1:]  # else the group's own options (`genserve models`)
        command.make_context(" ".join(argv[:2]), list(rest))  # raises on an unknown option or a bad value


# ---- docs --------------------------------------------------------------------------------------------------


def test_deploy_doc_names_real_files():
    text = (ROOT / "docs" / "deploy.md").read_text()
    paths = set(re.findall(r"(?<![\w/.-])((?:deploy|tests|docs)/[\w./-]+[\w/])", text))
    assert paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/deploy.md names files that do not exist: {missing}"
