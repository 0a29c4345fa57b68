"""The artifact format: atomic versioned writes, verified reads, and errors that name the file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from genserve.artifacts import artifact as art
from genserve.artifacts.artifact import ArtifactError, InputSpec, load_artifact, resolve, store_path, write_artifact

WEIGHTS_BYTES = b"\x00weights\xff" * 10
CALIBRATION_BYTES = json.dumps({"threshold": 1.5}).encode()


def write(store: Path, name: str = "demo", **overrides) -> Path:
    kwargs = dict(
        kind="gmm",
        name=name,
        config={"n_features": 2, "n_components": 1, "covariance_type": "full"},
        input_spec=InputSpec(n_features=2, feature_names=["a", "b"]),
        training={"dataset": "x.csv", "n_train": 10},
        metrics={"validation_nll_nats": 1.25},
        files={art.WEIGHTS: WEIGHTS_BYTES, art.CALIBRATION: CALIBRATION_BYTES},
    )
    kwargs.update(overrides)
    return write_artifact(store, **kwargs)


def test_round_trip(tmp_path):
    path = write(tmp_path)
    assert path == tmp_path / "demo" / "1"
    loaded = load_artifact(path)
    assert loaded.path == path
    assert loaded.name == "demo"
    assert loaded.version == "1"
    assert loaded.manifest.format_version == art.FORMAT_VERSION
    assert loaded.manifest.kind == "gmm"
    assert loaded.manifest.config == {"n_features": 2, "n_components": 1, "covariance_type": "full"}
    assert loaded.manifest.input.feature_names == ["a", "b"]
    assert loaded.manifest.metrics == {"validation_nll_nats": 1.25}
    assert loaded.manifest.training["n_train"] == 10
    assert "python" in loaded.manifest.libraries
    assert loaded.contents == {art.WEIGHTS: WEIGHTS_BYTES, art.CALIBRATION: CALIBRATION_BYTES}
    assert loaded.json(art.CALIBRATION) == {"threshold": 1.5}
    entry = loaded.manifest.files[art.WEIGHTS]
    assert entry.bytes == len(WEIGHTS_BYTES)
    assert entry.sha256 == art.sha256(WEIGHTS_BYTES)
    # nothing but the version directory is left behind (no .incomplete-* temporaries)
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["1"]


def test_versions_increment_and_resolve(tmp_path):
    first = write(tmp_path)
    second = write(tmp_path, metrics={"validation_nll_nats": 0.5})
    assert (first.name, second.name) == ("1", "2")
    assert art.versions(tmp_path, "demo") == ["1", "2"]
    assert resolve(tmp_path, "demo") == second
    assert resolve(tmp_path, "demo", "latest") == second
    assert resolve(tmp_path, "demo", "1") == first
    assert load_artifact(resolve(tmp_path, "demo")).manifest.metrics == {"validation_nll_nats": 0.5}
    write(tmp_path, name="other")
    assert art.list_models(tmp_path) == {"demo": ["1", "2"], "other": ["1"]}


def test_versions_sort_numerically_and_ignore_incomplete(tmp_path):
    for _ in range(10):
        write(tmp_path)
    (tmp_path / "demo" / ".incomplete-abc").mkdir()  # a writer's temporary
    (tmp_path / "demo" / "notes").mkdir()
    assert art.versions(tmp_path, "demo")[-2:] == ["9", "10"]
    assert resolve(tmp_path, "demo").name == "10"
    assert write(tmp_path).name == "11"


def test_numbered_directory_without_manifest_is_skipped(tmp_path):
    write(tmp_path)
    (tmp_path / "demo" / "2").mkdir()  # no manifest: not a version, but its number is taken
    assert art.versions(tmp_path, "demo") == ["1"]
    assert write(tmp_path).name == "3"
    assert art.versions(tmp_path, "demo") == ["1", "3"]


HANG_SCRIPT = """
import sys
from pathlib import Path
from genserve.artifacts import artifact as art
store = Path(sys.argv[1])
art.write_artifact(store, kind="gmm", name="demo", config={}, training={}, metrics={},
                   input_spec=art.InputSpec(n_features=1, feature_names=["a"]), files={art.WEIGHTS: b"w"})
print("wrote")
"""


def test_write_with_stale_non_empty_version_directory_terminates(tmp_path):
    write(tmp_path)
    stale = tmp_path / "demo" / "2"
    stale.mkdir()
    (stale / art.WEIGHTS).write_bytes(b"partial copy")
    # In a subprocess: the hang cannot be interrupted in-process; run() kills the child on timeout.
    done = subprocess.run([sys.executable, "-c", HANG_SCRIPT, str(tmp_path)], timeout=3, capture_output=True,
                          text=True, cwd=Path(art.__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert art.versions(tmp_path, "demo")[-1] in {"2", "3"}


def test_resolve_errors(tmp_path):
    with pytest.raises(ArtifactError, match="no model named 'nope'"):
        resolve(tmp_path, "nope")
    write(tmp_path)
    with pytest.raises(ArtifactError, match=r"no version '7'.*available: 1"):
        resolve(tmp_path, "demo", "7")


def test_write_rejects_manifest_in_files_and_bad_names(tmp_path):
    with pytest.raises(ValueError, match=re.escape(art.MANIFEST)):
        write(tmp_path, files={art.WEIGHTS: b"w", art.MANIFEST: b"{}"})
    with pytest.raises(ValueError, match="invalid model name"):
        write(tmp_path, name="Bad Name")
    assert not (tmp_path / "Bad Name").exists()


@pytest.mark.parametrize("name", ["Bad Name", "../x", "", "-lead", "UPPER", "a/b", "x" * 64])
def test_validate_name_rejects(name):
    with pytest.raises(ValueError, match="invalid model name"):
        art.validate_name(name)


@pytest.mark.parametrize("name", ["a", "iris-full", "bc_2.v1", "0model", "x" * 63])
def test_validate_name_accepts(name):
    assert art.validate_name(name) == name


def test_modified_weights_file(tmp_path):
    path = write(tmp_path)
    weights = path / art.WEIGHTS
    weights.write_bytes(WEIGHTS_BYTES[:-1] + b"!")
    with pytest.raises(ArtifactError, match="sha256") as err:
        load_artifact(path)
    assert str(weights) in str(err.value)


def test_missing_listed_file(tmp_path):
    path = write(tmp_path)
    (path / art.CALIBRATION).unlink()
    with pytest.raises(ArtifactError, match="missing") as err:
        load_artifact(path)
    assert str(path / art.CALIBRATION) in str(err.value)


def rewrite_manifest(path: Path, **changes) -> Path:
    manifest_path = path / art.MANIFEST
    raw = json.loads(manifest_path.read_text())
    raw.update(changes)
    manifest_path.write_text(json.dumps(raw))
    return manifest_path


def test_unsupported_format_version(tmp_path):
    manifest_path = rewrite_manifest(write(tmp_path), format_version=999)
    with pytest.raises(ArtifactError, match="format_version 999") as err:
        load_artifact(manifest_path.parent)
    assert str(manifest_path) in str(err.value)


def test_manifest_not_json(tmp_path):
    path = write(tmp_path)
    (path / art.MANIFEST).write_text("{ this is not json")
    with pytest.raises(ArtifactError, match="not valid JSON") as err:
        load_artifact(path)
    assert str(path / art.MANIFEST) in str(err.value)


def test_manifest_json_but_not_an_object(tmp_path):
    path = write(tmp_path)
    (path / art.MANIFEST).write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="format_version") as err:
        load_artifact(path)
    assert str(path / art.MANIFEST) in str(err.value)


def test_manifest_binary_garbage(tmp_path):
    path = write(tmp_path)
    (path / art.MANIFEST).write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ArtifactError, match=re.escape(art.MANIFEST)):
        load_artifact(path)


def test_manifest_missing(tmp_path):
    path = write(tmp_path)
    (path / art.MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="missing") as err:
        load_artifact(path)
    assert str(path / art.MANIFEST) in str(err.value)
    with pytest.raises(ArtifactError, match="missing"):
        load_artifact(tmp_path / "no-such-dir")


def test_manifest_invalid_fields(tmp_path):
    manifest_path = rewrite_manifest(write(tmp_path), name="Not Valid", surprise=1)
    with pytest.raises(ArtifactError, match="invalid manifest") as err:
        load_artifact(manifest_path.parent)
    assert str(manifest_path) in str(err.value)


def test_manifest_file_entry_escaping_the_directory(tmp_path):
    path = write(tmp_path)
    (tmp_path / "secret").write_bytes(b"s")
    raw = json.loads((path / art.MANIFEST).read_text())
    raw["files"]["../../secret"] = {"sha256": art.sha256(b"s"), "bytes": 1}
    (path / art.MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="not a plain file name"):
        load_artifact(path)


def test_manifest_empty_file_entry(tmp_path):
    path = write(tmp_path)
    raw = json.loads((path / art.MANIFEST).read_text())
    raw["files"][""] = {"sha256": art.sha256(b""), "bytes": 0}
    (path / art.MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ArtifactError):
        load_artifact(path)


def test_manifest_without_weights(tmp_path):
    path = write(tmp_path, files={art.CALIBRATION: CALIBRATION_BYTES})
    with pytest.raises(ArtifactError, match=re.escape(art.WEIGHTS)):
        load_artifact(path)


def test_json_of_unlisted_or_invalid_file(tmp_path):
    loaded = load_artifact(write(tmp_path, files={art.WEIGHTS: WEIGHTS_BYTES, "bad.json": b"{nope"}))
    with pytest.raises(ArtifactError, match=re.escape("lists no calibration.json")):
        loaded.json(art.CALIBRATION)
    with pytest.raises(ArtifactError, match=re.escape("bad.json: not valid JSON")):
        loaded.json("bad.json")


def test_store_path(monkeypatch, tmp_path):
    monkeypatch.setenv("GENSERVE_STORE", str(tmp_path / "env-store"))
    assert store_path() == tmp_path / "env-store"
    assert store_path(tmp_path / "explicit") == tmp_path / "explicit"
    assert store_path(str(tmp_path / "s")) == tmp_path / "s"
    monkeypatch.delenv("GENSERVE_STORE")
    assert store_path() == Path(art.DEFAULT_STORE)
    monkeypatch.setenv("GENSERVE_STORE", "")
    assert store_path() == Path(art.DEFAULT_STORE)


def test_list_models_on_missing_store(tmp_path):
    assert art.list_models(tmp_path / "absent") == {}
    assert art.versions(tmp_path / "absent", "demo") == []
