"""Reference models for likelihood-ratio anomaly scores: simple models of the same training data.

A likelihood ratio log p(x) - log p_ref(x) cancels what any model of the data finds easy or hard (smooth
backgrounds, frequent characters, the overall scale of the features) and keeps what only the full model
learned. The reference has to be fitted on the same data and be clearly simpler. One per input type:

- records: a single Gaussian with independent features (a one-component diagonal GaussianMixture, models/gmm.py);
- images: `LocalPixelModel`, each pixel's grey level given only its causal neighbours (left, above-left,
  above and, where the table stays small, above-right) as a smoothed count table, i.e. what a local
  predictive image coder knows;
- text: a bigram (order-2 Kneser-Ney) model of the same tokens (models/ngram.py), with `sequence_log_prob`.

Each is fitted in closed form (counting, or one M-step) by artifacts/reference.py and stored in the artifact as
reference.safetensors, with reference.json holding its kind and config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from genserve.models.gmm import GaussianMixture, GMMConfig
from genserve.models.ngram import NGramConfig, NGramLM

TABLE_LIMIT = 1 << 20  # entries of a LocalPixelModel table (4 bytes each) before it drops a neighbour


@dataclass(frozen=True)
class LocalPixelConfig:
    height: int
    width: int
    levels: int
    neighbours: int = 4  # 3: left, above-left, above; 4: and above-right
    alpha: float = 0.5  # Dirichlet smoothing added to every count (Krichevsky-Trofimov)

    def __post_init__(self) -> None:
        if self.neighbours not in (3, 4):
            raise ValueError(f"neighbours must be 3 or 4, got {self.neighbours}")
        if self.levels < 2 or self.height < 1 or self.width < 1 or self.alpha <= 0:
            raise ValueError(f"invalid LocalPixelConfig {self}")

    @classmethod
    def for_images(cls, height: int, width: int, levels: int) -> LocalPixelConfig:
        """Four neighbours when that table fits TABLE_LIMIT entries, else three."""
        neighbours = 4 if (levels + 1) ** 4 * levels <= TABLE_LIMIT else 3
        return cls(height, width, levels, neighbours)

    def to_dict(self) -> dict:
        return asdict(self)


class LocalPixelModel(nn.Module):
    """p(x) = prod_i p(x_i | causal neighbours of i), a categorical per neighbourhood; pixels outside the
    image read as an extra 'border' value, so edges have their own statistics."""

    def __init__(self, config: LocalPixelConfig):
        super().__init__()
        self.config = config
        contexts = (config.levels + 1) ** config.neighbours
        self.register_buffer("log_table", torch.full((contexts, config.levels), -torch.log(
            torch.tensor(float(config.levels))).item()))

    def contexts(self, images: Tensor) -> Tensor:
        """(N, H, W) levels -> (N, H, W) context index of each pixel."""
        border = self.config.levels
        padded = nn.functional.pad(images.long(), (1, 1, 1, 0), value=border)  # left, right, top
        H, W = images.shape[1:]
        left = padded[:, 1:, 0:W]
        above_left = padded[:, :H, 0:W]
        above = padded[:, :H, 1:W + 1]
        base = border + 1
        index = left + base * above_left + base**2 * above
        if self.config.neighbours == 4:
            index = index + base**3 * padded[:, :H, 2:W + 2]
        return index

    @torch.no_grad()
    def fit(self, images: Tensor) -> LocalPixelModel:
        """Set the table from the counts of (context, level) over `images` (N, H, W)."""
        levels = self.config.levels
        cells = self.contexts(images) * levels + images.long()
        counts = torch.bincount(cells.flatten(), minlength=self.log_table.numel()).view_as(self.log_table)
        smoothed = counts.double() + self.config.alpha
        self.log_table.copy_((smoothed / smoothed.sum(1, keepdim=True)).log().float())
        return self

    def log_prob(self, images: Tensor) -> Tensor:
        """log p(x) in nats for (N, H, W) images of levels, float64."""
        ctx = self.contexts(images).flatten(1)
        picked = self.log_table.double()[ctx, images.long().flatten(1)]
        return picked.sum(1)


def sequence_log_prob(model: NGramLM, token_lists: list[list[int]]) -> list[float]:
    """log p(tokens[1:] | tokens[0]) of each list (the first token, BOS, is context), nats."""
    out = []
    for ids in token_lists:
        tokens = torch.tensor([ids], dtype=torch.int64)
        log_probs = model.logits(tokens[:, :-1])[0].double()
        out.append(float(log_probs.gather(1, tokens[0, 1:, None]).sum()))
    return out


REFERENCE_KINDS = {"gmm": GMMConfig, "local_pixels": LocalPixelConfig, "ngram": NGramConfig}


def build_reference(kind: str, config: dict) -> nn.Module:
    """An unfitted reference module of `kind` from its config dict (weights loaded by the caller)."""
    if kind == "gmm":
        return GaussianMixture(GMMConfig(**config), dtype=torch.float64)
    if kind == "local_pixels":
        return LocalPixelModel(LocalPixelConfig(**config))
    if kind == "ngram":
        return NGramLM(NGramConfig(**config))
    raise ValueError(f"unknown reference model kind {kind!r}; known: {', '.join(REFERENCE_KINDS)}")
