"""Densities of records (continuous tabular data: GMMs, RealNVP, MADE-MoG): checking records against the model's
features and the limits, log p(x) with a mixture's responsibilities, and samples. Protocol-neutral: /v1 and /v2
both call it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from genserve.service.catalog import ModelCatalog
from genserve.service.errors import InvalidInput, TooLarge


@dataclass
class RecordScores:
    records: np.ndarray  # (N, D) float64, as scored
    log_prob: np.ndarray  # (N,) nats
    responsibilities: np.ndarray  # (N, K) for a mixture, (N, 0) otherwise


class RecordsService:
    def __init__(self, catalog: ModelCatalog):
        self.catalog = catalog

    def records(self, name: str, records: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
        """The records as float64 (N, D), each checked to have the model's features; TooLarge past the limit.
        Lists of numbers (JSON) or an (N, D) array (binary tensors, or records already checked)."""
        manifest = self.catalog.records_model(name)
        limit = self.catalog.limits.max_records_per_request
        if len(records) > limit:
            raise TooLarge(f"{len(records)} records in one request; the limit is {limit} per request")
        expected = manifest.input.n_features
        x = as_matrix(records)
        if x is None or x.shape[1:] != (expected,):  # some record's width is wrong: find the first, to name it
            for i, record in enumerate(records):
                if len(record) != expected:
                    names = manifest.input.feature_names
                    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                    raise InvalidInput(f"records[{i}] has {len(record)} features; model {name!r} expects "
                                       f"{expected} ({shown}), in that order", type_="wrong_feature_count")
            x = np.asarray(records, dtype=np.float64)
        if not np.isfinite(x).all():
            i, j = np.argwhere(~np.isfinite(x))[0]
            raise InvalidInput(f"records[{i}][{j}] is {x[i, j]}; records hold finite numbers")
        return x

    async def log_prob(self, name: str, records: Sequence[Sequence[float]] | np.ndarray) -> RecordScores:
        x = self.records(name, records)
        log_prob, responsibilities = await self.catalog.call(name, "score", x)
        return RecordScores(x, np.asarray(log_prob), np.asarray(responsibilities))

    async def sample(self, name: str, n: int, seed: int | None) -> np.ndarray:
        """n records in raw feature units; the same seed gives the same samples."""
        self.catalog.records_model(name)
        limit = self.catalog.limits.max_samples_per_request
        if n > limit:
            raise TooLarge(f"n={n} samples asked for; the limit is {limit} per request")
        return await self.catalog.call(name, "sample", n, seed)


def as_matrix(records: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray | None:
    """Records as one float64 (N, D) array, converted in one call (not record by record: a request may hold
    10,000); None when they do not form one (records of different widths)."""
    try:
        x = np.asarray(records, dtype=np.float64)
    except ValueError:  # ragged: "inhomogeneous shape"
        return None
    return x if x.ndim == 2 else None
