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
    "records": ("nll", "bits_per_dim", "likelihood_ratio"),
    "image": ("nll", "bits_per_dim", "complexity", "likelihood_ratio"),
    "text": ("nll", "bits_per_char", "likelihood_ratio"),
}
DEFAULT_SCORE: dict[str, str] = {"records": "nll", "image": "complexity", "text": "bits_per_char"}
UNITS: dict[str, str] = {
    "nll": "nats", "bits_per_dim": "bits per dimension", "bits_per_char": "bits per character",
    "complexity": "bits", "likelihood_ratio": "nats (text: bits per character)",
}
NEEDS_REFERENCE = "likelihood_ratio"


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
) -> dict[str, np.ndarray]:
    """Every score type of `input_type` computable from what is given (likelihood_ratio needs the reference
    model's log p, complexity the PNG lengths). `dims` is features or pixels per item, or characters per text."""
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
    return scores


def check_score(input_type: str, score: str | None) -> str:
    """The score type to use: the default when None; ValueError naming the choices when unknown."""
    if score is None:
        return DEFAULT_SCORE[input_type]
    if score not in SCORE_TYPES[input_type]:
        kind = {"records": "models of records", "image": "image models", "text": "text models"}[input_type]
        raise ValueError(f"score {score!r} is not available for {kind}; available: "
                         f"{', '.join(SCORE_TYPES[input_type])} (default {DEFAULT_SCORE[input_type]})")
    return score


def text_lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, line) of every line of `text` with something besides whitespace: the items that
    per-line text scores score, each on its own."""
    return [(i, line) for i, line in enumerate(text.split("\n"), start=1) if line.strip()]


def paragraphs(text: str) -> list[str]:
    """Blocks of text between blank lines, stripped: the whole-text items text models are calibrated on."""
    blocks = (block.strip("\n") for block in text.replace("\r\n", "\n").split("\n\n"))
    return [block for block in blocks if block.strip()]
