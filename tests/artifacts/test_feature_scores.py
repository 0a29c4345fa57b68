"""The knn, mahalanobis, class evidence, typicality and ensemble score types: definitions, calibration rates, and
their files in artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from genserve.artifacts import artifact as art
from genserve.artifacts.calibration import (
    LINE,
    Calibration,
    CalibrationSet,
    batch_typicality,
    choose_members,
    fit_anomaly_calibration,
    fit_text_calibration,
)
from genserve.artifacts.class_gaussians import (
    GAUSSIANS_CONFIG,
    GAUSSIANS_WEIGHTS,
    class_gaussian_files,
    fit_class_gaussians,
    load_class_gaussians,
)
from genserve.artifacts.neighbours import (
    MAX_DISTANCE,
    NEIGHBOURS_CONFIG,
    NEIGHBOURS_WEIGHTS,
    fit_neighbours,
    load_neighbours,
    neighbour_files,
)
from genserve.artifacts.scores import (
    DEFAULT_SCORE,
    check_score,
    class_evidence_scores,
    compute_scores,
    needed_scores,
)


def brute_force_kth(train: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    d = np.sqrt(((queries[:, None, :] - train[None, :, :]) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, k - 1]


def test_knn_is_the_distance_to_the_kth_nearest_standardised_training_record():
    rng = np.random.default_rng(0)
    train = rng.normal([5.0, -3.0, 100.0], [1.0, 0.1, 20.0], size=(300, 3))
    mean, scale = train.mean(0), train.std(0)
    index = fit_neighbours(train, "standardised", mean, scale, k=5)
    queries = rng.normal([5.0, -3.0, 100.0], [2.0, 0.2, 40.0], size=(600, 3))  # more than one query chunk
    expected = brute_force_kth((train - mean) / scale, (queries - mean) / scale, 5)
    np.testing.assert_allclose(index.distance(queries), expected, rtol=1e-6)
    nearest = fit_neighbours(train, "standardised", mean, scale, k=1)
    np.testing.assert_allclose(nearest.distance(train[:10]), 0.0, atol=1e-6)  # a training record is its own nearest
    # A record that overflows float64 in the distance is the farthest there is, and finite.
    far = index.distance(np.array([[1e300, 0.0, 0.0]]))
    assert np.isfinite(far).all() and far[0] == MAX_DISTANCE


def test_knn_on_pixels_reads_images_as_intensities():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 17, (40, 8, 8))
    index = fit_neighbours(images, "pixels", levels=17, k=3)
    assert index.features.dtype == np.uint8 and index.features.shape == (40, 64)
    queries = rng.integers(0, 17, (5, 8, 8))
    expected = brute_force_kth(images.reshape(40, -1) / 16.0, queries.reshape(5, -1) / 16.0, 3)
    np.testing.assert_allclose(index.distance(queries), expected, rtol=1e-5)


def test_a_large_training_split_is_sampled_to_the_cap():
    rng = np.random.default_rng(2)
    train = rng.normal(size=(1000, 2))
    index = fit_neighbours(train, "standardised", np.zeros(2), np.ones(2), max_items=100, seed=0)
    assert index.features.shape == (100, 2) and index.n_train == 1000
    again = fit_neighbours(train, "standardised", np.zeros(2), np.ones(2), max_items=100, seed=0)
    np.testing.assert_array_equal(index.features, again.features)  # seeded: the same sample every run


@pytest.mark.parametrize("space", ["standardised", "pixels"])
def test_neighbour_index_round_trips_through_an_artifact(tmp_path, space):
    rng = np.random.default_rng(3)
    if space == "standardised":
        data = rng.normal(size=(50, 4))
        index = fit_neighbours(data, space, data.mean(0), data.std(0))
        queries = rng.normal(size=(7, 4))
    else:
        data = rng.integers(0, 2, (30, 5, 5))
        index = fit_neighbours(data, space, levels=2)
        queries = rng.integers(0, 2, (7, 5, 5))
    path = art.write_artifact(tmp_path, kind="gmm", name="m", config={}, training={}, metrics={},
                              input_spec=art.InputSpec(n_features=1, feature_names=["x"]),
                              files={art.WEIGHTS: b"", **neighbour_files(index)})
    loaded = load_neighbours(art.load_artifact(path))
    assert (loaded.space, loaded.k, loaded.n_train) == (space, index.k, len(data))
    np.testing.assert_array_equal(loaded.distance(queries), index.distance(queries))
    spec = json.loads((path / NEIGHBOURS_CONFIG).read_text())
    assert spec["metric"] == "euclidean" and spec["stored"] == len(data)
    # A broken index is refused at load, naming the file.
    bad = art.write_artifact(tmp_path, kind="gmm", name="b", config={}, training={}, metrics={},
                             input_spec=art.InputSpec(n_features=1, feature_names=["x"]),
                             files={art.WEIGHTS: b"", NEIGHBOURS_WEIGHTS: neighbour_files(index)[NEIGHBOURS_WEIGHTS],
                                    NEIGHBOURS_CONFIG: b'{"space": "cosine", "k": 5, "n_train": 1}'})
    with pytest.raises(art.ArtifactError, match=r"neighbours\.json: not a valid neighbour index"):
        load_neighbours(art.load_artifact(bad))


def test_typicality_is_the_distance_from_the_typical_nll_on_both_sides():
    lp = np.array([-10.0, -14.0, -6.0])
    raw = compute_scores("records", lp, 2, typical_nll=10.0)
    np.testing.assert_allclose(raw["typicality"], [0.0, 4.0, 4.0])  # too unlikely and too likely alike
    assert "typicality" not in compute_scores("records", lp, 2)
    # text: the per-token variant, around a centre in bits per character
    text = compute_scores("text", lp, np.array([4, 4, 2]), typical_nll=3.0)
    np.testing.assert_allclose(text["typicality"], np.abs(-lp / (np.array([4, 4, 2]) * np.log(2)) - 3.0))


def test_text_typicality_has_a_centre_per_unit_that_round_trips():
    rng = np.random.default_rng(11)
    whole = {"nll": rng.normal(50, 5, 400), "bits_per_char": rng.normal(2.0, 0.2, 400)}
    lines = {"nll": rng.normal(20, 5, 400), "bits_per_char": rng.normal(2.5, 0.4, 400)}
    cals = fit_text_calibration({"": whole, LINE: lines})
    assert cals.typical() == pytest.approx(np.mean(whole["bits_per_char"]))
    assert cals.typical(per_line=True) == pytest.approx(np.mean(lines["bits_per_char"]))
    np.testing.assert_allclose(cals.get("typicality", per_line=True).values[-1],
                               np.max(np.abs(lines["bits_per_char"] - cals.typical(per_line=True))))
    data = json.loads(json.dumps(cals.to_dict()))
    assert "centre" not in data["scores"]["nll"]  # only typicality's calibration carries one
    assert CalibrationSet.from_dict(data) == cals
    # Flagged at the requested rate on fresh items of the same distribution (3 standard errors).
    fresh = np.abs(rng.normal(2.5, 0.4, 20_000) - cals.typical(per_line=True))
    flagged = np.mean(fresh > cals.get("typicality", per_line=True).threshold_for(0.05))
    assert abs(flagged - 0.05) < 3 * np.sqrt(0.05 * 0.95 / 400)


def test_batch_typicality_p_values_are_calibrated_and_small_for_a_shifted_batch():
    rng = np.random.default_rng(12)
    held_out = rng.normal(100.0, 5.0, 5000)
    cal, centre = Calibration.fit(held_out, "nll"), float(held_out.mean())
    # Normal batches: p-values spread over (0, 1], about 5% below 0.05
    p_values = np.array([batch_typicality(cal, centre, rng.normal(100.0, 5.0, 20), seed=i)[1] for i in range(300)])
    assert abs(np.mean(p_values < 0.05) - 0.05) < 3 * np.sqrt(0.05 * 0.95 / 300) and 0.4 < np.median(p_values) < 0.6
    # A batch whose items are each ordinary (within 1 sd) but all on one side: atypical as a whole
    statistic, p = batch_typicality(cal, centre, rng.uniform(100.0, 105.0, 50))
    assert statistic == pytest.approx(2.5, abs=0.5) and p < 0.01
    # Too likely is atypical too, and the test is seeded: the same batch, the same p-value
    low = rng.normal(95.0, 1.0, 30)
    assert batch_typicality(cal, centre, low)[1] < 0.01
    assert batch_typicality(cal, centre, low) == batch_typicality(cal, centre, low)


def test_class_evidence_is_the_best_class_and_class_entropy_the_posteriors_entropy():
    cond = np.array([[-10.0, -30.0, -50.0], [-20.0, -20.0, -90.0], [-40.0, -41.0, -5.0]])
    prior = np.array([np.log(0.5), np.log(0.5), -np.inf])  # class 2 never seen in training
    scores = class_evidence_scores(cond, prior)
    np.testing.assert_allclose(scores["class_evidence"], [10.0, 20.0, 40.0])  # unseen class 2 takes no part
    np.testing.assert_allclose(scores["class_entropy"][:2], [0.0, np.log(2)], atol=1e-6)
    p = np.exp([-40.0, -41.0]) / np.exp([-40.0, -41.0]).sum()
    assert scores["class_entropy"][2] == pytest.approx(-(p * np.log(p)).sum())
    raw = compute_scores("image", -cond.max(1), 64, class_scores=scores)
    np.testing.assert_array_equal(raw["class_entropy"], scores["class_entropy"])


def test_tail_score_follows_the_held_out_distribution_and_keeps_growing_past_it():
    rng = np.random.default_rng(4)
    cal = Calibration.fit(rng.normal(size=20_000), "nll")
    q = [cal.threshold_for(r) for r in (0.5, 0.1, 0.01)]
    np.testing.assert_allclose(cal.tail(np.array(q)), np.log([2.0, 10.0, 100.0]), rtol=0.02)
    s = np.linspace(-5, 50, 500)
    t = cal.tail(s)
    assert (np.diff(t) >= 0).all() and t[-1] > t[np.searchsorted(s, cal.values[-1])] + 10
    assert np.isfinite(cal.tail(np.array([1e308]))).all()


def test_choose_members_drops_what_ranks_like_a_kept_member():
    rng = np.random.default_rng(5)
    nll = rng.normal(size=500)
    validation = {"knn": rng.normal(size=500), "nll": nll, "likelihood_ratio": 0.5 * nll + 0.01 * rng.normal(size=500),
                  "typicality": np.abs(nll)}
    members, why = choose_members(validation, ("knn", "nll", "likelihood_ratio", "typicality", "complexity"))
    assert members == ["knn", "nll", "typicality"]
    assert "likelihood_ratio (rank correlation 1.00 with nll)" in why and "no anomalies" in why


def test_ensemble_ranks_by_its_first_member_unless_another_finds_an_item_rarer_than_1_in_100():
    rng = np.random.default_rng(8)
    held_out = {"knn": rng.normal(size=10_000), "complexity": rng.normal(size=10_000)}
    cals = fit_anomaly_calibration("image", {**held_out, "nll": rng.normal(size=10_000)})
    assert cals.members[0] == "knn" and "complexity" in cals.members
    others = [m for m in cals.members if m != "knn"]
    ordinary = {m: np.zeros(3) for m in others}  # every other member at its median
    knn = np.array([-1.0, 0.5, 2.0])
    np.testing.assert_allclose(cals.ensemble({"knn": knn, **ordinary}), cals.get("knn").tail(knn))
    # complexity far beyond its held-out range lifts an item with an ordinary knn above every knn-ranked one
    rare = {**ordinary, "complexity": np.array([0.0, 0.0, 8.0])}
    lifted = cals.ensemble({"knn": np.array([2.0, 2.5, 0.0]), **rare})
    assert lifted[2] > lifted[1] > lifted[0]


def test_records_ensemble_ranks_by_knn_and_nll_and_older_artifacts_keep_knn_alone():
    """A GMM's nll is a soft Mahalanobis distance to its components: records rank by it and knn together. The
    primary members are stored, so a calibration written before (no "primary") still ranks by knn alone."""
    rng = np.random.default_rng(9)
    held_out = {"knn": rng.normal(size=5000), "nll": rng.normal(size=5000)}
    cals = fit_anomaly_calibration("records", held_out)
    assert cals.members[:2] == ["knn", "nll"] and cals.primary() == ["knn", "nll"] and "ranked by knn, nll" in cals.why
    raw = {"knn": np.array([0.0, 1.0, -1.0]), "nll": np.array([1.0, 0.0, 2.5])}
    raw["typicality"] = np.abs(raw["nll"] - cals.typical_nll)
    mean_tail = (cals.get("knn").tail(raw["knn"]) + cals.get("nll").tail(raw["nll"])) / 2
    np.testing.assert_allclose(cals.ensemble(raw), mean_tail + np.maximum(
        cals.get("typicality").tail(raw["typicality"]) - np.log(100), 0))
    stored = cals.to_dict()
    assert CalibrationSet.from_dict(json.loads(json.dumps(stored))).primary() == ["knn", "nll"]
    del stored["primary"]  # as calibration.json was written before records had primary members
    assert CalibrationSet.from_dict(stored).primary() == ["knn"]


def test_ensemble_calibration_flags_the_requested_rate_of_fresh_normal_items():
    """Fit on 4,000 held-out items, count flags on 40,000 fresh ones: within 3 standard errors of the rate."""
    rng = np.random.default_rng(6)

    def items(n):
        z = rng.normal(size=(n, 3))
        return {"nll": 5 + z[:, 0], "knn": np.exp(z[:, 1]), "likelihood_ratio": z[:, 0] * 0.3 + z[:, 2]}

    cals = fit_anomaly_calibration("records", items(4000))
    assert cals.default == "ensemble" and "typicality" in cals.names() and cals.typical_nll == pytest.approx(5, abs=0.1)
    fresh = items(40_000)
    fresh["typicality"] = np.abs(fresh["nll"] - cals.typical_nll)
    ensemble = cals.ensemble(fresh)
    for rate in (0.01, 0.05):
        flagged = np.mean(ensemble > cals.get("ensemble").threshold_for(rate))
        assert abs(flagged - rate) < 3 * np.sqrt(rate * (1 - rate) / 40_000) + 3 * np.sqrt(rate * (1 - rate) / 4000)
    back = CalibrationSet.from_dict(json.loads(json.dumps(cals.to_dict())))
    assert back == cals


def test_old_calibrations_keep_their_kinds_default_and_bad_ones_are_refused():
    rng = np.random.default_rng(7)
    old = CalibrationSet.fit({"nll": rng.normal(size=100)})
    back = CalibrationSet.from_dict(old.to_dict())
    assert back.default is None and back.members == []
    assert check_score("records", None, back.default) == DEFAULT_SCORE["records"] == "nll"
    assert check_score("records", None, "ensemble") == "ensemble"
    with pytest.raises(ValueError, match=r"available: .*\(default ensemble\)"):
        check_score("records", "complexity", "ensemble")
    data = fit_anomaly_calibration("records", {"nll": rng.normal(size=200), "knn": rng.normal(size=200)}).to_dict()
    with pytest.raises(ValueError, match="ensemble calibration needs its members"):
        CalibrationSet.from_dict({**data, "members": ["nll", "complexity"]})
    with pytest.raises(ValueError, match="needs typical_nll"):
        CalibrationSet.from_dict({k: v for k, v in data.items() if k != "typical_nll"})
    assert needed_scores("ensemble", ["knn", "nll"]) == {"knn", "nll"} and needed_scores("knn", ["nll"]) == {"knn"}


def test_mahalanobis_is_the_nearest_class_gaussian_in_principal_components(tmp_path):
    rng = np.random.default_rng(9)
    centres = rng.integers(0, 17, (3, 6, 6))
    labels = np.repeat(np.arange(3), 60)
    images = np.clip(centres[labels] + rng.integers(-2, 3, (180, 6, 6)), 0, 16)
    model = fit_class_gaussians(images, labels, levels=17, dims=8)
    assert model.components.shape == (8, 36) and model.class_means.shape == (3, 8) and model.spec["classes"] == 3
    # The definition, by hand with numpy: min over classes of 0.5 (z - mu)^T Sigma^-1 (z - mu) - log |Sigma^-1| / 2.
    queries = np.clip(centres[[0, 2]] + rng.integers(-2, 3, (2, 6, 6)), 0, 16)
    z = model.project(queries)
    expected = []
    for zi in z:
        per_class = []
        for mu, u in zip(model.class_means, model.precision_chol, strict=True):
            precision = u.T @ u
            d = zi - mu
            per_class.append(0.5 * d @ precision @ d - 0.5 * np.linalg.slogdet(precision)[1])
        expected.append(min(per_class))
    np.testing.assert_allclose(model.distance(queries), expected, rtol=1e-6)
    # An image unlike every class is farther than the members of any.
    odd = rng.integers(0, 17, (1, 6, 6))
    assert model.distance(odd)[0] > model.distance(images).max()
    # Unlabelled data is one class; the files round-trip; a broken file is refused, naming it.
    assert fit_class_gaussians(images, None, levels=17, dims=8).spec["classes"] == 1
    path = art.write_artifact(tmp_path, kind="fvsbn", name="g", config={}, training={}, metrics={},
                              input_spec=art.InputSpec(n_features=1, feature_names=["x"]),
                              files={art.WEIGHTS: b"", **class_gaussian_files(model)})
    back = load_class_gaussians(art.load_artifact(path))
    np.testing.assert_allclose(back.distance(queries), model.distance(queries))
    files = class_gaussian_files(model)
    bad = art.write_artifact(tmp_path, kind="fvsbn", name="h", config={}, training={}, metrics={},
                             input_spec=art.InputSpec(n_features=1, feature_names=["x"]),
                             files={art.WEIGHTS: b"", GAUSSIANS_WEIGHTS: files[GAUSSIANS_WEIGHTS],
                                    GAUSSIANS_CONFIG: json.dumps({**model.spec, "dims": 3}).encode()})
    with pytest.raises(art.ArtifactError, match=r"class_gaussians\.json: not valid class Gaussians"):
        load_class_gaussians(art.load_artifact(bad))
