"""Anomaly score types, their calibration sets, and the reference models of likelihood ratios."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from genserve.artifacts import artifact as art
from genserve.artifacts.calibration import LINE, Calibration, CalibrationSet, read_calibration
from genserve.artifacts.reference import fit_bigram, fit_gaussian, fit_local_pixels, load_reference, reference_files
from genserve.artifacts.scores import (
    DEFAULT_SCORE,
    SCORE_TYPES,
    check_score,
    compute_scores,
    paragraphs,
    png_bits,
    text_lines,
)
from genserve.models.reference import LocalPixelConfig, LocalPixelModel, build_reference


def test_score_definitions():
    lp = np.array([-10.0, -20.0])
    ref = np.array([-12.0, -15.0])
    s = compute_scores("records", lp, 5, reference_log_prob=ref)
    np.testing.assert_allclose(s["nll"], [10.0, 20.0])
    np.testing.assert_allclose(s["bits_per_dim"], [10 / (5 * math.log(2)), 20 / (5 * math.log(2))])
    np.testing.assert_allclose(s["likelihood_ratio"], [-2.0, 5.0])  # log p_ref - log p
    img = compute_scores("image", lp, 4, reference_log_prob=ref, complexity_bits=np.array([3.0, 50.0]))
    np.testing.assert_allclose(img["complexity"], [10 / math.log(2) - 3.0, 20 / math.log(2) - 50.0])
    text = compute_scores("text", lp, np.array([4, 8]), reference_log_prob=ref)
    np.testing.assert_allclose(text["bits_per_char"], [10 / (4 * math.log(2)), 20 / (8 * math.log(2))])
    np.testing.assert_allclose(text["likelihood_ratio"], [-2 / (4 * math.log(2)), 5 / (8 * math.log(2))])
    assert "likelihood_ratio" not in compute_scores("records", lp, 5)  # no reference, no ratio
    for kind, types in SCORE_TYPES.items():
        assert DEFAULT_SCORE[kind] in types and check_score(kind, None) == DEFAULT_SCORE[kind]
    with pytest.raises(ValueError, match="not available for models of records; available: nll, bits_per_dim"):
        check_score("records", "complexity")


def test_png_bits_measure_complexity():
    rng = np.random.default_rng(0)
    blank = np.zeros((1, 28, 28), dtype=np.int64)
    stripes = np.tile(np.arange(28) % 2, (28, 1))[None]
    noise = rng.integers(0, 2, (1, 28, 28))
    bits = png_bits(np.concatenate([blank, stripes, noise]), levels=2)
    assert bits[0] < bits[1] < bits[2]
    assert bits[2] > 28 * 28  # incompressible: a bit per pixel plus headers
    grey = png_bits(rng.integers(0, 17, (3, 8, 8)), levels=17)
    assert (grey > 8 * 64 * math.log2(17) / 8).all() and (png_bits(np.zeros((1, 8, 8), int), 17) < grey).all()


def test_text_items():
    assert text_lines("a\n\n  \nb c\n") == [(1, "a"), (4, "b c")]
    assert paragraphs("one\ntwo\n\n\nthree\n\n") == ["one\ntwo", "three"]


def test_calibration_set_round_trip_and_legacy_format(tmp_path):
    rng = np.random.default_rng(0)
    cals = CalibrationSet.fit({"nll": rng.normal(size=500), LINE + "bits_per_char": rng.normal(size=300)})
    assert cals.names() == ["nll"] and cals.names(per_line=True) == ["bits_per_char"]
    assert cals.get("bits_per_char", per_line=True).n == 300 and cals.get("bits_per_char") is None
    back = CalibrationSet.from_dict(json.loads(json.dumps(cals.to_dict())))
    assert back == cals
    # Artifacts written before score types held one calibration of -log p named nll_nats.
    legacy = Calibration.fit(rng.normal(size=100), score="nll_nats").to_dict()
    old = CalibrationSet.from_dict(legacy)
    assert old.names() == ["nll"] and old.get("nll").threshold == legacy["threshold"]
    with pytest.raises(ValueError, match="format 9"):
        CalibrationSet.from_dict({"format": 9, "scores": {}})
    path = art.write_artifact(tmp_path, kind="gmm", name="m", config={}, input_spec=art.InputSpec(
        n_features=1, feature_names=["x"]), training={}, metrics={},
        files={art.WEIGHTS: b"", art.CALIBRATION: b'{"format": 2, "scores": {"nll": {"bad": 1}}}'})
    with pytest.raises(art.ArtifactError, match=r"calibration\.json: invalid calibration"):
        read_calibration(art.load_artifact(path))


def test_local_pixel_model_is_normalised_and_fits_counts():
    torch.manual_seed(0)
    config = LocalPixelConfig(height=2, width=3, levels=2)
    images = torch.randint(0, 2, (50, 2, 3))
    model = LocalPixelModel(config).fit(images)
    every = torch.tensor(list(itertools.product([0, 1], repeat=6))).view(-1, 2, 3)
    assert model.log_prob(every).exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    # A model fitted on blank images finds blank images far more likely than a checkerboard.
    blank = LocalPixelModel(LocalPixelConfig(4, 4, 2)).fit(torch.zeros(20, 4, 4, dtype=torch.long))
    checker = (torch.arange(16).view(4, 4) + torch.arange(4).view(4, 1)) % 2
    assert blank.log_prob(torch.zeros(1, 4, 4, dtype=torch.long)) > blank.log_prob(checker[None]) + 10
    assert LocalPixelConfig.for_images(8, 8, 17).neighbours == 3
    assert LocalPixelConfig.for_images(28, 28, 2).neighbours == 4


def test_gaussian_reference_is_the_maximum_likelihood_independent_gaussian():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3)) @ np.array([[2.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.2]]) + [1.0, -2.0, 5.0]
    model = fit_gaussian(x, reg_covar=0.0)
    from scipy.stats import norm

    want = norm(x.mean(0), x.std(0)).logpdf(x[:10]).sum(1)
    np.testing.assert_allclose(model.log_prob(torch.from_numpy(x[:10])).numpy(), want, rtol=1e-8)
    assert model.config.covariance_type == "diag"


@pytest.mark.parametrize("kind", ["gmm", "local_pixels", "ngram"])
def test_reference_round_trips_through_an_artifact(tmp_path, kind):
    rng = np.random.default_rng(0)
    if kind == "gmm":
        module, x = fit_gaussian(rng.normal(size=(50, 2))), torch.ones(3, 2, dtype=torch.float64)
    elif kind == "local_pixels":
        module, x = fit_local_pixels(rng.integers(0, 3, (20, 4, 4)), 3), torch.ones(2, 4, 4, dtype=torch.long)
    else:
        module, x = fit_bigram(torch.tensor([0, 1, 2, 1, 2, 3, 1]), vocab_size=4), torch.tensor([[0, 1, 2]])
    path = art.write_artifact(tmp_path, kind="gmm", name="m", config={}, training={}, metrics={},
                              input_spec=art.InputSpec(n_features=1, feature_names=["x"]),
                              files={art.WEIGHTS: b"", **reference_files(module)})
    loaded = load_reference(art.load_artifact(path))
    assert type(loaded) is type(module)
    fn = (lambda m: m.logits(x)) if kind == "ngram" else (lambda m: m.log_prob(x))
    torch.testing.assert_close(fn(loaded), fn(module))
    with pytest.raises(ValueError, match="unknown reference model kind"):
        build_reference("flow", {})
