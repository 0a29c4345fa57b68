"""The k-nearest-neighbour index of the `knn` anomaly score, fitted on the training split and stored in artifacts.

    neighbours.safetensors  "features": (N, D) training items in the index's feature space (float32, or uint8 for
                            image pixels, whatever stores them exactly), and for records "mean" and "scale"
    neighbours.json         {"space": "standardised" | "pixels", "k": 5, "metric": "euclidean", "n_train": M,
                             "levels": L (images)}

The score of x is its Euclidean distance to the k-th nearest stored item (PyOD's KNN "largest"), in the space the
model itself reads its inputs in: records standardised by the model's own training mean and scale, images as
pixel intensities in [0, 1]. Likelihood models rank by how cheap x is to encode, which misses a new class whose
items are made of ordinary parts (Nalisnick et al. 2019); the distance to what was seen in training does not.

Chosen by size. While N * D (stored items times dimensions) is at most EXACT_COST, the search is exact (brute
force, chunked torch.cdist): O(N * D) per query item, a few milliseconds. Beyond, it is an inverted-file index
(IVF, as FAISS's IndexIVFFlat): the stored items are clustered by k-means into about 4 sqrt(N) lists, a query
is compared with every list's centroid and then with the items of its PROBE nearest lists only,
O((4 sqrt(N) + PROBE sqrt(N) / 4) * D) per query. A neighbour in a list
not probed is missed, so the k-th distance found is at least the exact one; the score is calibrated with the same
search it is served with, so its thresholds hold. Such an index adds to neighbours.safetensors "centroids" (L, D)
float32 and "offsets" (L + 1) int64, the stored items sorted by list (list l is features[offsets[l]:offsets[l+1]]),
and to neighbours.json {"index": "ivf", "lists": L, "probe": P} ("index": "exact" otherwise; artifacts from before
have no key and are exact). At most MAX_ITEMS items and MAX_BYTES of features are stored, all of them when the
training split is smaller, else a seeded uniform sample (then the distance is to the k-th nearest of the sample).
bench/knn_index.py measures both searches on real data (docs/knn-index.md). Both files are optional: an artifact
without them serves every score type except knn.
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
EXACT_ITEMS = 20_000  # the most items an exact search of MNIST-size images (784 pixels) keeps within EXACT_COST
EXACT_COST = EXACT_ITEMS * 784  # N * D up to which the search is exact: ~40 ms per 64 images, 533,000 30-d records
MAX_ITEMS = 500_000  # stored training items at most, and
MAX_BYTES = 64 << 20  # stored features at most (uint8 pixels, float32 records): 85,000 MNIST-size images
PROBE = 32  # lists an IVF query searches
KMEANS_ITERATIONS = 10
KMEANS_SAMPLE_PER_LIST = 64  # k-means runs on a sample of this many items per list (as FAISS's default of 39-256)
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
    centroids: np.ndarray | None = None  # IVF: (L, D) float32 list centroids in the feature space; None: exact
    offsets: np.ndarray | None = None  # IVF: (L + 1,) int64; list l is features[offsets[l]:offsets[l + 1]]
    probe: int = PROBE  # IVF: lists searched per query

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
        search = self._exact if self.centroids is None else self._inverted_file
        with torch.inference_mode():
            out = [search(queries[start:start + QUERY_CHUNK], stored, k)
                   for start in range(0, len(queries), QUERY_CHUNK)]
        distance = torch.cat(out).double().numpy() if out else np.zeros(0)
        # Finite, as every served score: an overflowing distance (NaN or inf) is the largest there is.
        return np.nan_to_num(distance, nan=MAX_DISTANCE, posinf=MAX_DISTANCE)

    @staticmethod
    def _exact(queries: torch.Tensor, stored: torch.Tensor, k: int) -> torch.Tensor:
        return torch.cdist(queries, stored).topk(k, dim=1, largest=False).values[:, -1]

    def _inverted_file(self, queries: torch.Tensor, stored: torch.Tensor, k: int) -> torch.Tensor:
        """The k-th distance among the items of each query's `probe` nearest lists; exact for a query whose
        probed lists hold fewer than k items."""
        centroids = torch.from_numpy(self.centroids).to(queries.dtype)
        probed = torch.cdist(queries, centroids).topk(min(self.probe, len(centroids)), dim=1, largest=False).indices
        best = torch.full((len(queries), k), torch.inf, dtype=queries.dtype)
        offsets = self.offsets.tolist()
        for lst in torch.unique(probed).tolist():
            start, end = offsets[lst], offsets[lst + 1]
            if start == end:
                continue
            rows = (probed == lst).any(dim=1).nonzero().squeeze(1)
            d = torch.cdist(queries[rows], stored[start:end])
            best[rows] = torch.cat([best[rows], d], dim=1).topk(k, dim=1, largest=False).values
        short = torch.isinf(best[:, -1]).nonzero().squeeze(1)
        if len(short):  # too few items found (never with lists of typical size): search those exactly
            best[short, -1] = self._exact(queries[short], stored, k)
        return best[:, -1]

    @property
    def index_kind(self) -> str:
        return "exact" if self.centroids is None else "ivf"

    def _stored(self) -> torch.Tensor:
        if not hasattr(self, "_cache"):
            self._cache = self.embed_stored()
        return self._cache

    def embed_stored(self) -> torch.Tensor:
        if self.space == "standardised":
            return torch.from_numpy(np.asarray(self.features, dtype=np.float64))
        return torch.from_numpy(self.features.astype(np.float32) / float(self.levels - 1))


def fit_neighbours(train: np.ndarray, space: str, mean: np.ndarray | None = None, scale: np.ndarray | None = None,
                   levels: int | None = None, k: int = K, max_items: int = MAX_ITEMS, seed: int = 0,
                   exact_cost: int = EXACT_COST, probe: int = PROBE) -> NeighbourIndex:
    """The index of the training split: raw records (N, D) with the model's standardisation, or images (N, H, W)
    of `levels`; at most `max_items` of them and MAX_BYTES of features, a seeded uniform sample when there are
    more; an exact search while stored items times dimensions is at most `exact_cost`, an inverted-file index
    beyond."""
    if space not in ("standardised", "pixels"):
        raise ValueError(f"unknown feature space {space!r}")
    train = np.asarray(train)
    n_train = len(train)
    dtype = np.float32 if space == "standardised" else np.uint8 if levels <= 256 else np.int32
    item_bytes = max(1, int(np.prod(train.shape[1:])) * np.dtype(dtype).itemsize)
    cap = max(1, min(max_items, MAX_BYTES // item_bytes))
    if n_train > cap:
        train = train[np.sort(np.random.default_rng(seed).choice(n_train, cap, replace=False))]
    if space == "standardised":
        index = NeighbourIndex(((train - mean) / scale).astype(dtype), space, k, n_train,
                               np.asarray(mean, np.float64), np.asarray(scale, np.float64))
    else:
        index = NeighbourIndex(train.reshape(len(train), -1).astype(dtype), space, k, n_train, levels=levels)
    if index.features.size > exact_cost:
        index = inverted_file(index, probe, seed)
    return index


def inverted_file(index: NeighbourIndex, probe: int = PROBE, seed: int = 0) -> NeighbourIndex:
    """`index` with its items clustered into about 4 sqrt(N) lists by k-means (float32, KMEANS_ITERATIONS rounds
    on a seeded sample, initialised from sampled items) and sorted by list."""
    x = index.embed_stored().float()
    n_lists = max(1, min(len(x), round(4 * np.sqrt(len(x)))))
    generator = torch.Generator().manual_seed(seed)
    sample = x[torch.randperm(len(x), generator=generator)[: n_lists * KMEANS_SAMPLE_PER_LIST]]
    centroids = sample[torch.randperm(len(sample), generator=generator)[:n_lists]].clone()
    with torch.inference_mode():
        for _ in range(KMEANS_ITERATIONS):
            assigned = _nearest(sample, centroids)
            counts = torch.bincount(assigned, minlength=n_lists)
            sums = torch.zeros_like(centroids).index_add_(0, assigned, sample)
            filled = counts > 0  # an empty list keeps its centroid (and stays empty)
            centroids[filled] = sums[filled] / counts[filled, None].to(sums.dtype)
        assigned = _nearest(x, centroids).numpy()
    order = np.argsort(assigned, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(assigned, minlength=n_lists))]).astype(np.int64)
    return NeighbourIndex(np.ascontiguousarray(index.features[order]), index.space, index.k, index.n_train,
                          index.mean, index.scale, index.levels, centroids.numpy(), offsets, probe)


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.cdist(x[i:i + 4096], centroids).argmin(dim=1) for i in range(0, len(x), 4096)])


def neighbour_files(index: NeighbourIndex) -> dict[str, bytes]:
    tensors = {"features": np.ascontiguousarray(index.features)}
    if index.space == "standardised":
        tensors |= {"mean": index.mean, "scale": index.scale}
    spec: dict[str, Any] = {"space": index.space, "k": index.k, "metric": "euclidean", "n_train": index.n_train,
                            "stored": len(index.features), "index": index.index_kind}
    if index.centroids is not None:
        tensors |= {"centroids": index.centroids, "offsets": index.offsets}
        spec |= {"lists": len(index.centroids), "probe": index.probe}
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
        kind = spec.get("index", "exact")
        ivf: dict[str, Any] = {}
        if kind == "ivf":
            centroids, offsets, probe = tensors["centroids"], tensors["offsets"], int(spec["probe"])
            if (centroids.ndim != 2 or centroids.shape[1] != features.shape[1] or offsets.shape != (len(centroids) + 1,)
                    or offsets[0] != 0 or offsets[-1] != len(features) or np.any(np.diff(offsets) < 0) or probe < 1):
                raise ValueError("an ivf index needs centroids (L, D), offsets (L + 1) from 0 to N, non-decreasing, "
                                 "and probe >= 1")
            ivf = {"centroids": centroids.astype(np.float32), "offsets": offsets.astype(np.int64), "probe": probe}
        elif kind != "exact":
            raise ValueError(f"index must be exact or ivf, got {kind!r}")
        if space == "standardised":
            return NeighbourIndex(features, space, k, int(spec["n_train"]), tensors["mean"], tensors["scale"], **ivf)
        return NeighbourIndex(features, space, k, int(spec["n_train"]), levels=int(spec["levels"]), **ivf)
    except (KeyError, TypeError, ValueError) as e:
        raise artifact.ArtifactError(f"{where}: not a valid neighbour index ({e})") from None
