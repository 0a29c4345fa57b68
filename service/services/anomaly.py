"""Calibrated anomaly scores for records, images and texts: one implementation for the ingress (/v1 and /v2,
through AnomalyService) and the in-process scorer (service/local.py, through the functions below).

The score types themselves are defined in artifacts/scores.py. Here a request's score type is resolved
(the model kind's default unless asked), checked against the artifact's calibration, and every item gets its
score, its percentile among held-out normal items, the threshold for the requested false-positive rate
(default: the one calibrated at training time, 1%) and a flag.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from genserve.artifacts.artifact import DensityCapability
from genserve.artifacts.calibration import Calibration, CalibrationSet, batch_typicality
from genserve.artifacts.scores import (
    CLASS_SCORES,
    NEEDS_REFERENCE,
    check_score,
    compute_scores,
    needed_scores,
    png_bits,
    text_lines,
)
from genserve.artifacts.tokenizer import TextTokenizer, UnknownCharactersError
from genserve.service.catalog import ModelCatalog, kind_phrase
from genserve.service.errors import InvalidInput, LimitExceeded, NotCalibrated, TooLarge, WrongKind
from genserve.service.services.images import ImageService
from genserve.service.services.records import RecordsService
from genserve.service.services.text import TextService

ScoreType = Literal["nll", "bits_per_dim", "bits_per_char", "complexity", "likelihood_ratio", "knn", "mahalanobis",
                    "class_evidence", "class_entropy", "typicality", "ensemble"]
SCORE_DESCRIPTION = (
    "anomaly score type (higher = more anomalous): nll (-log p(x), nats); bits_per_dim (records, images: -log2 "
    "p(x) / dimensions); bits_per_char (text: mean surprisal per character); complexity (images: -log2 p(x) "
    "minus the image's PNG size in bits); likelihood_ratio (log p_ref(x) - log p(x) against the artifact's "
    "simpler reference model; nats, text: bits per character); knn (distance to the 5th nearest training item in "
    "the model's input space; text (GPT, LSTM): in its mean final hidden state); mahalanobis (images: "
    "class-conditional Gaussian distance to the nearest training class in the first 50 principal components); "
    "class_evidence (class-conditional image models: -max over classes of log p(x | y), nats); class_entropy "
    "(class-conditional image models: the entropy of p(y | x), nats); typicality (|nll - the held-out mean nll|; "
    "text: |bits_per_char - the held-out mean|); ensemble (the mean calibrated tail score, -ln P(held-out score "
    ">= s), of the distances knn and mahalanobis (text: of bits_per_char), plus each other member's tail beyond "
    "its held-out 99th percentile). Default: the artifact's own (GET /v1/models/{name}: calibration.score, and "
    "why; the ensemble for models trained since it exists), else nll for records, complexity for images, "
    "bits_per_char for text"
)


class AnomalyResult(BaseModel):
    score: float = Field(description="the anomaly score of score_type (higher = more anomalous)")
    log_prob: float = Field(description="log p(x) in nats (text: of the whole text or line)")
    percentile: float = Field(description="percent of held-out normal items scoring at or below this one")
    is_anomaly: bool = Field(description="score > threshold")
    component: int | None = Field(None, description="GMMs: the most likely mixture component")
    responsibility: float | None = Field(None, description="GMMs: that component's posterior probability")
    text_index: int | None = Field(None, description="text per_line: which text the line is from")
    line: int | None = Field(None, description="text per_line: the line's 1-based number in its text")


class BatchTypicality(BaseModel):
    score_type: Literal["nll", "bits_per_char"] = Field(description="the per-item score the test averages: nll "
                                                        "(records, images) or bits_per_char (texts)")
    n: int = Field(description="items in the batch")
    mean: float = Field(description="the batch's mean score")
    typical: float = Field(description="the held-out mean score, the centre of the typical set")
    statistic: float = Field(description="|mean - typical|")
    p_value: float = Field(description="share of 2,000 batches of n held-out items (resampled from the calibration) "
                           "at least as far from typical")
    is_anomaly: bool = Field(description="p_value < the false-positive rate (the request's, else 0.01)")


class AnomalyResponse(BaseModel):
    model: str
    version: str
    score_type: ScoreType
    threshold: float
    false_positive_rate: float | None = Field(
        description="held-out false-positive rate of the threshold (null when the request set the threshold)"
    )
    results: list[AnomalyResult]
    density: DensityCapability = Field("exact", description="what the scores' log_prob is: exact, or a lower "
                                       "bound on log p(x)")
    batch: BatchTypicality | None = Field(None, description="with batch_test: the typicality test of all the "
                                          "request's items together (null otherwise)")


KIND_PHRASE = {"records": "a model of records", "image": "an image model", "text": "a text model"}


def resolve_score(name: str, input_type: str, score: str | None, calibrations: CalibrationSet | None,
                  per_line: bool = False) -> tuple[str, Calibration]:
    """The score type to compute and its calibration; InvalidInput when the type does not exist for this kind
    of model or the model was not calibrated for it."""
    try:
        score = check_score(input_type, score, None if calibrations is None else calibrations.default)
    except ValueError as e:
        raise InvalidInput(f"model {name!r}: {e}", type_="unknown_score") from None
    if per_line and input_type != "text":
        raise WrongKind(f"per_line is for text models; {name!r} is {KIND_PHRASE[input_type]}")
    calibration = None if calibrations is None else calibrations.get(score, per_line)
    if calibration is None:
        unit = "per line" if per_line else "per item"
        if calibrations is None:
            why = "its artifact has no calibration.json; use log_prob, or retrain to calibrate"
        elif score in CLASS_SCORES:
            why = "the score needs a class-conditional image model (trained with --conditional)"
        elif score == "knn" and input_type == "text":
            why = ("text knn needs a model with hidden states (gpt or lstm, trained since the score exists); an "
                   "n-gram model has none")
        else:
            why = (f"calibrated {unit}: {', '.join(calibrations.names(per_line)) or 'none'} (retrain to calibrate "
                   "every score type)")
        raise NotCalibrated(f"model {name!r} has no anomaly calibration for score {score!r} "
                       f"{unit}; {why}")
    return score, calibration


@dataclass
class TextItem:
    text_index: int
    line: int | None  # 1-based line number when scoring per line
    text: str


def text_items(texts: Sequence[str], per_line: bool) -> list[TextItem]:
    """What gets scored: each text whole, or each of its non-blank lines on its own. A text that is not a
    string, or is blank, is an InvalidInput (there is nothing to score)."""
    if isinstance(texts, str):
        raise InvalidInput("texts must be a list of strings, not one string")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInput(f"texts[{i}] is not a string")
        if not text.strip():
            raise InvalidInput(f"texts[{i}] is empty or blank; there is nothing to score")
    if not per_line:
        return [TextItem(i, None, t) for i, t in enumerate(texts)]
    return [TextItem(i, n, line) for i, t in enumerate(texts) for n, line in text_lines(t)]


def text_token_lists(name: str, tokenizer: TextTokenizer, items: list[TextItem], context: int | None
                     ) -> list[list[int]]:
    """Each item's tokens after BOS, as the model scores them; InvalidInput for characters a character-level
    model has never seen, or for an item longer than the context (None: no limit)."""
    token_lists = []
    for it in items:
        where = f"texts[{it.text_index}]" + ("" if it.line is None else f" line {it.line}")
        try:
            ids = [tokenizer.bos_token_id, *tokenizer.encode(it.text)]
        except UnknownCharactersError as e:
            raise InvalidInput(f"{where}: {e}", type_="unknown_characters") from None
        if context is not None and len(ids) > context:
            hint = "" if it.line is not None else "; per_line scores lines on their own"
            raise LimitExceeded(f"{where} is {len(ids) - 1} tokens (+1 BOS); model {name!r}'s context length is "
                                f"{context} tokens{hint}", type_="context_length_exceeded")
        token_lists.append(ids)
    return token_lists


def needs_reference(needed: set[str]) -> bool:
    return NEEDS_REFERENCE in needed


def chosen_score(score: str, raw: dict[str, np.ndarray], calibrations: CalibrationSet,
                 per_line: bool = False) -> np.ndarray:
    """The values of the requested score type from the raw scores: the ensemble's from its members'."""
    return calibrations.ensemble(raw, per_line) if score == "ensemble" else raw[score]


def not_conditional(name: str) -> NotCalibrated:
    return NotCalibrated(f"model {name!r} is not class-conditional: class_evidence and class_entropy need a model "
                         "trained with --conditional")


def no_index(name: str, score: str) -> NotCalibrated:
    what = {"knn": "neighbour index", "mahalanobis": "class Gaussians"}[score]
    return NotCalibrated(f"model {name!r} has no {what} for the {score} score (its artifact predates it; retrain)")


def anomaly_response(
    name: str, version: str, score: str, calibration: Calibration, values: np.ndarray, log_prob: np.ndarray,
    threshold: float | None, false_positive_rate: float | None, extras: dict[str, Sequence] | None = None,
) -> AnomalyResponse:
    """Percentiles, threshold and flags of `values` (the chosen score of each item). The request sets either a
    threshold (in the score's units) or a false-positive rate; neither: the calibrated default rate."""
    if threshold is not None:
        fpr = None
    else:
        fpr = false_positive_rate or calibration.false_positive_rate
        threshold = calibration.threshold_for(fpr)
    values = np.asarray(values, dtype=np.float64)
    flags = values > threshold
    percentiles = calibration.percentile(values)
    extras = extras or {}
    results = []
    for i, (s, lp, p, f) in enumerate(zip(values.tolist(), np.asarray(log_prob).tolist(), percentiles.tolist(),
                                          flags.tolist(), strict=True)):
        results.append(AnomalyResult(score=s, log_prob=lp, percentile=p, is_anomaly=f,
                                     **{k: v[i] for k, v in extras.items()}))
    return AnomalyResponse(model=name, version=version, score_type=score, threshold=threshold,
                           false_positive_rate=fpr, results=results)


def batch_test_result(name: str, input_type: str, raw: dict[str, np.ndarray], calibrations: CalibrationSet,
                      per_line: bool, false_positive_rate: float | None) -> BatchTypicality:
    """The typicality test of the whole batch (artifacts.calibration.batch_typicality) on each item's nll, or for
    text its bits_per_char, against the held-out distribution of the same score."""
    score = "bits_per_char" if input_type == "text" else "nll"
    calibration, centre = calibrations.get(score, per_line), calibrations.typical(per_line)
    if calibration is None or centre is None:
        raise NotCalibrated(f"model {name!r} has no typical-set centre for batch_test (its calibration predates "
                            "typicality; retrain)")
    statistic, p_value = batch_typicality(calibration, centre, raw[score])
    rate = false_positive_rate or calibration.false_positive_rate
    return BatchTypicality(score_type=score, n=len(raw[score]), mean=float(np.mean(raw[score])), typical=centre,
                           statistic=statistic, p_value=p_value, is_anomaly=p_value < rate)


def gmm_extras(responsibilities: np.ndarray) -> dict[str, list]:
    """Each record's most likely mixture component and its responsibility (posterior probability)."""
    resp = np.asarray(responsibilities)
    if resp.ndim != 2 or resp.shape[1] == 0:  # not a mixture: no components
        return {}
    return {"component": resp.argmax(1).tolist(), "responsibility": resp.max(1).tolist()}


def text_extras(items: list[TextItem], per_line: bool) -> dict[str, list]:
    if not per_line:
        return {}
    return {"text_index": [it.text_index for it in items], "line": [it.line for it in items]}


@dataclass
class AnomalyInputs:
    """What one anomaly request scores: exactly one of records, images (with optional labels) or texts."""

    records: Sequence[Sequence[float]] | None = None
    images: Sequence[Any] | None = None
    labels: Sequence[int] | None = None
    texts: Sequence[str] | None = None


INPUT_FIELD = {"records": "records", "image": "images", "text": "texts"}


class AnomalyService:
    """Checks a request against the model's family and calibration before any model runs, gathers what the
    score type needs (log p from the model's replica; the reference model's log p for likelihood_ratio and the
    neighbour index's distances for knn, from the replica too; PNG sizes for complexity, computed here; for the
    ensemble, all of its members') and turns the raw scores into percentiles, thresholds and flags."""

    def __init__(self, catalog: ModelCatalog, records: RecordsService, images: ImageService, text: TextService):
        self.catalog, self.records, self.images, self.text = catalog, records, images, text

    async def score(self, name: str, inputs: AnomalyInputs, score: str | None = None, threshold: float | None = None,
                    false_positive_rate: float | None = None, per_line: bool = False, batch_test: bool = False
                    ) -> tuple[AnomalyResponse, int]:
        """The response and the number of items scored."""
        if threshold is not None and false_positive_rate is not None:
            raise InvalidInput("give threshold or false_positive_rate, not both")
        if threshold is not None and not math.isfinite(threshold):
            raise InvalidInput(f"threshold must be a finite number, got {threshold}")
        if false_positive_rate is not None and not 0.0 < false_positive_rate < 1.0:
            raise InvalidInput(f"false_positive_rate must be greater than 0 and less than 1, got {false_positive_rate}")
        manifest = self.catalog.require_density(name, "anomaly scores")
        input_type = manifest.input.type
        self._check_fields(name, inputs)
        calibrations = self.catalog.calibration(name)
        score, calibration = resolve_score(name, input_type, score, calibrations, per_line)
        needed = needed_scores(score, calibrations.members)
        if input_type == "records":
            raw, log_prob, extras, n = await self._records(name, inputs, needed, calibrations)
        elif input_type == "image":
            raw, log_prob, extras, n = await self._images(name, inputs, needed, calibrations)
        else:
            raw, log_prob, extras, n = await self._texts(name, inputs, needed, per_line, calibrations)
        values = chosen_score(score, raw, calibrations, per_line)
        response = anomaly_response(name, manifest.version, score, calibration, values, log_prob, threshold,
                                    false_positive_rate, extras)
        response.density = manifest.density
        if batch_test:
            response.batch = batch_test_result(name, input_type, raw, calibrations, per_line, false_positive_rate)
        return response, n

    def _check_fields(self, name: str, inputs: AnomalyInputs) -> None:
        manifest = self.catalog.manifest(name)
        wanted = INPUT_FIELD[manifest.input.type]
        for field in INPUT_FIELD.values():
            if field != wanted and getattr(inputs, field) is not None:
                raise WrongKind(f"{field} given; {kind_phrase(name, manifest)}")
        if inputs.labels is not None and manifest.input.type != "image":
            raise WrongKind(f"labels are for image models; {kind_phrase(name, manifest)}")

    async def _reference(self, name: str, inputs: Any, needed: set[str]) -> np.ndarray | None:
        if not needs_reference(needed):
            return None
        ref = await self.catalog.call(name, "reference_log_prob", inputs, action="score")
        if ref is None:
            raise NotCalibrated(f"model {name!r} has no reference model for likelihood_ratio (its artifact predates "
                                "it; retrain)")
        return np.asarray(ref, dtype=np.float64)

    async def _distance(self, name: str, inputs: np.ndarray, needed: set[str], score: str) -> np.ndarray | None:
        """The replica's raw distances for the knn or mahalanobis score, when `needed`."""
        if score not in needed:
            return None
        distance = await self.catalog.call(name, f"{score}_distance", inputs, action="score")
        if distance is None:
            raise no_index(name, score)
        return np.asarray(distance, dtype=np.float64)

    async def _records(self, name: str, inputs: AnomalyInputs, needed: set[str], calibrations: CalibrationSet):
        scored = await self.records.log_prob(name, inputs.records)
        raw = compute_scores("records", scored.log_prob, scored.records.shape[1],
                             reference_log_prob=await self._reference(name, scored.records, needed),
                             knn_distance=await self._distance(name, scored.records, needed, "knn"),
                             typical_nll=calibrations.typical())
        return raw, scored.log_prob, gmm_extras(scored.responsibilities), len(scored.records)

    async def _images(self, name: str, inputs: AnomalyInputs, needed: set[str], calibrations: CalibrationSet):
        scored = await self.images.log_prob(name, inputs.images, inputs.labels, endpoint="anomaly")
        spec = self.catalog.manifest(name).input
        bits = png_bits(scored.images, spec.levels) if "complexity" in needed else None
        raw = compute_scores("image", scored.log_prob, spec.height * spec.width,
                             reference_log_prob=await self._reference(name, scored.images, needed),
                             complexity_bits=bits,
                             knn_distance=await self._distance(name, scored.images, needed, "knn"),
                             mahalanobis=await self._distance(name, scored.images, needed, "mahalanobis"),
                             class_scores=await self._class_scores(name, scored.images, needed),
                             typical_nll=calibrations.typical())
        return raw, scored.log_prob, {}, len(scored.images)

    async def _class_scores(self, name: str, images: np.ndarray, needed: set[str]) -> dict[str, np.ndarray] | None:
        if not needed & set(CLASS_SCORES):
            return None
        scores = await self.catalog.call(name, "class_scores", images, action="score")
        if scores is None:
            raise not_conditional(name)
        return scores

    async def _texts(self, name: str, inputs: AnomalyInputs, needed: set[str], per_line: bool,
                     calibrations: CalibrationSet):
        texts = inputs.texts
        limit = self.catalog.limits.max_texts_per_request
        if len(texts) > limit:
            raise TooLarge(f"{len(texts)} texts in one request; the limit is {limit} "
                           "(limits.max_texts_per_request)")
        items = text_items(texts, per_line)
        _, tokenizer = self.catalog.text_model(name)
        token_lists = text_token_lists(name, tokenizer, items, self.text.context_length(name))
        per_token = await self.catalog.call(name, "score", token_lists)
        log_prob = np.array([sum(lps) for lps in per_token], dtype=np.float64)
        ref = await self._reference(name, token_lists, needed)
        chars = np.array([len(it.text) for it in items])
        raw = compute_scores("text", log_prob, chars, reference_log_prob=ref,
                             knn_distance=await self._distance(name, token_lists, needed, "knn"),
                             typical_nll=calibrations.typical(per_line))
        return raw, log_prob, text_extras(items, per_line), len(items)
