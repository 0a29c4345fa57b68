"""Calibrated anomaly results from raw scores: one implementation for the gateway and the in-process scorer.

The score types themselves are defined in artifacts/scores.py. Here a request's score type is resolved
(the model kind's default unless asked), checked against the artifact's calibration, and every item gets its
score, its percentile among held-out normal items, the threshold for the requested false-positive rate
(default: the one calibrated at training time, 1%) and a flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from genserve.artifacts.calibration import Calibration, CalibrationSet
from genserve.artifacts.scores import NEEDS_REFERENCE, check_score, text_lines
from genserve.artifacts.tokenizer import TextTokenizer, UnknownCharactersError
from genserve.service.errors import ApiError
from genserve.service.schemas import AnomalyResponse, AnomalyResult

KIND_PHRASE = {"records": "a model of records", "image": "an image model", "text": "a text model"}


def resolve_score(name: str, input_type: str, score: str | None, calibrations: CalibrationSet | None,
                  per_line: bool = False) -> tuple[str, Calibration]:
    """The score type to compute and its calibration; ApiError 400 when the type does not exist for this kind
    of model or the model was not calibrated for it."""
    try:
        score = check_score(input_type, score)
    except ValueError as e:
        raise ApiError(400, "unknown_score", f"model {name!r}: {e}") from None
    if per_line and input_type != "text":
        raise ApiError(400, "wrong_model_kind", f"per_line is for text models; {name!r} is {KIND_PHRASE[input_type]}")
    calibration = None if calibrations is None else calibrations.get(score, per_line)
    if calibration is None:
        unit = "per line" if per_line else "per item"
        if calibrations is None:
            why = "its artifact has no calibration.json; use log_prob, or retrain to calibrate"
        else:
            why = (f"calibrated {unit}: {', '.join(calibrations.names(per_line)) or 'none'} (retrain to calibrate "
                   "every score type)")
        raise ApiError(400, "not_calibrated", f"model {name!r} has no anomaly calibration for score {score!r} "
                       f"{unit}; {why}")
    return score, calibration


@dataclass
class TextItem:
    text_index: int
    line: int | None  # 1-based line number when scoring per line
    text: str


def text_items(texts: Sequence[str], per_line: bool) -> list[TextItem]:
    """What gets scored: each text whole, or each of its non-blank lines on its own. A text that is not a
    string, or is blank, is an ApiError (there is nothing to score)."""
    if isinstance(texts, str):
        raise ApiError(400, "invalid_request", "texts must be a list of strings, not one string")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ApiError(400, "invalid_request", f"texts[{i}] is not a string")
        if not text.strip():
            raise ApiError(400, "invalid_request", f"texts[{i}] is empty or blank; there is nothing to score")
    if not per_line:
        return [TextItem(i, None, t) for i, t in enumerate(texts)]
    return [TextItem(i, n, line) for i, t in enumerate(texts) for n, line in text_lines(t)]


def text_token_lists(name: str, tokenizer: TextTokenizer, items: list[TextItem], context: int | None
                     ) -> list[list[int]]:
    """Each item's tokens after BOS, as the model scores them; ApiError 400 for characters a character-level
    model has never seen, or for an item longer than the context (None: no limit)."""
    token_lists = []
    for it in items:
        where = f"texts[{it.text_index}]" + ("" if it.line is None else f" line {it.line}")
        try:
            ids = [tokenizer.bos_token_id, *tokenizer.encode(it.text)]
        except UnknownCharactersError as e:
            raise ApiError(400, "unknown_characters", f"{where}: {e}") from None
        if context is not None and len(ids) > context:
            hint = "" if it.line is not None else "; per_line scores lines on their own"
            raise ApiError(400, "context_length_exceeded", f"{where} is {len(ids) - 1} tokens (+1 BOS); model "
                           f"{name!r}'s context length is {context} tokens{hint}")
        token_lists.append(ids)
    return token_lists


def needs_reference(score: str) -> bool:
    return score == NEEDS_REFERENCE


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
