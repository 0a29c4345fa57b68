"""Fitting the reference models of likelihood-ratio scores (models/reference.py) and storing them in artifacts.

    reference.safetensors  the reference model's tensors
    reference.json         {"kind": "gmm" | "local_pixels" | "ngram", "config": {...}}

Both files are optional: an artifact without them serves every score type except likelihood_ratio.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import nn

from genserve.artifacts import artifact
from genserve.models.gmm import GaussianMixture, GMMConfig, m_step
from genserve.models.ngram import NGramConfig, NGramLM
from genserve.models.reference import LocalPixelConfig, LocalPixelModel, build_reference

REFERENCE_WEIGHTS = "reference.safetensors"
REFERENCE_CONFIG = "reference.json"


def fit_gaussian(x: np.ndarray, reg_covar: float = 1e-2) -> GaussianMixture:
    """One Gaussian with independent features (diagonal covariance) of raw records `x` (N, D), by maximum
    likelihood on the standardised records (one M-step with every responsibility 1, the GMMs' covariance floor),
    standardisation included. Diagonal, so it is simpler than any mixture served, a one-component full one
    included: the ratio then measures how far a record breaks the dependencies between its features."""
    mean = x.mean(0)
    scale = np.where(x.std(0) > 1e-12, x.std(0), 1.0)
    z = torch.from_numpy((x - mean) / scale)
    model = GaussianMixture(GMMConfig(x.shape[1], 1, "diag"), dtype=torch.float64)
    model.set_parameters(*m_step(z, torch.ones(z.shape[0], 1, dtype=z.dtype), "diag", reg_covar))
    model.set_standardisation(torch.from_numpy(mean), torch.from_numpy(scale))
    return model


def fit_local_pixels(images: np.ndarray, levels: int) -> LocalPixelModel:
    """The image reference, fitted by counting on (N, H, W) training images of levels."""
    _, height, width = images.shape
    model = LocalPixelModel(LocalPixelConfig.for_images(height, width, levels))
    return model.fit(torch.as_tensor(np.asarray(images), dtype=torch.int64))


def fit_bigram(tokens: torch.Tensor, vocab_size: int) -> NGramLM:
    """The text reference: an order-2 Kneser-Ney model of the training token stream."""
    return NGramLM.fit(tokens.cpu(), NGramConfig(vocab_size=vocab_size, order=2))


def reference_files(module: nn.Module) -> dict[str, bytes]:
    """The artifact files of a fitted reference model."""
    kind = {GaussianMixture: "gmm", LocalPixelModel: "local_pixels", NGramLM: "ngram"}[type(module)]
    spec = {"kind": kind, "config": module.config.to_dict()}
    return {REFERENCE_WEIGHTS: artifact.module_weights(module), REFERENCE_CONFIG: json.dumps(spec).encode()}


def load_reference(loaded: artifact.Artifact) -> nn.Module | None:
    """The artifact's reference model in eval mode, or None when it has none."""
    if REFERENCE_CONFIG not in loaded.contents:
        return None
    spec: dict[str, Any] = loaded.json(REFERENCE_CONFIG)
    try:
        module = build_reference(spec["kind"], spec["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise artifact.ArtifactError(f"{loaded.path / REFERENCE_CONFIG}: not a valid reference model ({e})") from None
    if REFERENCE_WEIGHTS not in loaded.contents:
        raise artifact.ArtifactError(f"{loaded.path}: {REFERENCE_CONFIG} without {REFERENCE_WEIGHTS}")
    artifact.load_module_weights(module, loaded.contents[REFERENCE_WEIGHTS], loaded.path / REFERENCE_WEIGHTS)
    return module.eval()
