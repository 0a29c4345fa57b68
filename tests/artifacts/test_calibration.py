"""Calibration of anomaly scores: quantiles, thresholds, percentiles, serialisation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from genserve.artifacts.calibration import N_LEVELS, Calibration


@pytest.fixture(scope="module")
def normal_scores() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(20_000)


@pytest.fixture(scope="module")
def cal(normal_scores) -> Calibration:
    return Calibration.fit(normal_scores)


def test_fit_records_quantiles(cal, normal_scores):
    assert cal.n == normal_scores.size
    assert cal.score == "nll"
    assert len(cal.levels) == len(cal.values) == N_LEVELS
    assert cal.levels[0] == 0.0
    assert cal.levels[-1] == 1.0
    assert cal.values[0] == normal_scores.min()
    assert cal.values[-1] == normal_scores.max()
    assert np.all(np.diff(cal.values) >= 0)
    assert cal.false_positive_rate == 0.01


def test_threshold_is_the_upper_quantile(cal, normal_scores):
    assert cal.threshold == pytest.approx(np.quantile(normal_scores, 0.99), rel=1e-9)
    assert cal.threshold_for(0.01) == cal.threshold
    assert cal.threshold_for(0.05) == pytest.approx(np.quantile(normal_scores, 0.95), rel=1e-9)
    assert cal.threshold_for(0.5) == pytest.approx(np.median(normal_scores), abs=1e-9)
    assert cal.threshold_for(0.0) == normal_scores.max()
    assert cal.threshold_for(1.0) == normal_scores.min()
    # and the population quantile of N(0, 1), 2.3263..., within sampling error
    assert cal.threshold == pytest.approx(2.3263, abs=0.08)
    # thresholds fall as the false-positive rate rises
    rates = np.linspace(0, 1, 51)
    assert np.all(np.diff([cal.threshold_for(r) for r in rates]) <= 0)


@pytest.mark.parametrize("rate", [-0.01, 1.5])
def test_threshold_rejects_rates_outside_unit_interval(cal, rate):
    with pytest.raises(ValueError, match="false_positive_rate"):
        cal.threshold_for(rate)


def test_custom_false_positive_rate(normal_scores):
    cal = Calibration.fit(normal_scores, score="custom", false_positive_rate=0.1)
    assert cal.score == "custom"
    assert cal.threshold == pytest.approx(np.quantile(normal_scores, 0.9), rel=1e-9)


def test_threshold_holds_on_a_fresh_sample(cal):
    fresh = np.random.default_rng(1).standard_normal(20_000)
    flagged = np.mean(fresh > cal.threshold)
    # binomial sd ~0.0007 from the fresh sample, about as much again from calibration
    assert abs(flagged - 0.01) < 0.004
    at_5 = np.mean(fresh > cal.threshold_for(0.05))
    assert abs(at_5 - 0.05) < 0.008


def test_percentile(cal, normal_scores):
    grid = np.linspace(-6, 6, 241)
    pct = cal.percentile(grid)
    assert pct.shape == grid.shape
    assert np.all(np.diff(pct) >= 0)
    assert np.all(pct[grid < normal_scores.min()] == 0.0)
    assert np.all(pct[grid > normal_scores.max()] == 100.0)
    assert cal.percentile(np.array([-1e9]))[0] == 0.0
    assert cal.percentile(np.array([1e9]))[0] == 100.0
    assert cal.percentile(np.array([cal.threshold]))[0] == pytest.approx(99.0, abs=1e-6)
    # percentile is the empirical CDF (as a percentage) up to the quantile grid's resolution
    probe = np.array([-2.0, -1.0, 0.0, 0.5, 1.5])
    ecdf = 100 * np.mean(normal_scores[None, :] <= probe[:, None], axis=1)
    np.testing.assert_allclose(cal.percentile(probe), ecdf, atol=0.15)


def test_percentile_with_ties():
    cal = Calibration.fit(np.array([1.0] * 50 + [2.0] * 50))
    # half the held-out records score at or below 1.0, all at or below 2.0; np.quantile's linear
    # interpolation between order statistics puts the last level at 1.0 at 49/99, hence ~49.4
    assert cal.percentile(np.array([1.0]))[0] == pytest.approx(50.0, abs=1.0)
    assert cal.percentile(np.array([2.0]))[0] == 100.0
    assert cal.percentile(np.array([0.999]))[0] == 0.0


def test_fit_rejects_bad_scores():
    for bad in (np.array([]), np.array([1.0, np.nan]), np.array([1.0, np.inf]), np.ones((3, 2))):
        with pytest.raises(ValueError, match="finite"):
            Calibration.fit(bad)


def test_dict_round_trip(cal):
    data = json.loads(json.dumps(cal.to_dict()))  # what the artifact stores
    back = Calibration.from_dict(data)
    assert back == cal
    assert back.threshold == cal.threshold
    np.testing.assert_array_equal(back.percentile(np.array([0.0, 1.0])), cal.percentile(np.array([0.0, 1.0])))


def test_from_dict_rejects_decreasing_values(cal):
    data = cal.to_dict()
    values = list(data["values"])
    values[500], values[501] = values[501] + 1.0, values[500]
    with pytest.raises(ValueError, match="non-decreasing"):
        Calibration.from_dict({**data, "values": values})


def test_from_dict_rejects_mismatched_lengths(cal):
    data = cal.to_dict()
    with pytest.raises(ValueError, match="equal-length"):
        Calibration.from_dict({**data, "values": data["values"][:-1]})
    with pytest.raises(ValueError, match="equal-length"):
        Calibration.from_dict({**data, "levels": [0.0], "values": [1.0]})


def test_from_dict_rejects_unknown_or_missing_keys(cal):
    with pytest.raises(TypeError):
        Calibration.from_dict({**cal.to_dict(), "extra": 1})
    data = cal.to_dict()
    del data["threshold"]
    with pytest.raises(TypeError):
        Calibration.from_dict(data)
