"""RealNVP for records (Dinh et al. 2017): an invertible map to a standard normal, exact log-likelihood.

x (raw units) -> z0 = (x - feature_mean) / feature_scale (the training split's standardisation, stored in the model)
-> K affine coupling layers -> z ~ N(0, I). Coupling k keeps one half of the features, `a`, and moves the other,
`b`, as b' = b * exp(s(a)) + t(a), with s and t one MLP's outputs; the halves alternate from layer to layer
(first half / second half), so after two layers every feature has been moved given the others. s is
tanh-bounded with a learned scale per feature (as in RealNVP's own code), so no layer can blow up early in
training. The Jacobian of each layer is triangular: log |det| = sum(s). So

    log p(x) = log N(z; 0, I) + sum over layers of sum(s) - sum(log feature_scale),

exact, one pass. Sampling runs the layers backwards from z ~ N(0, I): b = (b' - t(a)) * exp(-s(a)).
Float64 throughout, as the GMM: records arrive as float64, and likelihoods of tabular data span many orders.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn


@dataclass
class RealNVPConfig:
    n_features: int
    n_layers: int = 8  # coupling layers; the moved half alternates
    hidden: int = 64  # width of each coupling's MLP
    n_hidden: int = 2  # hidden layers of each coupling's MLP

    def __post_init__(self) -> None:
        if self.n_features < 2:
            raise ValueError(f"RealNVP couples halves of the features: it needs at least 2, got {self.n_features}")
        for field in ("n_layers", "hidden", "n_hidden"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(self, field)}")

    def to_dict(self) -> dict:
        return asdict(self)


def half_masks(n_features: int, n_layers: int) -> Tensor:
    """(n_layers, D) booleans, True for the features a layer keeps (conditions on): first half, second, ..."""
    first = torch.arange(n_features) < n_features // 2
    return torch.stack([first if k % 2 == 0 else ~first for k in range(n_layers)])


class AffineCoupling(nn.Module):
    """One coupling layer: the kept features (mask True) give the scale and shift of the others."""

    def __init__(self, keep: Tensor, hidden: int, n_hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        d = keep.numel()
        self.register_buffer("keep", keep.clone())
        layers: list[nn.Module] = []
        width = d
        for _ in range(n_hidden):
            layers += [nn.Linear(width, hidden, dtype=dtype), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2 * d, dtype=dtype)
        nn.init.zeros_(self.head.weight)  # starts as the identity map: s = t = 0
        nn.init.zeros_(self.head.bias)
        self.s_scale = nn.Parameter(torch.ones(d, dtype=dtype))

    def _s_t(self, kept: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.head(self.net(kept)).chunk(2, dim=-1)
        moved = ~self.keep
        # Only the moved features are changed; the kept ones get s = t = 0 (and contribute 0 to log |det|).
        return torch.tanh(s) * self.s_scale * moved, t * moved

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z -> (z', log |det dz'/dz|) per row."""
        s, t = self._s_t(z * self.keep)
        return z * torch.exp(s) + t, s.sum(-1)

    def inverse(self, y: Tensor) -> Tensor:
        s, t = self._s_t(y * self.keep)  # the kept features are unchanged, so s and t are those of the forward
        return (y - t) * torch.exp(-s)


class RealNVP(nn.Module):
    """log p(x) of raw records; `forward` returns (log p(x), an empty (N, 0) responsibilities array) like the
    GMM's (log p(x), responsibilities), so the same runtimes and endpoints serve both."""

    def __init__(self, config: RealNVPConfig, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.config = config
        d = config.n_features
        self.register_buffer("feature_mean", torch.zeros(d, dtype=dtype))
        self.register_buffer("feature_scale", torch.ones(d, dtype=dtype))
        masks = half_masks(d, config.n_layers)
        self.layers = nn.ModuleList(AffineCoupling(m, config.hidden, config.n_hidden, dtype) for m in masks)

    @property
    def dtype(self) -> torch.dtype:
        return self.feature_mean.dtype

    def set_standardisation(self, mean: Tensor, scale: Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_scale.copy_(scale)

    def to_latent(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Raw records -> (z, log |det dz/dx|) per row, standardisation included."""
        z = (x - self.feature_mean) / self.feature_scale
        log_det = -torch.log(self.feature_scale).sum().expand(x.shape[0])
        for layer in self.layers:
            z, ld = layer(z)
            log_det = log_det + ld
        return z, log_det

    def from_latent(self, z: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z * self.feature_scale + self.feature_mean

    def log_prob(self, x: Tensor) -> Tensor:
        z, log_det = self.to_latent(x)
        return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi) + log_det

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.log_prob(x), x.new_zeros(x.shape[0], 0)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, self.config.n_features, generator=generator, dtype=self.dtype)
        return self.from_latent(z.to(self.feature_mean.device))
