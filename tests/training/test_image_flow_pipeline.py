"""Image RealNVP training: a complete artifact whose density is a bound, bits/dim that fall, bounds that tighten."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from genserve.artifacts import artifact as art
from genserve.models.image_flow import ImageFlowConfig, ImageRealNVP
from genserve.training.image_flow_pipeline import ImageFlowTrainConfig, train_image_flow


def test_a_tiny_run_on_digits_writes_a_complete_artifact_and_learns(tmp_path) -> None:
    path = train_image_flow(ImageFlowTrainConfig(dataset="digits", name="df", preset="tiny", epochs=4,
                                                 max_train_images=512, learning_rate=5e-3, threads=1),
                            tmp_path, progress=False)
    loaded = art.load_artifact(path)
    m = loaded.manifest
    assert m.kind == "realnvp" and m.density == "bound"
    assert (m.input.height, m.input.width, m.input.levels, m.input.n_classes) == (8, 8, 17, 0)
    assert {art.WEIGHTS, art.CALIBRATION, art.SAMPLES_PNG, "loss_curve.png", "training_log.json",
            "reference.json"} <= set(m.files)
    metrics = m.metrics
    assert {"test_bits_per_dim", "test_dequantised_nats", "test_importance_weighted_nats", "test_nll_bound_nats",
            "test_bits_per_dim_bound", "validation_bound_nats", "score_samples", "anomaly_thresholds",
            "parameters", "best_epoch", "training_seconds"} <= set(metrics)
    bounds = metrics["test_importance_weighted_nats"]
    assert set(bounds) == {"1", "10"}
    assert metrics["test_dequantised_nats"] == pytest.approx(bounds["1"])
    assert metrics["test_bits_per_dim"] == pytest.approx(-bounds["1"] / (64 * math.log(2)))
    assert 0 < metrics["test_bits_per_dim"] < math.log2(17)
    assert bounds["10"] > bounds["1"]  # importance weighting tightens the dequantised bound
    assert metrics["test_nll_bound_nats"] == pytest.approx(-bounds["10"])
    assert metrics["test_bits_per_dim_bound"] < metrics["test_bits_per_dim"]
    assert metrics["score_samples"] == 16

    history = json.loads(loaded.contents["training_log.json"])
    assert len(history["epochs"]) == 4 and len(history["train"]) == 4 * 8
    first = history["epochs"][0]["validation_bits_per_dim"]
    best = history["epochs"][metrics["best_epoch"] - 1]["validation_bits_per_dim"]
    assert best < first - 0.05  # it learned
    assert best == min(e["validation_bits_per_dim"] for e in history["epochs"])

    # The served module rebuilt from the manifest: the server's two calls.
    module = ImageRealNVP(ImageFlowConfig(**m.config))
    art.load_module_weights(module, loaded.contents[art.WEIGHTS])
    module.eval()
    samples = module.sample(4, torch.Generator().manual_seed(0))
    assert samples.dtype == torch.long and samples.shape == (4, 8, 8)
    assert int(samples.min()) >= 0 and int(samples.max()) < 17
    images = torch.from_numpy(np.stack([np.eye(8, dtype=np.int64) * 16, np.zeros((8, 8), dtype=np.int64)]))
    lp = module.importance_bound(images, 16, torch.Generator().manual_seed(0))
    assert lp.shape == (2,) and torch.isfinite(lp).all()
    calibration = json.loads(loaded.contents[art.CALIBRATION])
    assert {"nll", "bits_per_dim", "complexity", "likelihood_ratio"} <= set(calibration["scores"])


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown image dataset"):
        ImageFlowTrainConfig(dataset="cifar", name="x").resolved()
    with pytest.raises(ValueError, match="eval K"):
        ImageFlowTrainConfig(dataset="digits", name="x", eval_ks=(0,)).resolved()
    cfg = ImageFlowTrainConfig(dataset="digits", name="x", preset="tiny", architecture={"channels": 4}).resolved()
    assert cfg.architecture == {"n_blocks": 2, "channels": 4, "n_scales": 1} and cfg.epochs == 2
