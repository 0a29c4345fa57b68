"""The rehearsal that picks which distance the image ensemble ranks by: each training class left out in turn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from genserve.artifacts.calibration import fit_anomaly_calibration
from genserve.artifacts.class_gaussians import fit_class_gaussians
from genserve.artifacts.neighbours import fit_neighbours
from genserve.artifacts.unseen_class import PRIMARY_MARGIN, leave_class_out_auroc, primary_distances
from genserve.training.image_data import load_image_dataset

LEVELS = 4


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 6, 6) images of LEVELS levels in three classes, each brighter in its own two rows, and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = rng.integers(0, 2, (n, 6, 6))
    for c in range(3):
        images[labels == c, 2 * c: 2 * c + 2] += rng.integers(1, 3, (np.sum(labels == c), 2, 6))
    return np.clip(images, 0, LEVELS - 1), labels


def test_each_class_left_out_of_both_distances_as_defined():
    train, train_labels = synthetic(120, 0)
    images, labels = synthetic(40, 1)
    neighbours = fit_neighbours(train, "pixels", levels=LEVELS)
    gaussians = fit_class_gaussians(train, train_labels, LEVELS, dims=8)
    auroc = leave_class_out_auroc(train, train_labels, images, labels, neighbours, gaussians)
    flat = lambda x: x.reshape(len(x), -1) / (LEVELS - 1)  # noqa: E731
    distances = np.linalg.norm(flat(images)[:, None] - flat(train)[None], axis=-1)  # (40, 120)
    knn, mahalanobis = [], []
    for c in range(3):
        novel = labels == c
        kth = np.sort(distances[:, train_labels != c], axis=1)[:, neighbours.k - 1]
        knn.append(roc_auc_score(novel, kth))
        others = np.delete(gaussians.class_distances(images), c, axis=1).min(1)
        mahalanobis.append(roc_auc_score(novel, others))
    assert auroc == pytest.approx({"knn": np.mean(knn), "mahalanobis": np.mean(mahalanobis)}, abs=1e-6)
    assert np.allclose(gaussians.class_distances(images).min(1), gaussians.distance(images))


def test_no_rehearsal_without_two_labelled_classes():
    train, train_labels = synthetic(60, 2)
    images, labels = synthetic(20, 3)
    neighbours = fit_neighbours(train, "pixels", levels=LEVELS)
    gaussians = fit_class_gaussians(train, train_labels, LEVELS, dims=8)
    assert leave_class_out_auroc(train, None, images, labels, neighbours, gaussians) is None
    one = fit_class_gaussians(train, None, LEVELS, dims=8)
    zeros = np.zeros_like(train_labels)
    assert leave_class_out_auroc(train, zeros, images, np.zeros_like(labels), neighbours, one) is None
    assert primary_distances(None) == (None, "")


def test_the_distances_within_the_margin_of_the_best_rank():
    assert primary_distances({"knn": 0.90, "mahalanobis": 0.90 + PRIMARY_MARGIN})[0] == ["knn", "mahalanobis"]
    chosen, why = primary_distances({"knn": 0.74, "mahalanobis": 0.93})
    assert chosen == ["mahalanobis"] and "knn 0.740, mahalanobis 0.930" in why


@pytest.mark.parametrize(("dataset", "chosen"), [("digits", ["knn", "mahalanobis"]), ("mnist5k", ["mahalanobis"])])
def test_the_rehearsal_on_real_digits_picks_what_held_out_classes_reward(dataset, chosen):
    """docs/anomaly.md: with a digit held out, knn and mahalanobis tie on the 8x8 digits (0.987, 0.990 AUROC) and
    pixel distances fall far behind on binarised MNIST (0.744 against 0.891)."""
    data = load_image_dataset(dataset)
    train = data.train
    neighbours = fit_neighbours(train.images, "pixels", levels=data.levels)
    gaussians = fit_class_gaussians(train.images, train.labels, data.levels)
    auroc = leave_class_out_auroc(train.images, train.labels, data.validation.images, data.validation.labels,
                                  neighbours, gaussians)
    assert primary_distances(auroc)[0] == chosen


def test_a_measured_choice_is_stored_and_a_choice_outside_the_members_falls_back_to_the_rule():
    rng = np.random.default_rng(4)
    validation = {"knn": rng.normal(size=2000), "mahalanobis": rng.normal(size=2000), "nll": rng.normal(size=2000)}
    cals = fit_anomaly_calibration("image", validation, primary=["mahalanobis"], primary_why="rehearsed")
    assert cals.primary() == ["mahalanobis"] and "rehearsed; ranked by mahalanobis" in cals.why
    assert cals.to_dict()["primary"] == ["mahalanobis"]
    fallback = fit_anomaly_calibration("image", validation, primary=["class_entropy"], primary_why="rehearsed")
    assert fallback.primary() == ["knn", "mahalanobis"] and "rehearsed" not in fallback.why
