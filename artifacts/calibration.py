"""Calibration of anomaly scores on held-out in-distribution data.

Every score type (artifacts/scores.py: nll, bits_per_dim, complexity, likelihood_ratio, ...; higher =
more anomalous) is calibrated on its own. A `Calibration` keeps one score's held-out quantiles at 1,001
evenly spaced levels, which gives any score its percentile (the share of held-out items scoring at or
below it) and any false-positive rate its threshold. A `CalibrationSet` holds one per score type (text
models: per whole text and per line) and is the artifact's calibration.json, read by the service.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

N_LEVELS = 1001
DEFAULT_FALSE_POSITIVE_RATE = 0.01
CALIBRATION_FORMAT = 2  # 1: a single Calibration of -log p in nats (named "nll_nats"); 2: a CalibrationSet
LEGACY_NAMES = {"nll_nats": "nll"}
LINE = "line:"  # key prefix of text models' per-line calibrations, e.g. "line:bits_per_char"


@dataclass(frozen=True)
class Calibration:
    score: str  # the score type, e.g. "nll"
    n: int  # held-out records the quantiles came from
    levels: list[float]
    values: list[float]  # held-out score quantile at each level, non-decreasing
    false_positive_rate: float
    threshold: float  # score above which a record is flagged at that false-positive rate

    @classmethod
    def fit(
        cls, scores: np.ndarray, score: str = "nll", false_positive_rate: float = DEFAULT_FALSE_POSITIVE_RATE
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
        data = {**data, "score": LEGACY_NAMES.get(data.get("score", ""), data.get("score"))}
        cal = cls(**data)
        if len(cal.levels) != len(cal.values) or len(cal.levels) < 2:
            raise ValueError("calibration levels and values must be equal-length lists of 2 or more")
        if np.any(np.diff(cal.values) < 0):
            raise ValueError("calibration values must be non-decreasing")
        return cal


@dataclass(frozen=True)
class CalibrationSet:
    """One Calibration per score type, keyed by the score's name (text per-line scores: LINE + name)."""

    scores: dict[str, Calibration]

    @classmethod
    def fit(cls, scores: dict[str, np.ndarray], false_positive_rate: float = DEFAULT_FALSE_POSITIVE_RATE
            ) -> CalibrationSet:
        return cls({key: Calibration.fit(values, score=key.removeprefix(LINE),
                                         false_positive_rate=false_positive_rate)
                    for key, values in scores.items()})

    def get(self, score: str, per_line: bool = False) -> Calibration | None:
        return self.scores.get(LINE + score if per_line else score)

    def names(self, per_line: bool = False) -> list[str]:
        """The calibrated score types (per whole item, or per line)."""
        return [k.removeprefix(LINE) for k in self.scores if k.startswith(LINE) == per_line]

    def to_dict(self) -> dict:
        return {"format": CALIBRATION_FORMAT, "scores": {k: c.to_dict() for k, c in self.scores.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> CalibrationSet:
        """Reads both formats: an artifact written before score types existed holds a single calibration
        of -log p(x) in nats, which becomes this set's "nll"."""
        if "format" not in data:
            cal = Calibration.from_dict(data)
            return cls({cal.score: cal})
        if data["format"] != CALIBRATION_FORMAT:
            raise ValueError(f"calibration format {data['format']} is not supported (this genserve reads "
                             f"1 and {CALIBRATION_FORMAT})")
        scores = {k: Calibration.from_dict(c) for k, c in data["scores"].items()}
        if not scores:
            raise ValueError("the calibration has no score types")
        return cls(scores)


def read_calibration(loaded) -> CalibrationSet | None:
    """The calibration.json of a loaded artifact (genserve.artifacts.artifact.Artifact), or None when it has none."""
    from genserve.artifacts import artifact

    if artifact.CALIBRATION not in loaded.contents:
        return None
    try:
        return CalibrationSet.from_dict(loaded.json(artifact.CALIBRATION))
    except (TypeError, ValueError, KeyError) as e:
        raise artifact.ArtifactError(f"{loaded.path / artifact.CALIBRATION}: invalid calibration ({e})") from None
