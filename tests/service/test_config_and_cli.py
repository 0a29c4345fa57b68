"""The Serve config file, the CLI, and README's promises, without starting Ray."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema
from typer.testing import CliRunner

from genserve.artifacts import artifact as art
from genserve.service.app import CONTROL_DEPLOYMENTS, AppArgs
from genserve.service.cli import DEFAULT_MODELS, app, read_serve_config
from genserve.service.records import RecordsOptions

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "deploy" / "serve" / "genserve.yaml"
runner = CliRunner()


def test_serve_config_is_a_valid_serve_config_for_the_default_models() -> None:
    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    (application,) = config.applications
    assert application.import_path == "genserve.service.app:build_app"
    args = AppArgs.model_validate(application.args)
    # The application's own deployments; each model's options are in args.deployments (its versions' apps).
    assert {d.name for d in application.deployments} <= set(CONTROL_DEPLOYMENTS)
    assert set(args.deployments) == set(DEFAULT_MODELS)
    for options in args.deployments.values():
        RecordsOptions.model_validate(options["user_config"])

    http, args, overrides = read_serve_config(SERVE_CONFIG)
    assert http["port"] == 8000 and args["limits"]["max_records_per_request"] == 10_000
    assert args["deployments"]["wine"]["user_config"]["runtime"] == "auto"
    assert set(overrides) <= set(CONTROL_DEPLOYMENTS)


def test_a_config_with_model_deployments_beside_the_gateway_still_serves(tmp_path: Path) -> None:
    """The layout from before live model management: `genserve serve` moves model options into args.deployments."""
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{
        "name": "genserve", "import_path": "genserve.service.app:build_app", "args": {"models": ["wine"]},
        "deployments": [{"name": "Gateway", "num_replicas": 2}, {"name": "wine", "num_replicas": 3}]}]}))
    _, args, overrides = read_serve_config(config)
    assert overrides == {"Gateway": {"num_replicas": 2}}
    assert args["deployments"] == {"wine": {"num_replicas": 3}}
    AppArgs.model_validate(args)


def test_model_deployment_options_are_checked_as_serve_would() -> None:
    with pytest.raises(ValueError, match=r"deployments\.wine"):
        AppArgs.model_validate({"deployments": {"wine": {"num_replica": 2}}})
    with pytest.raises(ValueError, match="named after the model"):
        AppArgs.model_validate({"deployments": {"wine": {"name": "other"}}})
    with pytest.raises(ValueError, match="one of latest, all or specific"):
        AppArgs.model_validate({"management": {"version_policy": {"all": {}, "latest": {"num_versions": 2}}}})
    with pytest.raises(ValueError, match="control"):
        AppArgs.model_validate({"management": {"control": "sometimes"}})


def test_train_gmm_and_list_models(tmp_path: Path) -> None:
    store = tmp_path / "store"
    args = ["train", "gmm", "--dataset", "sklearn:iris", "--name", "iris", "--store", str(store),
            "--components", "2", "--restarts", "1", "--no-onnx"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "bits/dim" in result.output
    loaded = art.load_artifact(art.resolve(store, "iris"))
    assert loaded.manifest.metrics["n_components"] == 2 and art.ONNX not in loaded.contents
    assert runner.invoke(app, args).exit_code == 0  # a second version
    listing = runner.invoke(app, ["models", "--store", str(store)])
    assert listing.exit_code == 0 and re.search(r"iris\s+1, 2 \(latest 2\)", listing.output)


def test_train_refuses_bad_options_with_a_message(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "gmm", "--dataset", "sklearn:nope", "--name", "x",
                                 "--store", str(tmp_path)])
    assert result.exit_code == 2 and "breast_cancer" in result.output
    result = runner.invoke(app, ["train", "gmm", "--dataset", "sklearn:iris", "--name", "Bad Name",
                                 "--store", str(tmp_path)])
    assert result.exit_code == 2 and "invalid model name" in result.output
    result = runner.invoke(app, ["train", "gmm", "--dataset", "sklearn:iris", "--name", "x",
                                 "--covariance", "spherical", "--store", str(tmp_path)])
    assert result.exit_code == 2 and "full or diag" in result.output


def test_readme_opens_with_the_two_commands_that_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    assert "make serve" in first_block and "make test" in first_block
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_default_deployments_fit_a_two_core_machine() -> None:
    """Ray places a replica only where its logical CPUs fit: on a 2-core laptop the defaults must sum to <= 2."""
    _, args, overrides = read_serve_config(Path("deploy/serve/genserve.yaml"))
    total = sum(o.get("ray_actor_options", {}).get("num_cpus", 1) * o.get("num_replicas", 1)
                for o in [*overrides.values(), *args["deployments"].values()])
    assert total <= 2.0


def test_train_image_model_from_the_cli(tmp_path: Path) -> None:
    args = ["train", "fvsbn", "--dataset", "digits", "--name", "dig", "--store", str(tmp_path), "--preset", "tiny",
            "--epochs", "1", "--conditional", "--threads", "1", "--sample-every", "0", "--no-onnx"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "test NLL" in result.output and "bits/dim" in result.output
    manifest = art.load_artifact(art.resolve(tmp_path, "dig")).manifest
    assert manifest.kind == "fvsbn" and manifest.input.n_classes == 10 and art.ONNX not in manifest.files
    bad = runner.invoke(app, ["train", "made", "--dataset", "digits", "--name", "x", "--store", str(tmp_path),
                              "--arch", "depth=3"])
    assert bad.exit_code == 2 and "no architecture fields ['depth']" in bad.output
    bad = runner.invoke(app, ["train", "nade", "--dataset", "cifar10", "--name", "x", "--store", str(tmp_path)])
    assert bad.exit_code == 2 and "mnist5k, digits" in bad.output
