"""The contracts of the model replicas: what the Gateway may call on each family's Ray Serve deployment through
its handle (`handle.score.remote(...)`), one call shape per method.

- `RecordsReplica` (family records: service/records.py): `score(records)`;
- `ImageReplica` (families image and latent: service/image.py, service/latent.py): one shape for both,
  `score(images, labels, per_pixel=False, samples=None, seed=None)`. A pixel model ignores `samples` and `seed`
  (its log p(x) is exact: the API refuses them before), a latent one `per_pixel` (it has no per-pixel
  conditionals: the API refuses it before, and `pixels` comes back None);
- `TextReplica` (family text: service/text.py): `generate(prompt_ids, params, stream)` and `score(token_lists)`.

Every replica also answers `info()`, `ready()` and `reconfigure(user_config)` (Serve calls the last with the
deployment's `user_config`), and `reference_log_prob(...)` of its inputs (None when the artifact has no reference
model). service/families.py says which deployment serves which family; tests check that each deployment's class
keeps its contract, parameter for parameter.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

import numpy as np

ImageScoreResult = tuple[np.ndarray, np.ndarray | None]  # log p(x) (N,), per-pixel conditionals (N, H, W) or None


@runtime_checkable
class Replica(Protocol):
    """What every model replica answers."""

    def info(self) -> dict[str, Any]:
        """{"runtime": torch | onnx, "device": cpu | cuda, ...}."""
        ...

    def ready(self) -> bool:
        ...

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        ...


@runtime_checkable
class RecordsReplica(Replica, Protocol):
    """A model of records: continuous tabular data (GMM, RealNVP, MADE-MoG)."""

    async def score(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) float64 records -> log p(x) (N,), responsibilities (N, K) ((N, 0) but for a mixture)."""
        ...

    def reference_log_prob(self, records: np.ndarray) -> np.ndarray | None:
        ...

    async def knn_distance(self, records: np.ndarray) -> np.ndarray | None:
        """Distances to the k-th nearest training record (the knn score); None without a neighbour index."""
        ...

    def sample(self, n: int, seed: int | None) -> np.ndarray:
        ...


@runtime_checkable
class ImageReplica(Replica, Protocol):
    """An image model: autoregressive over pixels (family image) or latent-variable (family latent)."""

    async def score(self, images: np.ndarray, labels: np.ndarray | None, per_pixel: bool = False,
                    samples: int | None = None, seed: int | None = None) -> ImageScoreResult:
        """int64 images (N, H, W), labels (N,) or None -> log p(x) (N,) (a bound for a latent model, with
        `samples` importance samples per image from `seed`), and the per-pixel conditionals if `per_pixel`."""
        ...

    async def sample(self, n: int, labels: np.ndarray | None, seed: int | None) -> dict[str, Any]:
        """{"images": (n, H, W) int64, "labels": (n,) or None, "log_prob": (n,) or None}."""
        ...

    def reference_log_prob(self, images: np.ndarray) -> np.ndarray | None:
        ...

    async def knn_distance(self, images: np.ndarray) -> np.ndarray | None:
        """Distances to the k-th nearest training image (the knn score); None without a neighbour index."""
        ...

    async def class_scores(self, images: np.ndarray) -> dict[str, np.ndarray] | None:
        """class_evidence and class_entropy (artifacts.scores.class_evidence_scores); None when the model is not
        class-conditional."""
        ...

    async def mahalanobis_distance(self, images: np.ndarray) -> np.ndarray | None:
        """Distances to the nearest training class's Gaussian (the mahalanobis score); None without them."""
        ...


@runtime_checkable
class TextReplica(Replica, Protocol):
    """An autoregressive model of token sequences (GPT, LSTM, n-gram)."""

    def generate(self, prompt_ids: list[int], params: dict[str, Any],
                 stream: bool = True) -> AsyncIterator[dict[str, Any]]:
        """{"accepted": True, "prompt_tokens": n}, then this request's decoding updates (only the last one unless
        `stream`)."""
        ...

    async def score(self, token_lists: list[list[int]]) -> list[list[float]]:
        """log p(token t | tokens < t) for t >= 1 of each list."""
        ...

    async def knn_distance(self, token_lists: list[list[int]]) -> np.ndarray | None:
        """Distances to the k-th nearest training line in the model's hidden-state space; None without an index."""
        ...

    async def reference_log_prob(self, token_lists: list[list[int]]) -> list[float] | None:
        ...
