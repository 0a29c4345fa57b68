"""MADE with mixture-of-Gaussians conditionals for continuous records (RNADE's conditionals on MADE's masks:
Uria et al. 2013, Germain et al. 2015). Exact log-likelihood in one pass, sampling in D.

x (raw) -> z = (x - feature_mean) / feature_scale -> a masked MLP whose outputs for feature d see only the
features before it (the records' column order): for each feature K mixture weights (logits), means and
log-scales, so

    log p(x) = sum_d log sum_k pi_dk(z_<d) N(z_d; mu_dk(z_<d), sigma_dk(z_<d)^2) - sum_d log feature_scale.

Degrees (Germain et al.'s deterministic assignment): input d has degree d (1-based), hidden unit j of every layer
degree 1 + j mod (D - 1); a hidden unit sees the units below of degree <= its own, and feature d's outputs see
the last hidden layer's units of degree < d and, through a direct connection, the inputs before d. So the
first feature's mixture depends on nothing (its outputs are biases), and every ordering constraint holds by
construction (a test checks it from gradients). Log-scales are soft-clamped to +-7 (tanh), so no component
can collapse to a spike during training. Float64, as the GMM.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_SCALE_BOUND = 7.0


@dataclass
class MADEMoGConfig:
    n_features: int
    hidden: tuple[int, ...] = (128, 128)
    n_components: int = 5  # Gaussians per conditional

    def __post_init__(self) -> None:
        self.hidden = tuple(self.hidden)
        if self.n_features < 2:
            raise ValueError(f"MADE-MoG needs at least 2 features, got {self.n_features} (one feature: use a GMM)")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden must list at least one positive width, got {self.hidden}")
        if self.n_components < 1:
            raise ValueError(f"n_components must be at least 1, got {self.n_components}")

    def to_dict(self) -> dict:
        return {**asdict(self), "hidden": list(self.hidden)}


def made_mog_masks(n_features: int, hidden: tuple[int, ...], outputs_per_feature: int) -> list[Tensor]:
    """The 0/1 masks (out, in) of every layer, hidden layers first, then the output and the direct layer."""
    d = n_features
    inputs = torch.arange(1, d + 1)
    degrees = [inputs] + [1 + torch.arange(width) % (d - 1) for width in hidden]
    masks = [(below[None, :] <= above[:, None]).double() for below, above in itertools.pairwise(degrees)]
    outputs = inputs.repeat_interleave(outputs_per_feature)
    masks.append((degrees[-1][None, :] < outputs[:, None]).double())  # output: strictly earlier
    masks.append((inputs[None, :] < outputs[:, None]).double())  # direct input -> output, strictly earlier
    return masks


class MADEMoG(nn.Module):
    """`forward` returns (log p(x), an empty (N, 0) responsibilities array), as RealNVP does."""

    def __init__(self, config: MADEMoGConfig, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.config = config
        d, k = config.n_features, config.n_components
        self.register_buffer("feature_mean", torch.zeros(d, dtype=dtype))
        self.register_buffer("feature_scale", torch.ones(d, dtype=dtype))
        widths = [d, *config.hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b, dtype=dtype) for a, b in itertools.pairwise(widths))
        self.output = nn.Linear(widths[-1], d * 3 * k, dtype=dtype)
        self.direct = nn.Linear(d, d * 3 * k, bias=False, dtype=dtype)
        # Fixed by the config (deterministic degrees): not saved, rebuilt identically at load.
        for i, mask in enumerate(made_mog_masks(d, config.hidden, 3 * k)):
            self.register_buffer(f"mask_{i}", mask.to(dtype), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.feature_mean.dtype

    def set_standardisation(self, mean: Tensor, scale: Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_scale.copy_(scale)

    def _mask(self, i: int) -> Tensor:
        return getattr(self, f"mask_{i}")

    def conditionals(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Standardised records (N, D) -> mixture log-weights, means, log-scales, each (N, D, K); those of feature d
        depend on z[:, :d] only."""
        h = z
        for i, layer in enumerate(self.hidden):
            h = F.silu(F.linear(h, layer.weight * self._mask(i), layer.bias))
        n_hidden = len(self.hidden)
        out = F.linear(h, self.output.weight * self._mask(n_hidden), self.output.bias)
        out = out + F.linear(z, self.direct.weight * self._mask(n_hidden + 1))
        logits, means, raw_scales = out.view(z.shape[0], self.config.n_features, 3, -1).unbind(2)
        log_scales = LOG_SCALE_BOUND * torch.tanh(raw_scales / LOG_SCALE_BOUND)
        return F.log_softmax(logits, dim=-1), means, log_scales

    def log_prob(self, x: Tensor) -> Tensor:
        z = (x - self.feature_mean) / self.feature_scale
        log_weights, means, log_scales = self.conditionals(z)
        u = (z[..., None] - means) * torch.exp(-log_scales)
        component = -0.5 * u * u - log_scales - 0.5 * math.log(2 * math.pi)
        per_feature = torch.logsumexp(log_weights + component, dim=-1)  # (N, D): log p(z_d | z_<d)
        return per_feature.sum(-1) - torch.log(self.feature_scale).sum()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.log_prob(x), x.new_zeros(x.shape[0], 0)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        d = self.config.n_features
        z = torch.zeros(n, d, dtype=self.dtype, device=self.feature_mean.device)
        for i in range(d):  # feature i's conditionals depend only on the features already drawn
            log_weights, means, log_scales = self.conditionals(z)
            k = torch.multinomial(log_weights[:, i].exp().cpu(), 1, generator=generator).to(z.device)
            eps = torch.randn(n, 1, generator=generator, dtype=self.dtype).to(z.device)
            mu, log_scale = means[:, i].gather(1, k), log_scales[:, i].gather(1, k)
            z[:, i] = (mu + torch.exp(log_scale) * eps)[:, 0]
        return z * self.feature_scale + self.feature_mean
