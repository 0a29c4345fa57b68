"""Tabular data for density models: scikit-learn's bundled sets and CSV files, split reproducibly."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# scikit-learn's bundled datasets that ship with the package (no download).
SKLEARN_DATASETS = ("breast_cancer", "wine", "iris", "digits", "diabetes")


@dataclass
class Tabular:
    x: np.ndarray  # (N, D) float64
    feature_names: list[str]
    source: str  # what --dataset said, recorded in the manifest
    target: np.ndarray | None = None  # class labels, for scikit-learn's labelled datasets


@dataclass
class Split:
    train: np.ndarray
    validation: np.ndarray
    seed: int
    validation_fraction: float


def load_tabular(spec: str, label_column: str | None = None) -> Tabular:
    """`sklearn:NAME` for a bundled scikit-learn dataset (features only), or a path to a CSV file.

    A CSV file needs a header row and numeric values; `label_column`, if given, is dropped.
    """
    if spec.startswith("sklearn:"):
        return _load_sklearn(spec.removeprefix("sklearn:"), spec)
    path = Path(spec)
    if path.suffix.lower() == ".csv":
        return _load_csv(path, label_column)
    raise ValueError(
        f"unknown dataset {spec!r}: use sklearn:NAME (one of {', '.join(SKLEARN_DATASETS)}) or a .csv file"
    )


def _load_sklearn(name: str, spec: str) -> Tabular:
    if name not in SKLEARN_DATASETS:
        raise ValueError(f"unknown scikit-learn dataset {name!r}; available: {', '.join(SKLEARN_DATASETS)}")
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, f"load_{name}")()
    names = [str(n) for n in getattr(bunch, "feature_names", [])] or [
        f"x{i}" for i in range(bunch.data.shape[1])
    ]
    return Tabular(np.asarray(bunch.data, dtype=np.float64), names, spec, np.asarray(bunch.target))


def exclude_classes(data: Tabular, classes: list[int]) -> Tabular:
    """The records whose class is not in `classes` (training on normal classes for anomaly detection)."""
    if data.target is None:
        raise ValueError(f"{data.source} has no class labels to exclude classes by (scikit-learn datasets do)")
    known = set(np.unique(data.target).tolist())
    unknown = sorted(set(classes) - known)
    if unknown:
        raise ValueError(f"{data.source} has no class {unknown}; its classes are {sorted(known)}")
    keep = ~np.isin(data.target, classes)
    return Tabular(data.x[keep], data.feature_names, f"{data.source} without classes {sorted(classes)}",
                   data.target[keep])


def _load_csv(path: Path, label_column: str | None) -> Tabular:
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path} is empty; a header row with feature names is required")
        header = [h.strip() for h in header]
        if label_column is not None and label_column not in header:
            raise ValueError(f"label column {label_column!r} is not in {path}'s header {header}")
        keep = [i for i, h in enumerate(header) if h != label_column]
        rows = []
        for row in reader:
            line_no = reader.line_num  # physical line, right after quoted fields spanning lines
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{line_no}: {len(row)} fields, the header has {len(header)}")
            try:
                values = [float(row[i]) for i in keep]
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: non-numeric value ({e})") from None
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{path}:{line_no}: NaN or infinite value")
            rows.append(values)
    if not rows:
        raise ValueError(f"{path} has a header but no data rows")
    return Tabular(np.asarray(rows, dtype=np.float64), [header[i] for i in keep], str(path))


def split(x: np.ndarray, validation_fraction: float, seed: int) -> Split:
    """A seeded random split; the validation part is what calibration and metrics use."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {validation_fraction}")
    n = x.shape[0]
    n_val = max(1, round(n * validation_fraction))
    if n - n_val < 2:
        raise ValueError(f"{n} records are too few to hold out {validation_fraction:.0%} for validation")
    order = np.random.default_rng(seed).permutation(n)
    return Split(x[order[n_val:]], x[order[:n_val]], seed, validation_fraction)


def standardisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean and scale that standardise each feature of `x` (a density model stores them and applies them
    itself)."""
    mean = x.mean(0)
    scale = x.std(0)
    # A constant feature keeps scale 1 (its density is then set by the covariance floor).
    return mean, np.where(scale > 1e-12, scale, 1.0)
