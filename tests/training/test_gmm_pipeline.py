"""`train_gmm` end to end on a small CSV file: artifact contents, both runtimes, metrics, data errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from genserve.artifacts import artifact as art
from genserve.artifacts.calibration import Calibration, CalibrationSet
from genserve.artifacts.neighbours import NEIGHBOURS_CONFIG, NEIGHBOURS_WEIGHTS
from genserve.artifacts.reference import REFERENCE_CONFIG, REFERENCE_WEIGHTS
from genserve.service.records_runtime import load_model
from genserve.training.data import SKLEARN_DATASETS, Tabular, load_tabular, split
from genserve.training.gmm_pipeline import EM_HISTORY, GMMTrainConfig, train_gmm

FEATURES = ["alpha", "beta", "gamma"]


def write_csv(path: Path, n: int = 300, seed: int = 0) -> Path:
    """3 numeric features from a well-separated 2-component mixture on different scales, plus a label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    centres = np.array([[0.0, 0.0, 0.0], [6.0, -5.0, 4.0]])
    x = centres[labels] + rng.normal(size=(n, 3)) @ np.array([[1.0, 0.3, 0.0], [0.0, 0.8, 0.2], [0.0, 0.0, 0.5]])
    x = x * np.array([1.0, 10.0, 0.1]) + np.array([100.0, 0.0, -3.0])
    with path.open("w") as f:
        f.write(",".join([FEATURES[0], "label", *FEATURES[1:]]) + "\n")  # label column in the middle
        for row, label in zip(x, labels, strict=True):
            f.write(f"{float(row[0])!r},{'ab'[label]},{float(row[1])!r},{float(row[2])!r}\n")
    return path


def validation_records(manifest: art.Manifest, csv_path: Path) -> np.ndarray:
    data = load_tabular(str(csv_path), label_column="label")
    parts = split(data.x, manifest.training["validation_fraction"], manifest.training["split_seed"])
    return parts.validation


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    csv_path = write_csv(root / "mix.csv")
    cfg = GMMTrainConfig(dataset=str(csv_path), name="mix", components=2, label_column="label",
                         export_onnx=True, n_init=2, max_iter=100)
    path = train_gmm(cfg, root / "store", progress=False)
    return path, csv_path


def test_artifact_contents(trained):
    path, csv_path = trained
    assert path.parent.name == "mix"
    assert path.name == "1"
    loaded = art.load_artifact(path)
    manifest = loaded.manifest
    assert manifest.kind == "gmm"
    assert set(manifest.files) == {art.WEIGHTS, art.CALIBRATION, art.ONNX, EM_HISTORY, REFERENCE_WEIGHTS,
                                   REFERENCE_CONFIG, NEIGHBOURS_WEIGHTS, NEIGHBOURS_CONFIG}
    assert manifest.config == {"n_features": 3, "n_components": 2, "covariance_type": "full"}
    assert manifest.input.n_features == 3
    assert manifest.input.feature_names == FEATURES
    assert manifest.training["dataset"] == str(csv_path)
    assert manifest.training["n_train"] + manifest.training["n_validation"] == 300
    assert manifest.training["n_validation"] == 60
    assert manifest.metrics["n_components"] == 2
    assert manifest.metrics["onnx_max_abs_error"] <= 1e-4
    history = loaded.json(EM_HISTORY)
    assert len(history["iterations"]) == manifest.metrics["em_iterations"] + 1


def test_both_runtimes_agree(trained):
    path, csv_path = trained
    torch_model = load_model(str(path), runtime="torch", device="cpu")
    onnx_model = load_model(str(path), runtime="onnx", device="cpu")
    auto_model = load_model(str(path), runtime="auto", device="cpu")
    assert torch_model.runtime.name == "torch"
    assert onnx_model.runtime.name == "onnx"
    # auto, with a graph: both timed at load, the faster serves
    seconds = auto_model.choice.seconds
    assert auto_model.runtime.name == min(seconds, key=lambda name: sum(seconds[name].values()))
    assert torch_model.n_features == 3

    x = validation_records(torch_model.artifact.manifest, csv_path)
    lp_torch, resp_torch = torch_model.runtime.log_prob(x)
    lp_onnx, resp_onnx = onnx_model.runtime.log_prob(x)
    assert lp_torch.shape == lp_onnx.shape == (60,)
    assert resp_torch.shape == resp_onnx.shape == (60, 2)
    assert np.all(np.abs(lp_torch - lp_onnx) <= 1e-4 * np.maximum(1.0, np.abs(lp_torch)))
    np.testing.assert_allclose(resp_onnx, resp_torch, atol=1e-6)
    np.testing.assert_allclose(resp_torch.sum(-1), 1.0, atol=1e-12)
    # a batch size the export example never had
    lp_one, _ = onnx_model.runtime.log_prob(x[:1])
    assert abs(lp_one[0] - lp_torch[0]) <= 1e-4 * max(1.0, abs(lp_torch[0]))


def test_metrics_are_consistent(trained):
    path, csv_path = trained
    loaded = load_model(str(path), runtime="torch", device="cpu")
    metrics = loaded.artifact.manifest.metrics
    d = 3
    assert metrics["validation_bits_per_dim"] == pytest.approx(metrics["validation_nll_nats"] / (d * math.log(2)),
                                                               rel=1e-12)
    assert metrics["validation_log_likelihood_per_record"] == pytest.approx(-metrics["validation_nll_nats"])

    x = validation_records(loaded.artifact.manifest, csv_path)
    lp, _ = loaded.runtime.log_prob(x)
    assert metrics["validation_nll_nats"] == pytest.approx(-lp.mean(), rel=1e-12)

    calibrations = CalibrationSet.from_dict(json.loads((path / art.CALIBRATION).read_text()))
    assert loaded.calibration == calibrations
    assert sorted(calibrations.names()) == ["bits_per_dim", "ensemble", "knn", "likelihood_ratio", "nll",
                                            "typicality"]
    # The default and why, chosen on the validation split, in the calibration and the manifest alike.
    assert calibrations.default == "ensemble" and len(calibrations.members) >= 2
    assert metrics["anomaly_default_score"] == {"score": "ensemble", "why": calibrations.why}
    calibration = calibrations.get("nll")
    assert calibration.threshold == metrics["anomaly_threshold_nll_nats"]
    assert calibration.false_positive_rate == metrics["anomaly_false_positive_rate"]
    # 60 validation records are too few for a 1% threshold: every record is scored out of fold instead
    assert calibration.n == 300 and metrics["anomaly_calibration"] == {"cross_fitted_folds": 5, "records": 300}
    assert calibration.threshold > np.quantile(-lp, 0.5)
    # the model's density is that of the raw records: a far-away record is much less likely
    far = x[:1] + np.array([[50.0, 500.0, 5.0]])
    assert loaded.runtime.log_prob(far)[0][0] < lp.min() - 10


def test_sample_from_loaded_module(trained):
    path, csv_path = trained
    loaded = load_model(str(path), runtime="torch", device="cpu")
    samples = loaded.module.sample(4000, generator=torch.Generator().manual_seed(0)).numpy()
    data = load_tabular(str(csv_path), label_column="label").x
    # samples are in raw units: their mean matches the data's mean to a fraction of its spread
    assert np.all(np.abs(samples.mean(0) - data.mean(0)) < 0.15 * data.std(0))


def test_bic_selection_without_onnx(tmp_path):
    csv_path = write_csv(tmp_path / "mix.csv", seed=1)
    cfg = GMMTrainConfig(dataset=str(csv_path), name="mix-bic", components=None, max_components=3,
                         label_column="label", export_onnx=False, n_init=1, max_iter=100)
    path = train_gmm(cfg, tmp_path / "store", progress=False)
    manifest = art.load_artifact(path).manifest
    assert art.ONNX not in manifest.files
    assert set(manifest.metrics["bic_by_components"]) == {"1", "2", "3"}
    bic = {int(k): v for k, v in manifest.metrics["bic_by_components"].items()}
    assert manifest.metrics["n_components"] == min(bic, key=bic.get) == 2
    assert manifest.metrics["bic"] == pytest.approx(bic[2])
    assert "onnx_max_abs_error" not in manifest.metrics

    with pytest.raises(art.ArtifactError, match=re.escape(art.ONNX)):
        load_model(str(path), runtime="onnx", device="cpu")
    auto = load_model(str(path), runtime="auto", device="cpu")
    assert auto.runtime.name == "torch"
    assert auto.module.config.n_components == 2
    with pytest.raises(ValueError, match="unknown runtime"):
        load_model(str(path), runtime="tensorrt", device="cpu")

    # a second training run is version 2 of the same name
    again = train_gmm(cfg, tmp_path / "store", progress=False)
    assert again.name == "2"


def test_train_rejects_bad_name(tmp_path):
    with pytest.raises(ValueError, match="invalid model name"):
        train_gmm(GMMTrainConfig(dataset="sklearn:iris", name="Bad Name"), tmp_path, progress=False)


def test_load_model_with_unparseable_weights(tmp_path):
    cal = Calibration.fit(np.arange(10.0))
    path = art.write_artifact(
        tmp_path,
        kind="gmm",
        name="broken",
        config={"n_features": 1, "n_components": 1, "covariance_type": "full"},
        input_spec=art.InputSpec(n_features=1, feature_names=["a"]),
        training={},
        metrics={},
        files={art.WEIGHTS: b"this is not a safetensors file", art.CALIBRATION: json.dumps(cal.to_dict()).encode()},
    )
    with pytest.raises(art.ArtifactError, match=re.escape(art.WEIGHTS)):
        load_model(str(path), runtime="torch", device="cpu")


# ---- data errors --------------------------------------------------------------------------------


def test_load_tabular_csv(tmp_path):
    csv_path = write_csv(tmp_path / "mix.csv")
    data = load_tabular(str(csv_path), label_column="label")
    assert data.x.shape == (300, 3)
    assert data.x.dtype == np.float64
    assert data.feature_names == FEATURES
    with pytest.raises(ValueError, match="non-numeric"):
        load_tabular(str(csv_path))  # the label column is kept, and it is not numeric


def test_non_numeric_cell_names_the_line(tmp_path):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("a,b\n1,2\n\n3,4\n5,oops\n")
    with pytest.raises(ValueError, match="non-numeric") as err:
        load_tabular(str(csv_path))
    assert f"{csv_path}:5:" in str(err.value)


def test_line_number_after_multiline_quoted_field(tmp_path):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text('a,note,b\n1,"two\nlines",2\n3,x,oops\n')  # the bad value is on line 4
    with pytest.raises(ValueError) as err:
        load_tabular(str(csv_path), label_column="note")
    assert f"{csv_path}:4:" in str(err.value)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a,b\n1,2\n3\n", r":3: 1 fields, the header has 2"),
        ("a,b\n1,nan\n", r":2: NaN or infinite"),
        ("a,b\n1,inf\n", r":2: NaN or infinite"),
        ("", "empty"),
        ("a,b\n\n", "no data rows"),
    ],
)
def test_csv_errors(tmp_path, text, match):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_tabular(str(csv_path))


def test_missing_label_column_and_missing_file(tmp_path):
    csv_path = tmp_path / "ok.csv"
    csv_path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="label column 'y'"):
        load_tabular(str(csv_path), label_column="y")
    with pytest.raises(FileNotFoundError):
        load_tabular(str(tmp_path / "absent.csv"))
    with pytest.raises(ValueError, match="unknown dataset"):
        load_tabular(str(tmp_path / "data.parquet"))


def test_unknown_sklearn_dataset():
    with pytest.raises(ValueError, match="unknown scikit-learn dataset 'nope'") as err:
        load_tabular("sklearn:nope")
    for name in SKLEARN_DATASETS:
        assert name in str(err.value)


def test_sklearn_dataset():
    data = load_tabular("sklearn:iris")
    assert data.x.shape == (150, 4)
    assert data.source == "sklearn:iris"
    assert len(data.feature_names) == 4


def test_split():
    x = np.arange(100.0).reshape(50, 2)
    a = split(x, 0.2, seed=3)
    b = split(x, 0.2, seed=3)
    assert a.validation.shape == (10, 2)
    assert a.train.shape == (40, 2)
    np.testing.assert_array_equal(a.validation, b.validation)
    together = np.concatenate([a.train, a.validation])
    np.testing.assert_array_equal(np.sort(together[:, 0]), x[:, 0])
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="validation fraction"):
            split(x, bad, seed=0)
    with pytest.raises(ValueError, match="too few"):
        split(x[:2], 0.5, seed=0)


def test_cross_fitted_calibration_flags_the_requested_rate_of_fresh_records(tmp_path):
    """A GMM fitted on 250 records (50 held out) calibrated on cross-fitted scores of all 250: on 20,000 fresh
    records from the same mixture its nll thresholds flag the requested rates, within 3 standard errors of a
    threshold placed on 250 items."""
    rng = np.random.default_rng(11)
    centres = np.array([[0.0, 0.0, 0.0, 0.0], [4.0, 4.0, 0.0, 0.0]])

    def draw(n):
        return centres[rng.integers(0, 2, n)] + rng.normal(size=(n, 4))

    x = draw(250)
    data = Tabular(x, [f"x{i}" for i in range(4)], "synthetic")
    path = train_gmm(GMMTrainConfig(dataset="synthetic", name="cross", components=2, n_init=2, export_onnx=False),
                     tmp_path, progress=False, data=data)
    loaded = load_model(str(path), runtime="torch", device="cpu")
    nll = loaded.calibration.get("nll")
    assert nll.n == 250
    fresh = -loaded.runtime.log_prob(draw(20_000))[0]
    for rate in (0.05, 0.1):
        flagged = np.mean(fresh > nll.threshold_for(rate))
        assert abs(flagged - rate) < 3 * np.sqrt(rate * (1 - rate) * (1 / 20_000 + 1 / 250))
