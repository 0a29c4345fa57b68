"""`genserve train vae`: a complete artifact whose density is a bound, its curves, bounds and calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from genserve.artifacts import artifact as art
from genserve.models.registry import build_latent_model
from genserve.service.cli import app
from genserve.training.vae_pipeline import VAETrainConfig, train_vae


def test_the_cli_writes_a_vae_whose_density_is_a_bound(tmp_path) -> None:
    result = CliRunner().invoke(app, ["train", "vae", "--dataset", "digits", "--name", "dv", "--preset", "tiny",
                                      "--epochs", "3", "--store", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "importance-weighted bounds K=1" in result.output
    loaded = art.load_artifact(art.resolve(tmp_path, "dv"))
    m = loaded.manifest
    assert m.kind == "vae" and m.density == "bound" and m.input.levels == 17 and m.input.n_classes == 0
    assert {art.WEIGHTS, art.CALIBRATION, art.SAMPLES_PNG, "loss_curve.png", "training_log.json",
            "reference.json"} <= set(m.files)
    bounds = m.metrics["test_importance_weighted_nats"]
    assert set(bounds) == {"1", "10"} and all(v < 0 for v in bounds.values())
    assert m.metrics["test_nll_bound_nats"] == pytest.approx(-bounds["10"])
    # The training curves: both terms of the ELBO at every step, the KL weight rising to 1 over the warm-up.
    history = json.loads(loaded.contents["training_log.json"])
    steps = history["train"]
    assert len(steps) == 3 * history["warmup_steps"] and steps[0][3] == 0.0 and steps[-1][3] == 1.0
    assert all(kl >= 0 for _, _, kl, _ in steps)
    assert history["best_epoch"] >= 2  # only epochs after the warm-up compete
    # The served module rebuilt from the manifest gives the calibration's bounds.
    module = build_latent_model("vae", m.config)
    art.load_module_weights(module, loaded.contents[art.WEIGHTS])
    module.eval()
    assert module.sample(4, torch.Generator().manual_seed(0)).shape == (4, 8, 8)
    calibration = json.loads(loaded.contents[art.CALIBRATION])
    assert {"nll", "bits_per_dim", "complexity", "likelihood_ratio"} <= set(calibration["scores"])


def test_training_lowers_the_bound_and_k_tightens_it(tmp_path) -> None:
    path = train_vae(VAETrainConfig(dataset="digits", name="dv", preset="tiny", epochs=25, warmup_epochs=5,
                                    eval_ks=(1, 100), architecture={"latent_dim": 8, "channels": 16, "hidden": 64}),
                     tmp_path, progress=False)
    m = art.load_artifact(path).manifest.metrics
    history = json.loads((path / "training_log.json").read_text())
    first, best = history["epochs"][0]["validation_elbo"], history["epochs"][m["best_epoch"] - 1]["validation_elbo"]
    assert best > first + 20  # nats per image: it learned
    bounds = m["test_importance_weighted_nats"]
    assert bounds["100"] > bounds["1"] and bounds["100"] > m["test_elbo_nats"]
    assert np.isfinite(m["test_bits_per_dim_bound"]) and 0 < m["test_bits_per_dim_bound"] < np.log2(17)


def test_genserve_score_local_scores_images_with_the_vaes_bound(tmp_path) -> None:
    from genserve.service.latent import load_latent_model
    from genserve.service.local import LocalScorer
    from genserve.training.image_data import load_digits

    path = train_vae(VAETrainConfig(dataset="digits", name="dv", preset="tiny"), tmp_path, progress=False)
    images = load_digits().test.images[:5]
    scored = LocalScorer(path).anomaly(images=images, score="nll")
    assert scored.density == "bound" and len(scored.results) == 5
    bound = load_latent_model(str(path), device="cpu").runtime.bound(images)  # the calibration's K, seed 0
    np.testing.assert_allclose([r.log_prob for r in scored.results], bound)
