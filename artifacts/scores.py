"""Anomaly score types: one definition, used by training (calibration), the service and the benchmark.

Every score is "higher = more anomalous" and is computed per item from the model's exact log p(x):

    nll               -log p(x), nats
    bits_per_dim      -log2 p(x) / dims: features (records) or pixels (images)
    bits_per_char     text: -log2 p(text) / characters, the mean surprisal per character
    complexity        images: -log2 p(x) - L(x), where L(x) is the length in bits of x as a PNG file. Likelihood
                      models give simple images (blank, constant, smooth) high likelihood whatever data they were
                      trained on, because simple images are cheap to encode for any model; subtracting a generic
                      compressor's code length leaves what the model knows beyond "simple" (Serra et al. 2020,
                      "Input complexity and out-of-distribution detection with likelihood-based generative models").
    likelihood_ratio  log p_ref(x) - log p(x), p_ref a simpler model of the same training data stored in the
                      artifact (models/reference.py), in nats; text: in bits per character. It cancels what both
                      models find easy or hard (background statistics) and keeps what only the full model learned
                      (Ren et al. 2019; Schirrmeister et al. 2020).
    knn               the Euclidean distance to the k-th nearest training item in the space the model reads its
                      inputs in (records standardised by the model, images as intensities in [0, 1]) or, for
                      text, in the model's own representation (GPT, LSTM: the final hidden states averaged over
                      the text's tokens, standardised; training lines stored), from the index stored in the
                      artifact (artifacts/neighbours.py). Catches a new class made of ordinary parts, which
                      likelihoods miss (Nalisnick et al. 2019).
    mahalanobis       images: the smallest over training classes of the class's Gaussian negative log-density
                      (constant dropped) in the training images' first 50 principal components
                      (artifacts/class_gaussians.py; Lee et al. 2018): how far x is from every class's ellipsoid.
    class_evidence    class-conditional image models: -max_y log p(x | y) over the model's classes, in nats: how
                      well the best-fitting class explains x.
    class_entropy     class-conditional image models: the entropy of p(y | x) = p(y) p(x | y) / p(x), in nats: an
                      item that no class claims (a new class resembling several) scores high, one that a class
                      claims scores near 0. Both take one pass of the model per class.
    typicality        records, images: |nll - H|, H the mean nll of the validation split (the model's estimate of
                      its entropy): how far x lies from the typical set, on either side (Nalisnick et al. 2019's
                      test, per item). An item more likely than any typical one is anomalous too. Text: the
                      per-token variant, |bits_per_char - the held-out mean bits_per_char| (per whole text and per
                      line, each with its own centre), since texts differ in length; for fixed-size records and
                      images the per-dimension variant ranks items exactly as typicality does.
    ensemble          its first member's calibrated tail score (artifacts/calibration.py
                      `Calibration.tail`: -ln of the held-out exceedance probability, extrapolated beyond the
                      held-out range) plus every other member's tail beyond its held-out 99th percentile
                      (`CalibrationSet.ensemble`); members chosen per artifact on validation data only, never
                      on anomalies: knn first, then those that do not rank held-out items like one kept.

For fixed-size inputs nll and bits_per_dim rank items identically; for text, length matters and bits_per_char
is the default.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

LN2 = math.log(2.0)

SCORE_TYPES: dict[str, tuple[str, ...]] = {
    "records": ("nll", "bits_per_dim", "likelihood_ratio", "knn", "typicality", "ensemble"),
    "image": ("nll", "bits_per_dim", "complexity", "likelihood_ratio", "knn", "mahalanobis", "class_evidence",
              "class_entropy", "typicality", "ensemble"),
    "text": ("nll", "bits_per_char", "likelihood_ratio", "knn", "typicality", "ensemble"),
}
CLASS_SCORES = ("class_evidence", "class_entropy")  # need a class-conditional model
# The default of an artifact that does not name its own (artifacts calibrated before the ensemble existed);
# newer artifacts name theirs in calibration.json (CalibrationSet.default) and say why in the manifest.
DEFAULT_SCORE: dict[str, str] = {"records": "nll", "image": "complexity", "text": "bits_per_char"}
UNITS: dict[str, str] = {
    "nll": "nats", "bits_per_dim": "bits per dimension", "bits_per_char": "bits per character",
    "complexity": "bits", "likelihood_ratio": "nats (text: bits per character)",
    "knn": "distance in the model's feature space", "mahalanobis": "nats",
    "class_evidence": "nats", "class_entropy": "nats",
    "typicality": "nats (text: bits per character)", "ensemble": "mean tail score (nats)",
}
NEEDS_REFERENCE = "likelihood_ratio"
# Candidate ensemble members in order of preference: a later one that ranks the validation items like an
# earlier one (Spearman correlation above ENSEMBLE_MAX_CORRELATION) adds nothing and is left out.
ENSEMBLE_CANDIDATES: dict[str, tuple[str, ...]] = {
    "records": ("knn", "nll", "likelihood_ratio", "typicality"),
    "image": ("knn", "mahalanobis", "class_entropy", "complexity", "likelihood_ratio", "nll", "class_evidence",
              "typicality"),
    "text": ("bits_per_char", "knn", "likelihood_ratio", "typicality"),
}
# Members that rank together (their tails averaged) where an ensemble has them: the distances to what training
# saw. Every other member only adds its tail beyond its held-out 99th percentile (CalibrationSet.ensemble).
ENSEMBLE_PRIMARY = ("knn", "mahalanobis")
# Text ranks by bits per character instead, knn only adding its far tail: a character model's averaged hidden
# state tells a line's style less well than its surprisal does (docs/anomaly.md: on Shakespeare against other
# English prose, the GPT's knn 0.53-0.72 AUROC where its bits_per_char reaches 0.88-0.95).
# Records rank by knn and nll together: a Gaussian mixture's nll is itself a distance to what training saw, the
# Mahalanobis distance to each component softly weighted (the per-component Mahalanobis the images' score has per
# class); on breast_cancer the pair ranked at 0.954 AUROC where knn alone gave 0.950 (docs/anomaly.md). Artifacts
# store their primary members, so older ones keep theirs.
# Images rank by both distances unless training measured which one finds an unseen class (artifacts/unseen_class.py).
ENSEMBLE_PRIMARY_BY_KIND = {"records": ("knn", "nll"), "image": ENSEMBLE_PRIMARY, "text": ("bits_per_char",)}
ENSEMBLE_MAX_CORRELATION = 0.9


def png_bits(images: np.ndarray, levels: int) -> np.ndarray:
    """L(x): the size in bits of each (H, W) image of integer levels as a PNG at maximum compression, one
    bit per pixel for binary images and 8-bit grey otherwise. The PNG headers add the same constant to every
    image of one size, which shifts the complexity score but not its ranking or calibration."""
    images = np.asarray(images)
    out = np.empty(len(images), dtype=np.float64)
    for i, image in enumerate(images):
        if levels == 2:
            pil = Image.fromarray(image.astype(bool))
        else:
            pil = Image.fromarray(np.rint(image * (255.0 / (levels - 1))).astype(np.uint8), mode="L")
        buffer = io.BytesIO()
        pil.save(buffer, format="PNG", compress_level=9)
        out[i] = 8.0 * buffer.tell()
    return out


def compute_scores(
    input_type: str,
    log_prob: np.ndarray,
    dims: np.ndarray | int,
    reference_log_prob: np.ndarray | None = None,
    complexity_bits: np.ndarray | None = None,
    knn_distance: np.ndarray | None = None,
    typical_nll: float | None = None,
    mahalanobis: np.ndarray | None = None,
    class_scores: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Every score type of `input_type` computable from what is given (likelihood_ratio needs the reference
    model's log p, complexity the PNG lengths, knn the neighbour index's distances, typicality the validation
    split's mean nll (text: mean bits_per_char), class_scores `class_evidence_scores`' output). `dims` is
    features or pixels per item, or characters per text. The ensemble is not here: it needs the calibrations
    (CalibrationSet.ensemble)."""
    log_prob = np.asarray(log_prob, dtype=np.float64)
    dims = np.asarray(dims, dtype=np.float64)
    nll = -log_prob
    scores = {"nll": nll}
    per_dim = nll / (np.maximum(dims, 1.0) * LN2)
    scores["bits_per_char" if input_type == "text" else "bits_per_dim"] = per_dim
    if input_type == "image" and complexity_bits is not None:
        scores["complexity"] = nll / LN2 - np.asarray(complexity_bits, dtype=np.float64)
    if reference_log_prob is not None:
        ratio = np.asarray(reference_log_prob, dtype=np.float64) - log_prob
        scores["likelihood_ratio"] = ratio / (np.maximum(dims, 1.0) * LN2) if input_type == "text" else ratio
    if knn_distance is not None:
        scores["knn"] = np.asarray(knn_distance, dtype=np.float64)
    if mahalanobis is not None:
        scores["mahalanobis"] = np.asarray(mahalanobis, dtype=np.float64)
    if class_scores is not None:
        scores.update({k: np.asarray(v, dtype=np.float64) for k, v in class_scores.items()})
    if typical_nll is not None:
        scores["typicality"] = np.abs((per_dim if input_type == "text" else nll) - typical_nll)
    return scores


def class_evidence_scores(class_log_prob: np.ndarray, class_log_prior: np.ndarray) -> dict[str, np.ndarray]:
    """class_evidence and class_entropy of items from log p(x | y) (N, C) and the class prior log p(y) (C,).
    Classes the prior rules out (log p(y) = -inf: none of them in training) take no part."""
    cond = np.asarray(class_log_prob, dtype=np.float64)
    prior = np.asarray(class_log_prior, dtype=np.float64)
    seen = np.isfinite(prior)
    cond, prior = cond[:, seen], prior[seen]
    joint = cond + prior
    top = joint.max(axis=1, keepdims=True)
    posterior = np.exp(joint - top)
    posterior /= posterior.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(posterior > 0, posterior * np.log(posterior), 0.0).sum(axis=1)
    return {"class_evidence": -cond.max(axis=1), "class_entropy": np.maximum(entropy, 0.0)}


def needed_scores(score: str, members: tuple[str, ...] | list[str] = ()) -> set[str]:
    """The score types whose raw values `score` is computed from: itself, or an ensemble's members."""
    return set(members) if score == "ensemble" else {score}


def check_score(input_type: str, score: str | None, default: str | None = None) -> str:
    """The score type to use: the default when None (the artifact's own `default`, else the kind's); ValueError
    naming the choices when unknown."""
    default = default or DEFAULT_SCORE[input_type]
    if score is None:
        return default
    if score not in SCORE_TYPES[input_type]:
        kind = {"records": "models of records", "image": "image models", "text": "text models"}[input_type]
        raise ValueError(f"score {score!r} is not available for {kind}; available: "
                         f"{', '.join(SCORE_TYPES[input_type])} (default {default})")
    return score


def text_lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, line) of every line of `text` with something besides whitespace: the items that
    per-line text scores score, each on its own."""
    return [(i, line) for i, line in enumerate(text.split("\n"), start=1) if line.strip()]


def paragraphs(text: str) -> list[str]:
    """Blocks of text between blank lines, stripped: the whole-text items text models are calibrated on."""
    blocks = (block.strip("\n") for block in text.replace("\r\n", "\n").split("\n\n"))
    return [block for block in blocks if block.strip()]
