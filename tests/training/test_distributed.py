"""`genserve train text --workers N`: data-parallel on Ray Train (TorchTrainer, gloo on CPU), checkpoints in the
store, resume; the result is the single-process run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load as load_safetensors
from typer.testing import CliRunner

from genserve.artifacts import artifact as art
from genserve.service.cli import app
from genserve.training.distributed import latest_checkpoint
from genserve.training.text_pipeline import TextTrainConfig, train_text
from tests.training.test_text_pipeline import write_corpus


@pytest.fixture(scope="module")
def local_ray():
    """A Ray of this module's own with the two CPUs the two workers ask for."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "grammar.txt")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_safetensors((path / art.WEIGHTS).read_bytes())


def test_two_workers_stopped_and_resumed_reach_the_single_process_result(local_ray, corpus: Path,
                                                                         tmp_path: Path) -> None:
    store = tmp_path / "store"
    one = train_text(TextTrainConfig(name="one", dataset=str(corpus), preset="tiny", export_onnx=False,
                                     max_iters=30), store, progress=False)

    # Two workers, stopped after 20 of the 30 planned iterations (the decay schedule says 30)...
    common = ["train", "text", "--name", "two", "--dataset", str(corpus), "--preset", "tiny", "--no-onnx",
              "--workers", "2", "--lr-decay-iters", "30", "--store", str(store)]
    result = CliRunner().invoke(app, [*common, "--max-iters", "20"])
    assert result.exit_code == 0, result.output
    saved, _ = latest_checkpoint(str(store / ".checkpoints" / "ray"), "two")
    assert saved["iteration"] == 20
    snapshot = store / ".checkpoints" / "ray" / "two" / "checkpoint_manager_snapshot.json"
    assert json.loads(snapshot.read_text())  # Ray Train's bookkeeping is JSON; our checkpoints safetensors + JSON
    kept = sorted(p.name for p in snapshot.parent.glob("checkpoint_*") if p.is_dir())
    assert len(kept) == 2 and all((snapshot.parent / k / "checkpoint" / "model.safetensors").is_file() for k in kept)

    # ... then resumed from the Ray Train checkpoint in the store, to 30.
    result = CliRunner().invoke(app, [*common, "--max-iters", "30", "--resume"])
    assert result.exit_code == 0, result.output
    two = art.resolve(store, "two")
    manifest = art.load_artifact(two).manifest
    history = json.loads((two / "training_log.json").read_text())
    assert history["workers"] == 2 and history["resumed_at"] == [20]
    assert manifest.training["settings"]["workers"] == 2

    # Each worker took half of every global batch, and the gradients were averaged: the same steps as one process
    # with the whole batch, up to the order of floating-point sums.
    expected = art.load_artifact(one).manifest.metrics["validation_nll_nats_per_token"]
    got = manifest.metrics["validation_nll_nats_per_token"]
    assert got == pytest.approx(expected, rel=1e-4)
    single, parallel = weights(one), weights(two)
    assert single.keys() == parallel.keys()
    for key in single:
        torch.testing.assert_close(parallel[key], single[key], atol=1e-4, rtol=1e-4)


def test_bad_worker_settings_are_refused_before_ray_starts(corpus: Path, tmp_path: Path) -> None:
    cfg = dict(name="bad", dataset=str(corpus), preset="tiny", export_onnx=False)
    with pytest.raises(ValueError, match="batch_size 8 must be a multiple of workers 3"):
        TextTrainConfig(**cfg, workers=3).resolved()
    with pytest.raises(ValueError, match="--workers is for the gpt and lstm"):
        TextTrainConfig(**cfg, model="ngram", workers=2).resolved()
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        train_text(TextTrainConfig(**cfg, workers=2, resume=True), tmp_path / "store", progress=False)


def test_an_image_model_on_two_workers_matches_one_process(local_ray, tmp_path: Path) -> None:
    from genserve.training.image_pipeline import ImageTrainConfig, train_image

    # 320 training images: 10 batches of 32 an epoch, each split 16 + 16 between the workers.
    settings = dict(model="made", dataset="digits", name="m", preset="tiny", max_train_images=320, threads=1,
                    export_onnx=False, sample_every=0)
    one = train_image(ImageTrainConfig(**settings, epochs=2), tmp_path / "one", progress=False)
    store = tmp_path / "two"
    train_image(ImageTrainConfig(**settings, epochs=1, schedule_epochs=2, workers=2), store, progress=False)
    two = train_image(ImageTrainConfig(**settings, epochs=2, workers=2, resume=True), store, progress=False)
    history = json.loads((two / "training_log.json").read_text())
    assert history["workers"] == 2 and history["resumed_at"] == [1]
    expected, got = (art.load_artifact(p).manifest.metrics for p in (one, two))
    assert got["test_nll_nats"] == pytest.approx(expected["test_nll_nats"], rel=1e-4)
    assert got["best_epoch"] == expected["best_epoch"]
    single, parallel = weights(one), weights(two)
    for key in single:
        torch.testing.assert_close(parallel[key], single[key], atol=1e-4, rtol=1e-4)
