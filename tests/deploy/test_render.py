"""serveConfigV2 has one source of truth, deploy/serve/genserve.yaml: the committed manifests are what
deploy/k8s/render.py makes of it, the result is a valid Serve config, and only cluster settings differ.

The application's own deployments (the Gateway and the ModelRepository) are in `deployments:`; each model's
options are in `args.deployments` (every version of a model is an application of its own, which a Serve config
cannot name), and the cluster settings apply to both."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from genserve.service.app import CONTROL_DEPLOYMENTS, AppArgs
from genserve.service.cli import DEFAULT_MODELS, read_serve_config
from tests.deploy.manifests import DEFAULT_DEPLOYMENT, K8S, ROOT, app_deployments, load_all, serve_config

SOURCE = ROOT / "deploy" / "serve" / "genserve.yaml"
# What the renderer may change in a deployment; everything else (user_config, max_ongoing_requests...)
# must come through from the source unchanged.
CLUSTER_KEYS = {"num_replicas", "autoscaling_config", "ray_actor_options"}
# What it may change in the args: the deployment options (as above) and the management mode.
CLUSTER_ARGS = {"deployments", "default_deployment", "management"}


@pytest.fixture(scope="module")
def render():
    spec = importlib.util.spec_from_file_location("genserve_render", K8S / "render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_committed_files_are_rendered(render):
    stale = render.stale()
    assert not stale, "run `.venv/bin/python deploy/k8s/render.py`:\n" + "\n".join(stale.values())


def test_check_mode_notices_a_stale_file(render, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "rayservice.yaml"
    copy.write_text(render.RAYSERVICE.read_text().replace("target_ongoing_requests: 64", "target_ongoing_requests: 1"))
    monkeypatch.setattr(render, "RAYSERVICE", copy)
    monkeypatch.setattr(render, "ROOT", tmp_path)
    monkeypatch.setattr(render, "GPU_PATCH", tmp_path / "serve-config-gpu.yaml")
    assert render.main(["--check"]) == 1
    assert "target_ongoing_requests: 1" in capsys.readouterr().out
    assert render.main([]) == 0 and render.main(["--check"]) == 0  # rewritten, and current again


def committed_configs():
    (service,) = load_all(K8S / "base" / "rayservice.yaml")
    (patch,) = load_all(K8S / "overlays" / "gpu" / "serve-config-gpu.yaml")
    return {"cpu": serve_config(service), "gpu": serve_config(patch)}


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_rendered_config_is_a_serve_config_genserve_reads(variant, tmp_path):
    config = committed_configs()[variant]
    ServeDeploySchema.model_validate(config)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    http, args, overrides = read_serve_config(path)
    assert http == {"host": "0.0.0.0", "port": 8000}
    assert config["proxy_location"] == "EveryNode"
    AppArgs.model_validate(args)  # each model's options as Serve's DeploymentSchema takes them, too
    source = yaml.safe_load(SOURCE.read_text())
    src_args = source["applications"][0]["args"]
    assert {k: v for k, v in args.items() if k not in CLUSTER_ARGS} == \
        {k: v for k, v in src_args.items() if k not in CLUSTER_ARGS}
    assert set(args["deployments"]) == set(src_args["deployments"])
    assert set(overrides) == {d["name"] for d in source["applications"][0]["deployments"]} == set(CONTROL_DEPLOYMENTS)


def test_source_names_only_the_applications_own_deployments():
    """The models' options are in args.deployments (Serve refuses a config that names a deployment its application
    lacks), one entry for each default model; `deployments:` names the Gateway and the ModelRepository only, and the
    repository has one replica (it owns the served versions)."""
    source = yaml.safe_load(SOURCE.read_text())
    (app,) = source["applications"]
    ServeDeploySchema.model_validate(source)
    args = AppArgs.model_validate(app["args"])
    assert [d["name"] for d in app["deployments"]] == list(CONTROL_DEPLOYMENTS)
    repository = next(d for d in app["deployments"] if d["name"] == "ModelRepository")
    assert repository["num_replicas"] == 1 and "autoscaling_config" not in repository
    assert set(args.deployments) == set(DEFAULT_MODELS)
    assert args.management.control == "none"  # a laptop serves what is there; the cluster polls (below)


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_only_cluster_settings_differ_from_the_source(variant):
    source = yaml.safe_load(SOURCE.read_text())
    rendered = committed_configs()[variant]
    assert len(rendered["applications"]) == len(source["applications"]) == 1
    (src_app,), (app,) = source["applications"], rendered["applications"]
    assert {k: v for k, v in app.items() if k not in ("deployments", "args")} == \
        {k: v for k, v in src_app.items() if k not in ("deployments", "args")}
    assert [d["name"] for d in app["deployments"]] == [d["name"] for d in src_app["deployments"]]
    src_deployments = app_deployments(src_app)
    deployments = app_deployments(app)
    assert list(deployments) == list(src_deployments)
    for name, deployment in deployments.items():
        src = src_deployments[name]
        assert {k: v for k, v in deployment.items() if k not in CLUSTER_KEYS} == \
            {k: v for k, v in src.items() if k not in CLUSTER_KEYS}, name


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_cluster_polls_the_store(variant, render):
    """On the cluster the ModelRepository watches the store: a published version is loaded without a RayService
    change, at 0% traffic until promoted (docs/deploy.md, "Live model management"); the rest of the management
    settings are the source's."""
    source = yaml.safe_load(SOURCE.read_text())["applications"][0]["args"]["management"]
    (app,) = committed_configs()[variant]["applications"]
    management = AppArgs.model_validate(app["args"]).management
    assert management.control == "poll" and management.promote_new is False and management.poll_interval_s == 30
    assert app["args"]["management"] == {**source, **render.CLUSTER_MANAGEMENT}


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_deployments_autoscale(variant, render):
    """Every deployment but the ModelRepository autoscales (each model's versions alike, and a model the config does
    not name); the repository is one replica, pinned to the head by the custom resource only the head offers."""
    (app,) = committed_configs()[variant]["applications"]
    deployments = app_deployments(app)
    assert DEFAULT_DEPLOYMENT in deployments
    repository = deployments.pop("ModelRepository")
    assert repository["num_replicas"] == 1 and "autoscaling_config" not in repository
    assert repository["ray_actor_options"] == {"num_cpus": 0, "num_gpus": 0, "resources": {render.CONTROL_RESOURCE: 1}}
    for name, d in deployments.items():
        assert "num_replicas" not in d, name
        scaling = d["autoscaling_config"]
        assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"], name
        # A replica must be able to hold more than its target, or it never reports being above it.
        if "max_ongoing_requests" in d:
            assert scaling["target_ongoing_requests"] <= d["max_ongoing_requests"], name
        slots = (d.get("user_config") or {}).get("slots")
        if slots:
            assert scaling["target_ongoing_requests"] == slots, name
        assert d["ray_actor_options"]["num_cpus"] > 0
    gateway = deployments["Gateway"]
    assert gateway["autoscaling_config"]["min_replicas"] >= 2, "one Gateway replica is a single point of failure"
