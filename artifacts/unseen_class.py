"""Which distance finds an unseen class, measured on normal data alone: each training class left out in turn.

Image models have two distance scores, knn (raw pixels) and mahalanobis (each class's Gaussian in principal
components), and which of them finds a new class depends on the data: on scikit-learn's 8x8 digits both do
(0.987 and 0.990 AUROC with a digit held out), on binarised 28x28 MNIST pixel distances fall far behind (0.744
against 0.891; docs/anomaly.md). The ensemble should rank by the one that works, and it must choose without
seeing an anomaly.

The training labels allow a rehearsal. Leave class c out of the *fitted distances* (its training images out of
the knn index, its Gaussian out of the minimum over classes), score the validation split, and ask how well each
distance separates the validation images of class c (the stand-in novelty) from those of the other classes:
an AUROC per class, averaged over the classes. Neither the generative model nor the principal components are
refitted (the components keep what class c taught them, a small leak towards it), so this costs one distance
matrix: about a second for MNIST. On the data above the rehearsal reads 0.984 / 0.990 for the 8x8 digits and
0.743 / 0.926 for MNIST, the same order and nearly the same gaps as the held-out classes themselves.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from genserve.artifacts.class_gaussians import ClassGaussians
from genserve.artifacts.neighbours import EXACT_ITEMS, NeighbourIndex

# A distance within this mean AUROC of the best one in the rehearsal ranks too: the rehearsal's standard error on
# a few hundred validation images is about 0.01, so closer distances are not told apart.
PRIMARY_MARGIN = 0.02
MAX_QUERIES = 2_000  # validation images used (a seeded sample beyond this)
QUERY_CHUNK = 256


def leave_class_out_auroc(train_images: np.ndarray, train_labels: np.ndarray | None, images: np.ndarray,
                          labels: np.ndarray | None, neighbours: NeighbourIndex, gaussians: ClassGaussians,
                          seed: int = 0) -> dict[str, float] | None:
    """Mean over training classes c of the AUROC with which each distance ("knn", "mahalanobis"), fitted without
    class c, flags the validation images of class c among all of them. None without labels, or when fewer than
    two classes have both training and validation images."""
    if train_labels is None or labels is None:
        return None
    train_labels, labels = np.asarray(train_labels), np.asarray(labels)
    classes = [c for c in np.unique(train_labels) if 0 < np.sum(labels == c) < len(labels)]
    if len(classes) < 2 or len(gaussians.class_means) != len(np.unique(train_labels)):
        return None
    rng = np.random.default_rng(seed)
    if len(train_labels) > EXACT_ITEMS:  # a seeded sample of the training split, searched exactly
        keep = np.sort(rng.choice(len(train_labels), EXACT_ITEMS, replace=False))
        train_images, train_labels = train_images[keep], train_labels[keep]
    if len(labels) > MAX_QUERIES:
        keep = np.sort(rng.choice(len(labels), MAX_QUERIES, replace=False))
        images, labels = images[keep], labels[keep]
    knn = knn_without_each_class(neighbours, train_images, train_labels, images, classes)
    per_class = gaussians.class_distances(images)  # (N, C), columns in np.unique(train_labels) order
    order = list(np.unique(train_labels))
    auroc: dict[str, list[float]] = {"knn": [], "mahalanobis": []}
    for c in classes:
        novel = (labels == c).astype(np.int64)
        auroc["knn"].append(roc_auc_score(novel, knn[c]))
        auroc["mahalanobis"].append(roc_auc_score(novel, np.delete(per_class, order.index(c), axis=1).min(1)))
    return {name: float(np.mean(values)) for name, values in auroc.items()}


def knn_without_each_class(neighbours: NeighbourIndex, train_images: np.ndarray, train_labels: np.ndarray,
                           images: np.ndarray, classes: list) -> dict:
    """Class c -> each image's distance to its k-th nearest training image outside class c (the index's space
    and k)."""
    stored = neighbours.embed(train_images)
    queries = neighbours.embed(images)
    out: dict = {c: [] for c in classes}
    masks = {c: torch.from_numpy(train_labels == c) for c in classes}
    with torch.inference_mode():
        for start in range(0, len(queries), QUERY_CHUNK):
            d = torch.cdist(queries[start:start + QUERY_CHUNK], stored)
            for c in classes:
                rest = d[:, ~masks[c]]
                k = min(neighbours.k, rest.shape[1])
                out[c].append(rest.topk(k, dim=1, largest=False).values[:, -1])
    return {c: torch.cat(v).double().numpy() for c, v in out.items()}


def primary_distances(auroc: dict[str, float] | None) -> tuple[list[str] | None, str]:
    """The distances the ensemble ranks by (those within PRIMARY_MARGIN of the rehearsal's best; None: no
    rehearsal, the kind's rule) and why, for the manifest."""
    if not auroc:
        return None, ""
    best = max(auroc.values())
    chosen = [m for m in ("knn", "mahalanobis") if m in auroc and auroc[m] >= best - PRIMARY_MARGIN]
    shown = ", ".join(f"{m} {v:.3f}" for m, v in auroc.items())
    return chosen, (f"each training class left out in turn, the distances found it in the validation split with "
                    f"mean AUROC {shown}: those within {PRIMARY_MARGIN} of the best rank")
