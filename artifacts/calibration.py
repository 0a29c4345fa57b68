"""Calibration of anomaly scores on held-out in-distribution data.

Every score type (artifacts/scores.py: nll, bits_per_dim, complexity, likelihood_ratio, ...; higher =
more anomalous) is calibrated on its own. A `Calibration` keeps one score's held-out quantiles at 1,001
evenly spaced levels, which gives any score its percentile (the share of held-out items scoring at or
below it) and any false-positive rate its threshold. A `CalibrationSet` holds one per score type (text
models: per whole text and per line) and is the artifact's calibration.json, read by the service. Since the
ensemble score it also names the artifact's default score type, why, the ensemble's members and the typical nll
of the typicality score, all chosen on held-out normal data (`fit_anomaly_calibration`); older calibrations lack
them and keep their kind's default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import spearmanr

from genserve.artifacts.scores import (
    ENSEMBLE_CANDIDATES,
    ENSEMBLE_MAX_CORRELATION,
    ENSEMBLE_PRIMARY,
    ENSEMBLE_PRIMARY_BY_KIND,
)

ENSEMBLE_SECONDARY_TAIL = float(np.log(100.0))  # a secondary member's tail score at its held-out 99th percentile

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
    # The typicality score's centre where it is this calibration's own (text: the held-out mean bits/char of
    # whole texts or of lines); records and images keep theirs in CalibrationSet.typical_nll.
    centre: float | None = None

    @classmethod
    def fit(
        cls, scores: np.ndarray, score: str = "nll", false_positive_rate: float = DEFAULT_FALSE_POSITIVE_RATE,
        centre: float | None = None,
    ) -> Calibration:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 1 or scores.size == 0 or not np.isfinite(scores).all():
            raise ValueError("calibration needs a non-empty 1-d array of finite held-out scores")
        levels = np.linspace(0.0, 1.0, N_LEVELS)
        values = np.quantile(scores, levels)
        cal = cls(score, int(scores.size), levels.tolist(), values.tolist(), false_positive_rate, 0.0, centre)
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

    def tail(self, scores: np.ndarray) -> np.ndarray:
        """-ln P(held-out score >= s): 0 at the bottom, ln 10 at the 90th percentile, ln 100 at the 99th; above
        the 90th percentile an exponential tail matched to the held-out 90th and 99th percentiles, so it keeps
        growing past the largest held-out score (a percentile stops at 100 and would tie every far outlier)."""
        s = np.asarray(scores, dtype=np.float64)
        q90, q99 = (float(np.interp(q, self.levels, self.values)) for q in (0.9, 0.99))
        spread = max(q99 - q90, 1e-3 * (self.values[-1] - self.values[0]), 1e-12) / np.log(10.0)
        below = -np.log(np.maximum(1.0 - self.percentile(s) / 100.0, 0.1))
        with np.errstate(over="ignore"):
            tail = np.where(s >= q90, np.log(10.0) + (s - q90) / spread, below)
        return np.minimum(tail, 1e300)  # finite, as every served score

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["centre"] is None:
            del out["centre"]  # calibration.json as before for every score but text typicality
        return out

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
    default: str | None = None  # the artifact's default score type; None: its kind's (scores.DEFAULT_SCORE)
    why: str | None = None  # how the default was chosen
    members: list[str] = field(default_factory=list)  # the ensemble's score types
    typical_nll: float | None = None  # the typicality score's centre: the validation split's mean nll
    # The members whose tails are averaged (`primary`); None: the distances among the members, else the first.
    primary_members: list[str] | None = None

    @classmethod
    def fit(cls, scores: dict[str, np.ndarray], false_positive_rate: float = DEFAULT_FALSE_POSITIVE_RATE
            ) -> CalibrationSet:
        return cls({key: Calibration.fit(values, score=key.removeprefix(LINE),
                                         false_positive_rate=false_positive_rate)
                    for key, values in scores.items()})

    def ensemble(self, raw: dict[str, np.ndarray], per_line: bool = False) -> np.ndarray:
        """The ensemble score of items from their members' raw scores: the mean tail score of its primary
        members (the distances, ENSEMBLE_PRIMARY; else the first member), plus each other member's tail beyond
        ENSEMBLE_SECONDARY_TAIL (its held-out 99th percentile). The primary members rank the items; another
        changes the ranking only where it finds an item rarer than 1 in 100 normal ones, so it adds what the
        distances miss (a blank image, a digit too simple to be typical) without blurring their ranking with its
        noise (a plain mean of five tails lost 0.05-0.15 AUROC to knn alone on unseen digit classes)."""
        primary = self.primary()
        total = np.mean([self.get(m, per_line).tail(raw[m]) for m in primary], axis=0)
        for m in (m for m in self.members if m not in primary):
            total = total + np.maximum(self.get(m, per_line).tail(raw[m]) - ENSEMBLE_SECONDARY_TAIL, 0.0)
        return np.minimum(total, 1e300)

    def primary(self) -> list[str]:
        """The ensemble members whose tails are averaged: those named (text: bits_per_char), else the distances
        among them, else the first."""
        if self.primary_members:
            return list(self.primary_members)
        return [m for m in self.members if m in ENSEMBLE_PRIMARY] or self.members[:1]

    def get(self, score: str, per_line: bool = False) -> Calibration | None:
        return self.scores.get(LINE + score if per_line else score)

    def typical(self, per_line: bool = False) -> float | None:
        """The typicality score's centre (per whole item, or per line), None when it is not calibrated."""
        cal = self.get("typicality", per_line)
        if cal is not None and cal.centre is not None:
            return cal.centre
        return None if per_line else self.typical_nll

    def names(self, per_line: bool = False) -> list[str]:
        """The calibrated score types (per whole item, or per line)."""
        return [k.removeprefix(LINE) for k in self.scores if k.startswith(LINE) == per_line]

    def to_dict(self) -> dict:
        out: dict = {"format": CALIBRATION_FORMAT, "scores": {k: c.to_dict() for k, c in self.scores.items()}}
        if self.default is not None:
            out |= {"default": self.default, "why": self.why, "members": self.members}
        if self.primary_members:
            out["primary"] = self.primary_members
        if self.typical_nll is not None:
            out["typical_nll"] = self.typical_nll
        return out

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
        members = list(data.get("members") or [])
        for prefix in ("", LINE):
            if prefix + "ensemble" in scores and (not members or any(prefix + m not in scores for m in members)):
                raise ValueError("an ensemble calibration needs its members, each calibrated")
        default = data.get("default")
        if default is not None and default not in scores:
            raise ValueError(f"the default score {default!r} is not calibrated")
        typical = data.get("typical_nll")
        if any(c.score == "typicality" and c.centre is None for c in scores.values()) and typical is None:
            raise ValueError("a typicality calibration needs typical_nll or its own centre")
        primary = data.get("primary")
        if primary is not None and (not primary or any(m not in members for m in primary)):
            raise ValueError("the ensemble's primary members must be among its members")
        return cls(scores, default, data.get("why"), members, None if typical is None else float(typical), primary)


BATCH_BOOTSTRAP = 2000  # resampled batches behind a batch typicality test's p-value
BATCH_BOOTSTRAP_CHUNK = 1 << 20  # draws per chunk: bounds the resampling's memory whatever the batch size


def batch_typicality(calibration: Calibration, centre: float, values: np.ndarray, seed: int = 0
                     ) -> tuple[float, float]:
    """Nalisnick et al. 2019's typicality test of a whole batch ("Detecting out-of-distribution inputs to deep
    generative models using typicality"): the statistic |mean(values) - centre| of the batch's per-item scores
    (nll, or text's bits_per_char) and its p-value, the share of BATCH_BOOTSTRAP batches of the same size drawn
    from the held-out distribution (its stored quantiles) whose statistic is at least as large. Seeded: the same
    batch gets the same p-value."""
    values = np.asarray(values, dtype=np.float64)
    statistic = abs(float(values.mean()) - centre)
    rng = np.random.default_rng(seed)
    rows = max(1, BATCH_BOOTSTRAP_CHUNK // len(values))
    exceed = 0
    for start in range(0, BATCH_BOOTSTRAP, rows):
        draws = np.interp(rng.random((min(rows, BATCH_BOOTSTRAP - start), len(values))), calibration.levels,
                          calibration.values)
        exceed += int((np.abs(draws.mean(axis=1) - centre) >= statistic).sum())
    return statistic, (1 + exceed) / (1 + BATCH_BOOTSTRAP)


def choose_members(validation: dict[str, np.ndarray], candidates: tuple[str, ...]) -> tuple[list[str], str]:
    """The ensemble's members among `candidates` (in order of preference) that `validation` holds: each one kept
    unless it ranks the held-out items like one kept before it (|Spearman| > ENSEMBLE_MAX_CORRELATION), which
    would only weigh that signal twice. Uses held-out normal data only. Returns the members and why."""
    kept: list[str] = []
    dropped = []
    for name in (c for c in candidates if c in validation):
        values = np.asarray(validation[name], dtype=np.float64)
        rho = {k: abs(float(spearmanr(values, validation[k]).statistic)) for k in kept}
        twin = max(rho, key=rho.get, default=None)
        if twin is not None and (np.isnan(rho[twin]) or rho[twin] > ENSEMBLE_MAX_CORRELATION):
            dropped.append(f"{name} (rank correlation {rho[twin]:.2f} with {twin})")
        else:
            kept.append(name)
    why = (f"ensemble of {', '.join(kept)}: every calibrated candidate ({', '.join(candidates)}) except those that "
           f"rank the held-out normal items like one already kept (|Spearman| > {ENSEMBLE_MAX_CORRELATION})"
           + (f": {'; '.join(dropped)}" if dropped else "") + "; chosen on validation data only, no anomalies")
    return kept, why


def fit_anomaly_calibration(input_type: str, validation: dict[str, np.ndarray],
                            false_positive_rate: float = DEFAULT_FALSE_POSITIVE_RATE,
                            primary: list[str] | None = None, primary_why: str = "") -> CalibrationSet:
    """Every score type in `validation` (raw scores of the held-out normal items, compute_scores' output), and
    for records and images typicality (centred on the mean held-out nll), the ensemble of the members
    `choose_members` picks, and the ensemble as the artifact's default when it has two members or more (else the
    kind's default)."""
    typical = None
    if input_type in ENSEMBLE_CANDIDATES:
        typical = float(np.mean(validation["nll"]))
        validation = {**validation, "typicality": np.abs(np.asarray(validation["nll"]) - typical)}
    calibrations = CalibrationSet.fit(validation, false_positive_rate)
    members, why = choose_members(validation, ENSEMBLE_CANDIDATES.get(input_type, ()))
    if len(members) < 2:
        return CalibrationSet(calibrations.scores, typical_nll=typical)
    # `primary`, when the caller measured which members to rank by (images: artifacts/unseen_class.py), else the
    # kind's rule. Stored by name so that a later change of the rule leaves this artifact's ensemble (and its
    # threshold) as is.
    chosen = [m for m in primary or () if m in members]
    if chosen:
        why += f"; {primary_why}" if primary_why else ""
    else:
        chosen = [m for m in ENSEMBLE_PRIMARY_BY_KIND.get(input_type, ()) if m in members]
    primary = chosen or None
    if primary:
        why += f"; ranked by {', '.join(primary)}, the others adding their tails beyond their held-out 99th percentile"
    with_members = CalibrationSet(calibrations.scores, "ensemble", why, members, typical, primary)
    ensemble = Calibration.fit(with_members.ensemble(validation), "ensemble", false_positive_rate)
    return CalibrationSet({**calibrations.scores, "ensemble": ensemble}, "ensemble", why, members, typical, primary)


def fit_text_calibration(units: dict[str, dict[str, np.ndarray]],
                         false_positive_rate: float = DEFAULT_FALSE_POSITIVE_RATE) -> CalibrationSet:
    """A text model's calibrations from the held-out raw scores of each unit (key prefix "" for whole texts,
    LINE for lines): each score type as given, and the per-token typicality, |bits_per_char - the unit's mean
    held-out bits_per_char|, whose centre its calibration keeps; and, when `choose_members` keeps two members or
    more (knn needs a model with hidden states), the ensemble of each unit, the artifact's default."""
    calibrations: dict[str, Calibration] = {}
    units = dict(units)
    for prefix, validation in units.items():
        bpc = np.asarray(validation["bits_per_char"], dtype=np.float64)
        centre = float(np.mean(bpc))
        units[prefix] = validation = {**validation, "typicality": np.abs(bpc - centre)}
        for name, values in validation.items():
            calibrations[prefix + name] = Calibration.fit(values, name, false_positive_rate,
                                                          centre if name == "typicality" else None)
    # One member list for both units, chosen on the unit with more held-out items (usually lines: rank correlations
    # of a few dozen paragraphs say little).
    basis = max(units.values(), key=lambda validation: len(validation["bits_per_char"]))
    members, why = choose_members(basis, ENSEMBLE_CANDIDATES["text"])
    primary = [m for m in ENSEMBLE_PRIMARY_BY_KIND["text"] if m in members]
    if len(members) < 2 or not primary:
        return CalibrationSet(calibrations)
    why += f"; ranked by {', '.join(primary)}, the others adding their tails beyond their held-out 99th percentile"
    with_members = CalibrationSet(calibrations, "ensemble", why, members, primary_members=primary)
    for prefix, validation in units.items():
        ensemble = with_members.ensemble(validation, per_line=prefix == LINE)
        calibrations[prefix + "ensemble"] = Calibration.fit(ensemble, "ensemble", false_positive_rate)
    return CalibrationSet(calibrations, "ensemble", why, members, primary_members=primary)


def read_calibration(loaded) -> CalibrationSet | None:
    """The calibration.json of a loaded artifact (genserve.artifacts.artifact.Artifact), or None when it has none."""
    from genserve.artifacts import artifact

    if artifact.CALIBRATION not in loaded.contents:
        return None
    try:
        return CalibrationSet.from_dict(loaded.json(artifact.CALIBRATION))
    except (TypeError, ValueError, KeyError) as e:
        raise artifact.ArtifactError(f"{loaded.path / artifact.CALIBRATION}: invalid calibration ({e})") from None
