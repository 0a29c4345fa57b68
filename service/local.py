"""Scoring in-process, without a server: the same scores, calibration and checks as the REST API's anomaly
endpoint, for `genserve score --local`, notebooks and the anomaly benchmark.

    scorer = LocalScorer.from_store("model-store", "breast-cancer")
    scorer.anomaly(records=x).results[0].is_anomaly      # calibrated, like POST /v1/models/NAME/anomaly
    scorer.scores(records=x)["likelihood_ratio"]          # every raw score type, one value per item

Request limits (items per request) do not apply here; everything else is checked as the server checks it and
reported as the same domain errors (service/errors.py), with the same type and message.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genserve.artifacts.calibration import CalibrationSet, read_calibration
from genserve.artifacts.scores import CLASS_SCORES, compute_scores, needed_scores, png_bits
from genserve.artifacts.store import load_artifact_at
from genserve.models.lm import score_token_lists
from genserve.service.catalog import require_density
from genserve.service.errors import InvalidInput, WrongKind
from genserve.service.families import serving_family
from genserve.service.image_codec import ImageInputError, decode_image
from genserve.service.image_runtime import LoadedImageModel, image_class_scores
from genserve.service.isolation import finite_log_probs, finite_responsibilities, reference_log_probs
from genserve.service.services.anomaly import (
    AnomalyResponse,
    anomaly_response,
    batch_test_result,
    chosen_score,
    gmm_extras,
    no_index,
    not_conditional,
    resolve_score,
    text_extras,
    text_items,
    text_token_lists,
)
from genserve.service.text_runtime import text_knn_distances


class LocalScorer:
    """One model of any kind, loaded from its artifact for scoring on this process's device."""

    def __init__(self, path: str | Path, runtime: str = "auto", device: str | None = None):
        loaded = load_artifact_at(str(path))
        require_density(loaded.manifest.name, loaded.manifest, "anomaly scores")  # a GAN: nothing to score
        self.manifest = loaded.manifest
        self.name = loaded.manifest.name
        self.input_type = loaded.manifest.input.type
        self.calibrations: CalibrationSet | None = read_calibration(loaded)
        # What a replica of its family loads (a VAE: its bound at the calibration's K and seed), without Ray.
        self._model: Any = serving_family(self.manifest).load(path, runtime, device)
        self.reference = self._model.reference
        self.neighbours = getattr(self._model, "neighbours", None)  # the knn index (records and image models)
        self.gaussians = getattr(self._model, "gaussians", None)  # the mahalanobis score's (image models)
        self.tokenizer = getattr(self._model, "tokenizer", None)  # text models

    @classmethod
    def from_store(cls, store: str | Path | None, name: str, version: str = "latest", runtime: str = "auto",
                   device: str | None = None) -> LocalScorer:
        from genserve.artifacts.store import open_store

        return cls(open_store(store).location(name, version), runtime, device)

    # ---- public ----------------------------------------------------------------------------------

    def anomaly(self, *, records: Any = None, images: Any = None, texts: Sequence[str] | None = None,
                labels: Sequence[int] | None = None, score: str | None = None, per_line: bool = False,
                threshold: float | None = None, false_positive_rate: float | None = None,
                batch_test: bool = False) -> AnomalyResponse:
        """Calibrated anomaly results, as POST /v1/models/{name}/anomaly answers them."""
        score, calibration = resolve_score(self.name, self.input_type, score, self.calibrations, per_line)
        needed = needed_scores(score, self.calibrations.members)
        raw, extras = self._raw(records, images, texts, labels, per_line, needed)
        values = chosen_score(score, raw, self.calibrations, per_line)
        response = anomaly_response(self.name, self.manifest.version, score, calibration, values,
                                    raw["log_prob"], threshold, false_positive_rate, extras)
        response.density = self.manifest.density  # exact, or a bound (a VAE)
        if batch_test:
            response.batch = batch_test_result(self.name, self.input_type, raw, self.calibrations, per_line,
                                               false_positive_rate)
        return response

    def scores(self, *, records: Any = None, images: Any = None, texts: Sequence[str] | None = None,
               labels: Sequence[int] | None = None, per_line: bool = False) -> dict[str, np.ndarray]:
        """Every score type this model can give, and "log_prob", one value per item: raw scores, but for the
        ensemble, which is made of its members' calibrated tail scores."""
        raw, _ = self._raw(records, images, texts, labels, per_line, None)
        if self.calibrations is not None and self.calibrations.get("ensemble", per_line) is not None:
            raw["ensemble"] = self.calibrations.ensemble(raw, per_line)
        return raw

    def percentiles(self, score: str, values: np.ndarray, per_line: bool = False) -> np.ndarray:
        """Percentiles of raw `values` of a score type among the held-out calibration items."""
        _, calibration = resolve_score(self.name, self.input_type, score, self.calibrations, per_line)
        return calibration.percentile(values)

    # ---- per kind --------------------------------------------------------------------------------

    def _raw(self, records, images, texts, labels, per_line: bool, needed: set[str] | None
             ) -> tuple[dict[str, np.ndarray], dict[str, list]]:
        """The raw scores in `needed` (None: every one this model can give), and the per-item extras."""
        fields = {"records": records, "images": images, "texts": texts}
        need = {"records": "records", "image": "images", "text": "texts"}[self.input_type]
        wrong = [f for f, v in fields.items() if v is not None and f != need]
        if wrong or fields[need] is None:
            raise WrongKind(f"model {self.name!r} takes {need}" +
                           (f", not {wrong[0]}" if wrong else ""))
        if labels is not None and self.input_type != "image":
            raise WrongKind(f"labels are for image models; {self.name!r} takes "
                           f"{self.input_type}")
        if per_line and self.input_type != "text":
            raise WrongKind(f"per_line is for text models; {self.name!r} takes "
                           f"{self.input_type}")
        if self.input_type == "records":
            return self._records(records, needed)
        if self.input_type == "image":
            return self._images(images, labels, needed)
        return self._texts(texts, per_line, needed)

    def _wants(self, needed: set[str] | None, score: str) -> bool:
        return needed is None or score in needed

    def _distance(self, inputs: np.ndarray, needed: set[str] | None, score: str) -> np.ndarray | None:
        """The raw distances of the knn or mahalanobis score, when wanted and the artifact has their index."""
        index = self.neighbours if score == "knn" else self.gaussians
        if not self._wants(needed, score):
            return None
        if index is None:
            if needed is None:
                return None
            raise no_index(self.name, score)
        return index.distance(inputs)

    def _typical(self, per_line: bool = False) -> float | None:
        return None if self.calibrations is None else self.calibrations.typical(per_line)

    def _class_scores(self, images: np.ndarray, needed: set[str] | None) -> dict[str, np.ndarray] | None:
        """class_evidence and class_entropy when wanted; None for a model that is not class-conditional (an
        error when asked for)."""
        if needed is not None and not needed & set(CLASS_SCORES):
            return None
        scores = image_class_scores(self._model, images) if isinstance(self._model, LoadedImageModel) else None
        if scores is None and needed is not None:
            raise not_conditional(self.name)
        return scores

    def _records(self, records: Any, needed: set[str] | None):
        x = np.asarray(records, dtype=np.float64)
        d = self.manifest.input.n_features
        if x.ndim != 2 or x.shape[1] != d or len(x) == 0:
            raise InvalidInput(f"records must be (N, {d}) for model {self.name!r}; got shape {x.shape}",
                               type_="wrong_feature_count")
        if not np.isfinite(x).all():
            raise InvalidInput("records hold NaN or infinite values")
        # Finite as the served answers are (service.isolation.finite_log_probs): the file scorer writes them as is.
        log_prob, resp = self._model.runtime.log_prob(x)
        log_prob, resp = finite_log_probs(log_prob), finite_responsibilities(resp)
        ref = reference_log_probs(self.reference, x, np.float64) if self._wants(needed, "likelihood_ratio") else None
        raw = compute_scores("records", log_prob, d, reference_log_prob=ref,
                             knn_distance=self._distance(x, needed, "knn"),
                             typical_nll=self._typical())
        return {**raw, "log_prob": log_prob}, gmm_extras(resp)

    def _images(self, images: Any, labels: Sequence[int] | None, needed: set[str] | None):
        spec = self.manifest.input
        try:
            x = np.stack([decode_image(image.tolist() if isinstance(image, np.ndarray) else image,
                                       f"images[{i}]", spec.height, spec.width, spec.levels)
                          for i, image in enumerate(images)])
        except ImageInputError as e:
            raise InvalidInput(f"{e.message} (model {self.name!r})", type_=e.type) from None
        y = None
        if labels is not None:
            y = np.asarray(labels, dtype=np.int64)
            if not spec.n_classes or y.shape != (len(x),) or y.min() < 0 or y.max() >= spec.n_classes:
                raise InvalidInput(f"labels must be one per image in 0..{spec.n_classes - 1} (model {self.name!r} has "
                                   f"{spec.n_classes} classes)", type_="invalid_label")
        log_prob, _ = self._model.runtime.score(x, y)
        log_prob = finite_log_probs(log_prob)
        ref = reference_log_probs(self.reference, x, np.int64) if self._wants(needed, "likelihood_ratio") else None
        bits = png_bits(x, spec.levels) if self._wants(needed, "complexity") else None
        raw = compute_scores("image", log_prob, spec.height * spec.width, reference_log_prob=ref,
                             complexity_bits=bits, knn_distance=self._distance(x, needed, "knn"),
                             mahalanobis=self._distance(x, needed, "mahalanobis"),
                             class_scores=self._class_scores(x, needed), typical_nll=self._typical())
        return {**raw, "log_prob": log_prob}, {}

    def _texts(self, texts: Sequence[str], per_line: bool, needed: set[str] | None):
        items = text_items(texts, per_line)
        token_lists = text_token_lists(self.name, self.tokenizer, items, self._model.spec.context_length)
        with torch.inference_mode():
            log_prob = np.array([sum(t) for t in score_token_lists(self._model.scorer, token_lists)])
            ref = None
            if self._wants(needed, "likelihood_ratio") and self.reference is not None:
                ref = np.array([sum(t) for t in score_token_lists(self.reference, token_lists)])
        knn = None
        if self._wants(needed, "knn"):
            knn = text_knn_distances(self._model, token_lists)
            if knn is None and needed is not None:
                raise no_index(self.name, "knn")
        chars = np.array([len(it.text) for it in items])
        raw = compute_scores("text", log_prob, chars, reference_log_prob=ref, knn_distance=knn,
                             typical_nll=self._typical(per_line))
        return {**raw, "log_prob": log_prob}, text_extras(items, per_line)
