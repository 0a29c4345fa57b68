"""serveConfigV2 has one source of truth, deploy/serve/genserve.yaml: the committed manifests are what
deploy/k8s/render.py makes of it, the result is a valid Serve config, and only cluster settings differ."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from genserve.service.cli import read_serve_config
from tests.deploy.manifests import K8S, ROOT, load_all, serve_config

SOURCE = ROOT / "deploy" / "serve" / "genserve.yaml"
# What the renderer may change in a deployment; everything else (user_config, max_ongoing_requests...)
# must come through from the source unchanged.
CLUSTER_KEYS = {"num_replicas", "autoscaling_config", "ray_actor_options"}


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
    source = yaml.safe_load(SOURCE.read_text())
    assert args == source["applications"][0]["args"]
    assert set(overrides) == {d["name"] for d in source["applications"][0]["deployments"]}


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_only_cluster_settings_differ_from_the_source(variant):
    source = yaml.safe_load(SOURCE.read_text())
    rendered = committed_configs()[variant]
    assert len(rendered["applications"]) == len(source["applications"]) == 1
    (src_app,), (app,) = source["applications"], rendered["applications"]
    assert {k: v for k, v in app.items() if k != "deployments"} == {k: v for k, v in src_app.items()
                                                                      if k != "deployments"}
    src_deployments = {d["name"]: d for d in src_app["deployments"]}
    assert [d["name"] for d in app["deployments"]] == list(src_deployments)
    for deployment in app["deployments"]:
        src = src_deployments[deployment["name"]]
        assert {k: v for k, v in deployment.items() if k not in CLUSTER_KEYS} == \
            {k: v for k, v in src.items() if k not in CLUSTER_KEYS}, deployment["name"]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_deployments_autoscale(variant):
    (app,) = committed_configs()[variant]["applications"]
    for d in app["deployments"]:
        assert "num_replicas" not in d, d["name"]
        scaling = d["autoscaling_config"]
        assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"], d["name"]
        # A replica must be able to hold more than its target, or it never reports being above it.
        if "max_ongoing_requests" in d:
            assert scaling["target_ongoing_requests"] <= d["max_ongoing_requests"], d["name"]
        slots = (d.get("user_config") or {}).get("slots")
        if slots:
            assert scaling["target_ongoing_requests"] == slots, d["name"]
        assert d["ray_actor_options"]["num_cpus"] > 0
    gateway = next(d for d in app["deployments"] if d["name"] == "Gateway")
    assert gateway["autoscaling_config"]["min_replicas"] >= 2, "one Gateway replica is a single point of failure"
