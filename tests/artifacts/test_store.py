"""Model stores by URI: a path, file:// and s3:// (against moto's S3-compatible server on loopback)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from genserve.artifacts import artifact as art
from genserve.artifacts.store import LocalStore, RemoteStore, fetch_artifact, load_artifact_at, open_store
from genserve.service.cli import app
from genserve.service.local import LocalScorer
from genserve.training.gmm_pipeline import GMMTrainConfig, train_gmm
from tests.s3 import s3_server

BUCKET = "genserve-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    with s3_server(BUCKET, tmp_path_factory.mktemp("cache")) as uri:
        yield uri


def tiny_gmm(store: Path, name: str = "wine") -> Path:
    cfg = GMMTrainConfig(dataset="sklearn:wine", name=name, components=2, covariance_type="diag", n_init=1,
                         export_onnx=False)
    return train_gmm(cfg, store, progress=False)


def test_a_path_and_a_file_uri_open_the_same_local_store(tmp_path: Path) -> None:
    path = tiny_gmm(tmp_path / "store")
    for uri in (str(tmp_path / "store"), f"file://{tmp_path / 'store'}"):
        store = open_store(uri)
        assert isinstance(store, LocalStore)
        assert store.list_models() == {"wine": ["1"]}
        assert Path(store.location("wine")) == path.resolve()
        assert fetch_artifact(f"file://{path}") == path
    with pytest.raises(ValueError, match="unsupported scheme 'gs'"):
        open_store("gs://bucket/models")
    with pytest.raises(ValueError, match="names an absolute path"):
        open_store("file://model-store")


def test_training_into_s3_uploads_a_complete_version_and_serving_reads_it_back(s3: str, tmp_path: Path) -> None:
    uri = f"{s3}/runs/a"
    result = CliRunner().invoke(app, ["train", "gmm", "--dataset", "sklearn:wine", "--name", "wine",
                                      "--components", "2", "--restarts", "1", "--no-onnx", "--store", uri])
    assert result.exit_code == 0, result.output
    assert f"uploaded to {uri}/wine/1" in result.output
    store = open_store(uri)
    assert isinstance(store, RemoteStore)
    assert store.list_models() == {"wine": ["1"]}
    listed = CliRunner().invoke(app, ["models", "--store", uri])
    assert "wine\t1 (latest 1)" in listed.output

    # A second run is version 2 in the store, whatever the local mirror holds.
    result = CliRunner().invoke(app, ["train", "gmm", "--dataset", "sklearn:wine", "--name", "wine",
                                      "--components", "3", "--restarts", "1", "--no-onnx", "--store", uri])
    assert result.exit_code == 0, result.output
    assert store.versions("wine") == ["1", "2"]
    loaded = load_artifact_at(store.location("wine"))  # downloaded into the cache, every sha256 checked
    assert loaded.manifest.version == "2" and loaded.manifest.metrics["n_components"] == 3
    assert str(loaded.path).startswith(os.environ["GENSERVE_CACHE"])

    # Version 1 read back from S3 scores exactly as the directory training wrote before uploading it.
    from sklearn.datasets import load_wine

    records = load_wine().data[:20]
    mirror = Path(os.environ["GENSERVE_CACHE"]) / "mirrors" / "s3" / BUCKET / "runs" / "a" / "wine" / "1"
    remote = LocalScorer.from_store(uri, "wine", "1", runtime="torch").anomaly(records=records)
    written = LocalScorer(mirror, runtime="torch").anomaly(records=records)
    assert [r.score for r in remote.results] == [r.score for r in written.results]
    assert remote.model == "wine" and remote.version == "1"


def test_a_corrupt_download_is_refused_by_its_hash(s3: str) -> None:
    import boto3

    uri = f"{s3}/runs/corrupt"
    result = CliRunner().invoke(app, ["train", "gmm", "--dataset", "sklearn:wine", "--name", "wine",
                                      "--components", "2", "--restarts", "1", "--no-onnx", "--store", uri])
    assert result.exit_code == 0, result.output
    boto3.client("s3").put_object(Bucket=BUCKET, Key="runs/corrupt/wine/1/calibration.json", Body=b"{}")
    with pytest.raises(art.ArtifactError, match=r"calibration\.json: sha256 .* does not match"):
        load_artifact_at(open_store(uri).location("wine"))


def test_missing_models_and_versions_in_s3_are_clear_errors(s3: str) -> None:
    store = open_store(f"{s3}/empty")
    assert store.list_models() == {}
    with pytest.raises(art.ArtifactError, match="no model named 'nope'"):
        store.location("nope")
    with pytest.raises(art.ArtifactError, match="bucket 'no-such-bucket' does not exist"):
        open_store("s3://no-such-bucket/x").list_models()
