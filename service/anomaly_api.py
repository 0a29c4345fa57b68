"""`POST /v1/models/{name}/anomaly` for every kind of model: records, images and texts.

`AnomalyRoutes` is mixed into the Gateway (service/app.py). It checks the request against the model's kind and
its calibration before any model runs, gathers what the chosen score type needs (log p from the model's
deployment; the reference model's log p for likelihood_ratio; PNG sizes for complexity, computed here) and
hands the raw scores to service/anomaly.py for percentiles, thresholds and flags.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from genserve.artifacts import artifact as art
from genserve.artifacts.calibration import CalibrationSet
from genserve.artifacts.scores import compute_scores, png_bits
from genserve.service.anomaly import (
    TextItem,
    anomaly_response,
    gmm_extras,
    needs_reference,
    resolve_score,
    text_extras,
    text_items,
    text_token_lists,
)
from genserve.service.errors import ERRORS, ApiError, model_kind_phrase, require_density
from genserve.service.schemas import AnomalyRequest, AnomalyResponse

router = APIRouter()
INPUT_FIELD = {"records": "records", "image": "images", "text": "texts"}


class AnomalyRoutes:
    """Expects the Gateway's handles, manifests, calibrations, tokenizers, limits and its _records, _score,
    _image_log_prob and _max_len helpers."""

    handles: dict
    manifests: dict[str, art.Manifest]
    calibrations: dict[str, CalibrationSet]

    @router.post("/v1/models/{name}/anomaly", name="anomaly", response_model=AnomalyResponse,
                 tags=["density"], responses=ERRORS)
    async def anomaly(self, name: str, body: AnomalyRequest, request: Request) -> AnomalyResponse:
        """Calibrated anomaly scores for records, images or texts: each item's score (the requested score
        type, default nll for records, complexity for images, bits_per_char for texts), log p, percentile among
        held-out normal items, and a flag at the calibrated threshold for a 1% false-positive rate unless the
        request gives `threshold` or `false_positive_rate`. GMMs add the most likely component and its
        responsibility; texts can be scored per line."""
        manifest = self._manifest(name)
        input_type = manifest.input.type
        require_density(name, manifest, "anomaly scores")
        self._check_anomaly_fields(name, manifest, body)
        score, calibration = resolve_score(name, input_type, body.score, self.calibrations.get(name),
                                           body.per_line)
        if input_type == "records":
            values, log_prob, extras, n = await self._records_anomaly(name, body, score)
        elif input_type == "image":
            values, log_prob, extras, n = await self._images_anomaly(name, body, score)
        else:
            values, log_prob, extras, n = await self._texts_anomaly(name, body, score)
        response = anomaly_response(name, manifest.version, score, calibration, values, log_prob,
                                    body.threshold, body.false_positive_rate, extras)
        response.density = manifest.density
        flagged = sum(r.is_anomaly for r in response.results)
        request.state.metric_events = [
            ("genserve_records_scored_total", {"model": name, "endpoint": "anomaly"}, n),
            ("genserve_anomalies_flagged_total", {"model": name}, flagged),
        ]
        return response

    # ---- per kind --------------------------------------------------------------------------------

    def _check_anomaly_fields(self, name: str, manifest: art.Manifest, body: AnomalyRequest) -> None:
        wanted = INPUT_FIELD[manifest.input.type]
        for field in INPUT_FIELD.values():
            if field != wanted and getattr(body, field) is not None:
                raise ApiError(400, "wrong_model_kind", f"{field} given; {model_kind_phrase(name, manifest)}")
        if body.labels is not None and manifest.input.type != "image":
            raise ApiError(400, "wrong_model_kind", f"labels are for image models; "
                           f"{model_kind_phrase(name, manifest)}")

    async def _reference(self, name: str, inputs: Any) -> np.ndarray:
        try:
            ref = await self.handles[name].reference_log_prob.remote(inputs)
        except Exception as e:  # a replica failed or is gone
            raise ApiError(503, "model_unavailable", f"model {name!r} could not score this request: "
                           f"{type(e).__name__}; retry shortly") from e
        if ref is None:
            raise ApiError(400, "not_calibrated", f"model {name!r} has no reference model for likelihood_ratio "
                           "(its artifact predates it; retrain)")
        return np.asarray(ref, dtype=np.float64)

    async def _records_anomaly(self, name: str, body: AnomalyRequest, score: str):
        x = self._records(name, body)
        log_prob, resp = await self._score(name, x)
        ref = await self._reference(name, x) if needs_reference(score) else None
        values = compute_scores("records", log_prob, x.shape[1], reference_log_prob=ref)[score]
        return values, log_prob, gmm_extras(resp), len(x)

    async def _images_anomaly(self, name: str, body: AnomalyRequest, score: str):
        images, log_prob, _ = await self._image_log_prob(name, body, "anomaly")
        spec = self.manifests[name].input
        ref = await self._reference(name, images) if needs_reference(score) else None
        bits = png_bits(images, spec.levels) if score == "complexity" else None
        values = compute_scores("image", log_prob, spec.height * spec.width, reference_log_prob=ref,
                                complexity_bits=bits)[score]
        return values, log_prob, {}, len(images)

    async def _texts_anomaly(self, name: str, body: AnomalyRequest, score: str):
        items, token_lists = self._text_token_lists(name, body)
        try:
            per_token = await self.handles[name].score.remote(token_lists)
        except Exception as e:
            raise ApiError(503, "model_unavailable", f"model {name!r} could not score this request: "
                           f"{type(e).__name__}; retry shortly") from e
        log_prob = np.array([sum(lps) for lps in per_token], dtype=np.float64)
        ref = await self._reference(name, token_lists) if needs_reference(score) else None
        chars = np.array([len(it.text) for it in items])
        values = compute_scores("text", log_prob, chars, reference_log_prob=ref)[score]
        return values, log_prob, text_extras(items, body.per_line), len(items)

    def _text_token_lists(self, name: str, body: AnomalyRequest) -> tuple[list[TextItem], list[list[int]]]:
        limit = self.limits.max_texts_per_request
        if len(body.texts) > limit:
            raise ApiError(413, "limit_exceeded", f"{len(body.texts)} texts in one request; the limit is {limit} "
                           "(limits.max_texts_per_request)")
        items = text_items(body.texts, body.per_line)
        return items, text_token_lists(name, self.tokenizers[name], items, self._max_len(name))
