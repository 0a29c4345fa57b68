"""Calibration of anomaly scores on held-out in-distribution data.

The score is the negative log-likelihood in nats (higher = more anomalous). Calibration keeps the
held-out scores' quantiles at 1,001 evenly spaced levels, which gives any score its percentile
(the share of held-out records scoring at or below it) and any false-positive rate its threshold.
Read by the service; written into the artifact as calibration.json.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

N_LEVELS = 1001
DEFAULT_FALSE_POSITIVE_RATE = 0.01


@dataclass(frozen=True)
class Calibration:
    score: str  # what the scores are, e.g. "nll_nats"
    n: int  # held-out records the quantiles came from
    levels: list[float]
    values: list[float]  # held-out score quantile at each level, non-decreasing
    false_positive_rate: float
    threshold: float  # score above which a record is flagged at that false-positive rate

    @classmethod
    def fit(
        cls, scores: np.ndarray, score: str = "nll_nats", false_positive_rate: float = DEFAULT_FALSE_POSITIVE_RATE
    ) -> Calibration:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 1 or scores.size == 0 or not np.isfinite(scores).all():
            raise ValueError("calibration needs a non-empty 1-d array of finite held-out scores")
        levels = np.linspace(0.0, 1.0, N_LEVELS)
        values = np.quantile(scores, levels)
        cal = cls(score, int(scores.size), levels.tolist(), values.tolist(), false_positive_rate, 0.0)
        return cls(**{**asdict(cal), "threshold": cal.threshold_for(false_positive_rate)})

    def threshold_for(self, false_positive_rate: float) -> float:
        """The score that held-out records exceed with the given probability."""
        if not 0.0 <= false_positive_rate <= 1.0:
            raise ValueError(f"false_positive_rate must be within [0, 1], got {false_positive_rate}")
        return float(np.interp(1.0 - false_positive_rate, self.levels, self.values))

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """Percent of held-out records that score at or below each score (0-100)."""
        values = np.asarray(self.values)
        levels = np.asarray(self.levels)
        # np.interp wants strictly increasing x; ties in the quantiles map to their highest level.
        unique, last = np.unique(values[::-1], return_index=True)
        top_level = levels[::-1][last]
        pct = np.interp(np.asarray(scores, dtype=np.float64), unique, top_level, left=0.0, right=1.0)
        return 100.0 * pct

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        cal = cls(**data)
        if len(cal.levels) != len(cal.values) or len(cal.levels) < 2:
            raise ValueError("calibration levels and values must be equal-length lists of 2 or more")
        if np.any(np.diff(cal.values) < 0):
            raise ValueError("calibration values must be non-decreasing")
        return cal
