"""The `mahalanobis` anomaly score of image models: class-conditional Gaussians in the training images' principal
components, fitted on the training split and stored in artifacts.

    class_gaussians.safetensors  "mean" (D), "components" (P, D): the projection; "class_means" (C, P),
                                 "precision_chol" (C, P, P) upper-triangular Cholesky factors of each class's
                                 precision, "log_det" (C): log |precision| / 2 of each
    class_gaussians.json         {"dims": P, "classes": C, "levels": L, "shrinkage": [...], "n_train": N}

The score of x is min over classes c of -log N(z; mu_c, Sigma_c) without its constant, z the image's first P
principal components (intensities in [0, 1]): the Mahalanobis distance to the nearest class, each class with its
own covariance (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples"). An
unseen class is far from every class's ellipsoid even when its strokes are ordinary, and the covariance says
which directions vary within a class and which do not (raw pixel distances weigh them all alike). Classes are
the dataset's labels; a dataset without labels is one class. Each covariance is shrunk towards its diagonal by
the Ledoit-Wolf estimate, so a class with fewer images than dimensions still has a proper one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load as load_safetensors_numpy
from safetensors.numpy import save as save_safetensors_numpy

from genserve.artifacts import artifact

GAUSSIANS_WEIGHTS = "class_gaussians.safetensors"
GAUSSIANS_CONFIG = "class_gaussians.json"
DIMS = 50  # principal components kept (fewer when the images have fewer pixels or the split fewer items)


@dataclass
class ClassGaussians:
    mean: np.ndarray  # (D,) mean training image, intensities
    components: np.ndarray  # (P, D) principal axes
    class_means: np.ndarray  # (C, P)
    precision_chol: np.ndarray  # (C, P, P) upper-triangular U with U^T U = Sigma^-1
    log_det: np.ndarray  # (C,) sum of log diag(U) = log |Sigma^-1| / 2
    levels: int
    spec: dict[str, Any]

    def project(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, dtype=np.float64).reshape(len(images), -1) / (self.levels - 1)
        return (x - self.mean) @ self.components.T

    def distance(self, images: np.ndarray) -> np.ndarray:
        """Each image's smallest class-conditional Gaussian negative log-density (nats, constant dropped)."""
        return self.class_distances(images).min(axis=1)

    def class_distances(self, images: np.ndarray) -> np.ndarray:
        """(N, C): each image's Gaussian negative log-density under each class (nats, constant dropped)."""
        z = torch.from_numpy(self.project(images))  # (N, P)
        u = torch.from_numpy(self.precision_chol)  # (C, P, P)
        diff = z[:, None, :] - torch.from_numpy(self.class_means)[None]  # (N, C, P)
        with torch.inference_mode():
            white = torch.einsum("cpq,ncq->ncp", u, diff)
            nll = 0.5 * (white ** 2).sum(-1) - torch.from_numpy(self.log_det)[None]
        return nll.numpy()


def fit_class_gaussians(images: np.ndarray, labels: np.ndarray | None, levels: int, dims: int = DIMS
                        ) -> ClassGaussians:
    """The projection and one shrunk Gaussian per label (one for all when `labels` is None) of training images."""
    from sklearn.covariance import ledoit_wolf

    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1) / (levels - 1)
    mean = x.mean(0)
    dims = max(1, min(dims, x.shape[1], len(x) - 1))
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    components = vt[:dims]
    z = (x - mean) @ components.T
    labels = np.zeros(len(x), np.int64) if labels is None else np.asarray(labels)
    means, chols, log_dets, shrinkage = [], [], [], []
    for c in np.unique(labels):
        zc = z[labels == c]
        cov, alpha = ledoit_wolf(zc) if len(zc) > 1 else (np.eye(dims), 1.0)
        cov = cov + 1e-6 * np.trace(cov) / dims * np.eye(dims)  # strictly positive definite
        u = np.linalg.cholesky(np.linalg.inv(cov)).T  # upper: u.T @ u = precision
        means.append(zc.mean(0))
        chols.append(u)
        log_dets.append(np.log(np.diag(u)).sum())
        shrinkage.append(round(float(alpha), 4))
    spec = {"dims": dims, "classes": len(means), "levels": levels, "shrinkage": shrinkage, "n_train": len(x)}
    return ClassGaussians(mean, components, np.array(means), np.array(chols), np.array(log_dets), levels, spec)


def class_gaussian_files(model: ClassGaussians) -> dict[str, bytes]:
    tensors = {"mean": model.mean, "components": model.components, "class_means": model.class_means,
               "precision_chol": model.precision_chol, "log_det": model.log_det}
    return {GAUSSIANS_WEIGHTS: save_safetensors_numpy({k: np.ascontiguousarray(v) for k, v in tensors.items()}),
            GAUSSIANS_CONFIG: json.dumps(model.spec).encode()}


def load_class_gaussians(loaded: artifact.Artifact) -> ClassGaussians | None:
    """The artifact's class Gaussians, or None when it has none (artifacts trained before the mahalanobis score)."""
    if GAUSSIANS_CONFIG not in loaded.contents:
        return None
    if GAUSSIANS_WEIGHTS not in loaded.contents:
        raise artifact.ArtifactError(f"{loaded.path}: {GAUSSIANS_CONFIG} without {GAUSSIANS_WEIGHTS}")
    try:
        spec = loaded.json(GAUSSIANS_CONFIG)
        t = load_safetensors_numpy(loaded.contents[GAUSSIANS_WEIGHTS])
        p, c = int(spec["dims"]), int(spec["classes"])
        if (t["components"].shape[0] != p or t["class_means"].shape != (c, p)
                or t["precision_chol"].shape != (c, p, p) or t["log_det"].shape != (c,)):
            raise ValueError("tensor shapes do not match dims and classes")
        return ClassGaussians(t["mean"], t["components"], t["class_means"], t["precision_chol"], t["log_det"],
                              int(spec["levels"]), spec)
    except (KeyError, TypeError, ValueError) as e:
        raise artifact.ArtifactError(f"{loaded.path / GAUSSIANS_CONFIG}: not valid class Gaussians ({e})") from None
