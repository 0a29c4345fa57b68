"""`genserve train realnvp|made-mog`: tabular density models beside the GMM, served by the same runtimes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from genserve.artifacts import artifact as art
from genserve.service.cli import app
from genserve.service.local import LocalScorer
from genserve.service.records_runtime import load_model
from genserve.training.records_pipeline import RecordsTrainConfig, train_records


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    store = tmp_path_factory.mktemp("store")
    return {kind: train_records(RecordsTrainConfig(model=kind, dataset="sklearn:wine", name=f"wine-{kind}",
                                                   epochs=30, architecture={"hidden": 32} if kind == "realnvp"
                                                   else {"hidden": [32, 32]}), store, progress=False)
            for kind in ("realnvp", "made-mog")}


@pytest.mark.parametrize("kind", ["realnvp", "made-mog"])
def test_a_complete_artifact_whose_density_is_exact(trained, kind) -> None:
    loaded = art.load_artifact(trained[kind])
    m = loaded.manifest
    assert m.kind == kind and m.density == "exact" and m.input.n_features == 13
    assert {art.WEIGHTS, art.ONNX, art.CALIBRATION, "loss_curve.png", "training_log.json"} <= set(m.files)
    assert m.metrics["onnx_max_abs_error"] < 1e-4
    assert 1 <= m.metrics["best_epoch"] <= 30
    # Trained: far better than the standardised data under a standard normal per feature.
    history = json.loads(loaded.contents["training_log.json"])
    assert history["epochs"][m.metrics["best_epoch"] - 1]["validation_nll"] == pytest.approx(
        m.metrics["validation_nll_nats"])
    assert m.metrics["validation_nll_nats"] < history["epochs"][0]["validation_nll"]


@pytest.mark.parametrize("kind", ["realnvp", "made-mog"])
def test_served_by_the_records_runtimes_torch_and_onnx_alike(trained, kind) -> None:
    from sklearn.datasets import load_wine

    records = load_wine().data[:50]
    torch_rt = load_model(str(trained[kind]), "torch", "cpu")
    onnx_rt = load_model(str(trained[kind]), "onnx", "cpu")
    lp_torch, resp_torch = torch_rt.runtime.log_prob(records)
    lp_onnx, resp_onnx = onnx_rt.runtime.log_prob(records)
    np.testing.assert_allclose(lp_onnx, lp_torch, rtol=1e-6, atol=1e-6)
    assert resp_torch.shape == resp_onnx.shape == (50, 0)  # not a mixture: no responsibilities
    samples = torch_rt.module.sample(200, torch.Generator().manual_seed(0)).numpy()
    assert samples.shape == (200, 13) and np.isfinite(samples).all()
    # Samples land where the data is: their log-density under the model is like the data's.
    lp_samples, _ = torch_rt.runtime.log_prob(samples)
    assert np.median(lp_samples) > np.median(lp_torch) - 10
    scored = LocalScorer(trained[kind], runtime="torch").anomaly(records=np.vstack([records[:1], records[:1] * 3]))
    assert [r.is_anomaly for r in scored.results] == [False, True]
    assert scored.density == "exact" and scored.results[0].component is None


def test_the_cli_trains_them_and_refuses_image_datasets(tmp_path) -> None:
    result = CliRunner().invoke(app, ["train", "made-mog", "--dataset", "sklearn:iris", "--name", "iris-mog",
                                      "--epochs", "5", "--arch", "hidden=[16]", "--no-onnx", "--store",
                                      str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "made-mog" in result.output and "validation NLL" in result.output
    assert art.list_models(tmp_path) == {"iris-mog": ["1"]}
    result = CliRunner().invoke(app, ["train", "made-mog", "--dataset", "digits", "--name", "x", "--store",
                                      str(tmp_path)])
    assert result.exit_code == 2 and "made-mog trains on records" in result.output
    # realnvp on an image dataset is the image flow: checkerboard and channel couplings, dequantised.
    result = CliRunner().invoke(app, ["train", "realnvp", "--dataset", "digits", "--name", "digits-flow",
                                      "--preset", "tiny", "--store", str(tmp_path)])
    assert result.exit_code == 0, result.output
    manifest = art.load_artifact(art.resolve(tmp_path, "digits-flow")).manifest
    assert manifest.kind == "realnvp" and manifest.input.type == "image" and manifest.density == "bound"
    result = CliRunner().invoke(app, ["train", "realnvp", "--dataset", "sklearn:iris", "--name", "x",
                                      "--arch", "width=3", "--store", str(tmp_path)])
    assert result.exit_code == 2 and "unknown fields ['width']" in result.output


def test_artifacts_from_before_the_density_field_read_as_exact(trained, tmp_path) -> None:
    import shutil

    copy = tmp_path / "old" / "1"
    shutil.copytree(trained["realnvp"], copy)
    manifest = json.loads((copy / art.MANIFEST).read_text())
    del manifest["density"]
    (copy / art.MANIFEST).write_text(json.dumps(manifest))
    assert art.load_artifact(copy).manifest.density == "exact"
