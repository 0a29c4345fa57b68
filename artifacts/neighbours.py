"""The k-nearest-neighbour index of the `knn` anomaly score, fitted on the training split and stored in artifacts.

    neighbours.safetensors  "features": (N, D) training items in the index's feature space (float32, or uint8 for
                            image pixels, whatever stores them exactly), and for records "mean" and "scale"
    neighbours.json         {"space": "standardised" | "pixels", "k": 5, "metric": "euclidean", "n_train": M,
                             "levels": L (images)}

The score of x is its Euclidean distance to the k-th nearest stored item (PyOD's KNN "largest"), in the space the
model itself reads its inputs in: records standardised by the model's own training mean and scale, images as
pixel intensities in [0, 1]. Likelihood models rank by how cheap x is to encode, which misses a new class whose
items are made of ordinary parts (Nalisnick et al. 2019); the distance to what was seen in training does not.

The search is exact (brute force, chunked torch.cdist): O(N * D) per query item. Up to MAX_ITEMS training items
are stored, all of them when the training split is smaller, else a seeded uniform sample of MAX_ITEMS (then the
distance is to the k-th nearest of the sample: approximate, and calibrated as it is served). Both files are
optional: an artifact without them serves every score type except knn.
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

NEIGHBOURS_WEIGHTS = "neighbours.safetensors"
NEIGHBOURS_CONFIG = "neighbours.json"
K = 5
MAX_ITEMS = 20_000  # stored training items: 20,000 x 784 pixels is 15 MB as uint8, ~40 ms per 64 query images
MAX_DISTANCE = 1e300  # what a distance that overflows float64 reports
QUERY_CHUNK = 256  # query items per cdist call: bounds the (chunk, N) distance matrix at 256 x 20,000 floats


@dataclass
class NeighbourIndex:
    features: np.ndarray  # (N, D): float32 standardised records, or uint8 pixel levels
    space: str  # "standardised" | "pixels"
    k: int = K
    n_train: int = 0  # training items the stored ones were drawn from
    mean: np.ndarray | None = None  # records: the standardisation
    scale: np.ndarray | None = None
    levels: int | None = None  # images: pixel levels (intensity = level / (levels - 1))

    def embed(self, inputs: np.ndarray) -> torch.Tensor:
        """Inputs (records (N, D) or images (N, H, W) of levels) in the index's feature space, float32 (N, D')."""
        x = np.asarray(inputs)
        if self.space == "standardised":
            # float64: a record far outside the data (1e300) must give a large distance, not inf or NaN
            return torch.from_numpy((x - self.mean) / self.scale)
        return torch.from_numpy(x.reshape(len(x), -1).astype(np.float32) / float(self.levels - 1))

    def distance(self, inputs: np.ndarray) -> np.ndarray:
        """Each item's distance to its k-th nearest stored training item (float64, one per item)."""
        queries = self.embed(inputs)
        stored = self._stored()
        k = min(self.k, len(stored))
        out = []
        with torch.inference_mode():
            for start in range(0, len(queries), QUERY_CHUNK):
                d = torch.cdist(queries[start:start + QUERY_CHUNK], stored)
                out.append(d.topk(k, dim=1, largest=False).values[:, -1])
        distance = torch.cat(out).double().numpy() if out else np.zeros(0)
        # Finite, as every served score: an overflowing distance (NaN or inf) is the largest there is.
        return np.nan_to_num(distance, nan=MAX_DISTANCE, posinf=MAX_DISTANCE)

    def _stored(self) -> torch.Tensor:
        if not hasattr(self, "_cache"):
            self._cache = self.embed_stored()
        return self._cache

    def embed_stored(self) -> torch.Tensor:
        if self.space == "standardised":
            return torch.from_numpy(np.asarray(self.features, dtype=np.float64))
        return torch.from_numpy(self.features.astype(np.float32) / float(self.levels - 1))


def fit_neighbours(train: np.ndarray, space: str, mean: np.ndarray | None = None, scale: np.ndarray | None = None,
                   levels: int | None = None, k: int = K, max_items: int = MAX_ITEMS, seed: int = 0
                   ) -> NeighbourIndex:
    """The index of the training split: raw records (N, D) with the model's standardisation, or images (N, H, W)
    of `levels`; at most `max_items` of them, a seeded uniform sample when there are more."""
    train = np.asarray(train)
    n_train = len(train)
    if n_train > max_items:
        train = train[np.sort(np.random.default_rng(seed).choice(n_train, max_items, replace=False))]
    if space == "standardised":
        features = ((train - mean) / scale).astype(np.float32)
        return NeighbourIndex(features, space, k, n_train, np.asarray(mean, np.float64), np.asarray(scale, np.float64))
    if space == "pixels":
        dtype = np.uint8 if levels <= 256 else np.int32
        return NeighbourIndex(train.reshape(len(train), -1).astype(dtype), space, k, n_train, levels=levels)
    raise ValueError(f"unknown feature space {space!r}")


def neighbour_files(index: NeighbourIndex) -> dict[str, bytes]:
    tensors = {"features": np.ascontiguousarray(index.features)}
    if index.space == "standardised":
        tensors |= {"mean": index.mean, "scale": index.scale}
    spec: dict[str, Any] = {"space": index.space, "k": index.k, "metric": "euclidean", "n_train": index.n_train,
                            "stored": len(index.features)}
    if index.levels is not None:
        spec["levels"] = index.levels
    return {NEIGHBOURS_WEIGHTS: save_safetensors_numpy(tensors), NEIGHBOURS_CONFIG: json.dumps(spec).encode()}


def load_neighbours(loaded: artifact.Artifact) -> NeighbourIndex | None:
    """The artifact's index, or None when it has none (artifacts trained before the knn score)."""
    if NEIGHBOURS_CONFIG not in loaded.contents:
        return None
    where = loaded.path / NEIGHBOURS_CONFIG
    if NEIGHBOURS_WEIGHTS not in loaded.contents:
        raise artifact.ArtifactError(f"{loaded.path}: {NEIGHBOURS_CONFIG} without {NEIGHBOURS_WEIGHTS}")
    try:
        spec = loaded.json(NEIGHBOURS_CONFIG)
        tensors = load_safetensors_numpy(loaded.contents[NEIGHBOURS_WEIGHTS])
        space, k = spec["space"], int(spec["k"])
        features = tensors["features"]
        if space not in ("standardised", "pixels") or k < 1 or features.ndim != 2 or len(features) == 0:
            raise ValueError("space must be standardised or pixels, k >= 1, features a non-empty (N, D) array")
        if space == "standardised":
            return NeighbourIndex(features, space, k, int(spec["n_train"]), tensors["mean"], tensors["scale"])
        return NeighbourIndex(features, space, k, int(spec["n_train"]), levels=int(spec["levels"]))
    except (KeyError, TypeError, ValueError) as e:
        raise artifact.ArtifactError(f"{where}: not a valid neighbour index ({e})") from None
