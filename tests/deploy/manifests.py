"""Helpers of the deploy tests: finding and building the manifests, and validating them against schemas."""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
CRDS = Path(__file__).resolve().parent / "crds"
# Where the tests' environment keeps the KubeRay CRDs, next to the repository (copied into CRDS above).
SHARED_CRDS = Path(__file__).parents[2].parent / "shared" / "k8s-schemas"
KUBERNETES_VERSION = "1.32"
RAY_KINDS = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCluster": "ray.io_rayclusters.yaml"}
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor"}
KUBECTL = shutil.which("kubectl")


# ---- the files ---------------------------------------------------------------------------------------------


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def resource_files() -> list[Path]:
    """Every manifest file some kustomization lists as a resource: whole objects, each valid on its own."""
    files = set()
    for directory in kustomization_dirs():
        for entry in kustomization(directory).get("resources") or []:
            path = (directory / entry).resolve()
            if path.is_file():
                files.add(path)
    return sorted(files)


def patch_files() -> list[Path]:
    files = set()
    for directory in kustomization_dirs():
        for patch in kustomization(directory).get("patches") or []:
            if "path" in patch:
                files.add((directory / patch["path"]).resolve())
    return sorted(files)


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    assert KUBECTL, "kubectl is needed to build the kustomizations"
    result = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {directory.relative_to(ROOT)} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


# ---- Ray pods ------------------------------------------------------------------------------------------------


def cluster_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The RayCluster specs inside a KubeRay object, as (where, spec)."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    spec = obj["spec"]
    if kind == "RayService":
        yield f"{kind}/{name}", spec["rayClusterConfig"]
    elif kind == "RayJob" and "rayClusterSpec" in spec:
        yield f"{kind}/{name}", spec["rayClusterSpec"]
    elif kind == "RayCluster":
        yield f"{kind}/{name}", spec


def ray_groups(obj: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(where, "head" or "worker", group spec) for every node group of a KubeRay object."""
    for where, spec in cluster_specs(obj):
        yield f"{where} head", "head", spec["headGroupSpec"]
        for group in spec.get("workerGroupSpecs") or []:
            yield f"{where} {group['groupName']}", "worker", group


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """The Ray container: KubeRay runs `ray start` in the first one."""
    return group["template"]["spec"]["containers"][0]


def container_ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports") or []}


def serve_config(obj: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(obj["spec"]["serveConfigV2"])


DEFAULT_DEPLOYMENT = "(default_deployment)"


def app_deployments(app: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every deployment's options in a genserve application of a Serve config, by name: the application's own
    (`deployments:`, the Gateway and the ModelRepository) and each model's (`args.deployments`, which every
    version of the model is deployed with, as an application of its own), `args.default_deployment` under
    DEFAULT_DEPLOYMENT."""
    found = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments") or []}
    args = app.get("args") or {}
    found.update(args.get("deployments") or {})
    if "default_deployment" in args:
        found[DEFAULT_DEPLOYMENT] = args["default_deployment"]
    return found


def replica_bounds(options: dict[str, Any]) -> tuple[int, int]:
    """(fewest, most) replicas of a deployment: its autoscaling bounds, or its fixed num_replicas."""
    scaling = options.get("autoscaling_config")
    if scaling:
        return scaling["min_replicas"], scaling["max_replicas"]
    replicas = options.get("num_replicas", 1)
    return replicas, replicas


def start_param_resources(group: dict[str, Any]) -> dict[str, float]:
    """The custom resources of a Ray node group's rayStartParams (`resources: '"{\\"name\\": 1}"'`, quoted for
    the shell KubeRay runs `ray start` in)."""
    import json

    text = (group.get("rayStartParams") or {}).get("resources")
    if not text:
        return {}
    assert text.startswith('"') and text.endswith('"'), f"resources must be a quoted JSON object: {text}"
    return json.loads(text[1:-1].replace('\\"', '"'))


# ---- schemas -------------------------------------------------------------------------------------------------


def _openapi_to_jsonschema(node: Any) -> Any:
    """A Kubernetes structural (OpenAPI v3) schema as JSON Schema: int-or-string and nullable spelled out,
    the x-kubernetes-* extensions dropped (CEL rules are the API server's; the strict walk below reads
    x-kubernetes-preserve-unknown-fields from the original)."""
    if isinstance(node, list):
        return [_openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _openapi_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")
           and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml, where PyYAML has it: 3 MB of YAML
    crd = yaml.load((CRDS / RAY_KINDS[kind]).read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


OBJECT_META_FIELDS = {"name", "namespace", "labels", "annotations", "generateName", "finalizers"}


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields of `value` that `schema` does not declare (what the API server would prune without a word).

    KubeRay's schemas do not set additionalProperties: false, so JSON Schema alone accepts a misspelt
    field; this walk rejects it."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(value, dict):
        if path == "/metadata":  # the root ObjectMeta: the API server's schema, not the CRD's
            return [f"{path}/{k}" for k in value if k not in OBJECT_META_FIELDS]
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                found += unknown_fields(item, properties[key], f"{path}/{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, f"{path}/{key}")
            elif extra is not True:
                found.append(f"{path}/{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}/{i}")
    return found


def validate_crd(obj: dict[str, Any]) -> list[str]:
    """Errors of a KubeRay object against its CRD: the JSON Schema, then undeclared fields."""
    schema = crd_schema(obj["kind"])
    validator = jsonschema.Draft7Validator(_openapi_to_jsonschema(schema))
    errors = [f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    errors += [f"{p}: field not declared in the {obj['kind']} CRD" for p in unknown_fields(obj, schema)]
    if obj.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion {obj.get('apiVersion')!r}, not ray.io/v1")
    return errors


def validate_standard(obj: dict[str, Any]) -> list[str]:
    """Errors of a built-in kind against Kubernetes' own schema (strict: unknown fields are errors)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"/{'/'.join(map(str, e.path))}: {e.message}"]
    return []


def pod_template_errors(obj: dict[str, Any]) -> list[str]:
    """Every pod template of a KubeRay object against Kubernetes' PodTemplate schema (strict): the API
    server's own view of containers, probes, volumes, on top of the CRD's copy of it."""
    errors = []
    for where, _, group in ray_groups(obj):
        template = copy.deepcopy(group["template"])
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        errors += [f"{where}: {e}" for e in validate_standard(doc)]
    return errors


def label_selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels and matchExpressions) against a set of labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pod_labels(node_type: str, group: dict[str, Any]) -> dict[str, str]:
    """A Ray pod's labels: its template's plus those KubeRay adds that selectors here rely on."""
    labels = dict(group["template"].get("metadata", {}).get("labels") or {})
    labels["ray.io/node-type"] = node_type
    return labels


def validate_monitoring(obj: dict[str, Any]) -> list[str]:
    """A structural check of the Prometheus Operator kinds (kubernetes-validate has no schema for them)."""
    errors = []
    if obj.get("apiVersion") != "monitoring.coreos.com/v1":
        errors.append(f"apiVersion {obj.get('apiVersion')!r}, not monitoring.coreos.com/v1")
    spec = obj.get("spec") or {}
    key = "endpoints" if obj["kind"] == "ServiceMonitor" else "podMetricsEndpoints"
    allowed_spec = {"selector", "namespaceSelector", key, "jobLabel", "podTargetLabels", "targetLabels",
                    "sampleLimit"}
    errors += [f"spec.{k}: not a field of {obj['kind']} (as used here)" for k in spec if k not in allowed_spec]
    selector = spec.get("selector") or {}
    if not (selector.get("matchLabels") or selector.get("matchExpressions")):
        errors.append("spec.selector: empty (it would select everything)")
    endpoints = spec.get(key) or []
    if not endpoints:
        errors.append(f"spec.{key}: none")
    allowed_endpoint = {"port", "path", "scheme", "interval", "scrapeTimeout", "relabelings",
                        "metricRelabelings", "honorLabels"}
    for i, endpoint in enumerate(endpoints):
        errors += [f"spec.{key}[{i}].{k}: unknown field" for k in endpoint if k not in allowed_endpoint]
        if not isinstance(endpoint.get("port"), str):
            errors.append(f"spec.{key}[{i}].port: a port name is required")
        if not str(endpoint.get("path", "/metrics")).startswith("/"):
            errors.append(f"spec.{key}[{i}].path: not absolute")
    return errors


def validate(obj: dict[str, Any]) -> list[str]:
    kind = obj.get("kind")
    if kind in RAY_KINDS:
        return validate_crd(obj) + pod_template_errors(obj)
    if kind in MONITORING_KINDS:
        return validate_monitoring(obj)
    return validate_standard(obj)
