"""RealNVP (Dinh et al. 2017) for grey-level images, with uniform dequantisation; its bounds on log P(x).

A flow is a density of a continuous variable, and images are discrete: an image x (N, H, W) of grey levels in
[0, levels) is dequantised to y = (x + u) / levels with u ~ U[0, 1)^D, so y lies in the cell
[x / levels, (x + 1) / levels) of volume levels^-D. The map from y to the latent z:

    y -> logit transform s = logit(alpha + (1 - 2 alpha) y)        (squashes the ends away from 0 and 1)
      -> `n_blocks` affine couplings with checkerboard masks on the one-channel image (parity alternating)
      -> for each of `n_scales` scales: a squeeze (2x2 pixels -> 4 channels), then `n_blocks` affine couplings
         with channel masks (first half / second half of the channels, alternating)
      -> z ~ N(0, I).

Each coupling keeps its masked half `a` and moves the rest `b` as b' = b * exp(s(a)) + t(a), with s and t from a
small convolutional net (3x3 convolutions and SiLU, no normalisation, so log |det| is exact and independent of the
batch); s is tanh-bounded with a learned per-channel scale, and the net's output convolution is zero-initialised,
so every layer starts as the identity (as models/flow.py does for records). log |det| is sum(s) for a coupling, and
sum(log(1 - 2 alpha) - log p - log(1 - p)) with p = alpha + (1 - 2 alpha) y for the logit transform.

What the densities mean:
- `log_prob_continuous(y)` is the model's exact log-density of the continuous y (nats). Its support is the
  logit's domain, a little wider than [0, 1)^D, so the mass it puts on [0, 1)^D is at most 1.
- The probability of a discrete image is the mass of its cell, P(x) = levels^-D E_u p((x + u) / levels). One draw
  of u gives `dequantised_log_prob(x) = log p((x + u) / levels) - D log(levels)`, whose expectation over u is a
  lower bound on log P(x) (Jensen); its negative over D ln 2 is the standard dequantised bits/dim.
- `importance_bound(x, k)` = log (1/k) sum_j exp(dequantised_log_prob with u_j): importance sampling of the cell
  with the uniform dequantisation as proposal; in expectation a lower bound on log P(x) that never loosens as k
  grows and tends to log P(x). exp of it is an unbiased estimate of P(x), and sum over x of P(x) <= 1.
So for the discrete images served the density is a bound, not exact: the artifact's density capability is `bound`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from genserve.models.image import ImageShape

LOG_2PI = math.log(2 * math.pi)


@dataclass
class ImageFlowConfig(ImageShape):
    n_blocks: int = 4  # coupling layers per scale (the checkerboard stage, and each squeezed stage)
    channels: int = 32  # hidden channels of each coupling's convolutional net
    n_scales: int = 1  # squeezes, each followed by channel-mask couplings: 1 or 2
    alpha: float = 0.05  # the logit transform's margin

    def __post_init__(self) -> None:
        if self.n_classes:
            raise ValueError("this RealNVP is unconditional: n_classes must be 0")
        if self.levels < 2:
            raise ValueError(f"levels must be 2 or more, got {self.levels}")
        if self.n_scales not in (1, 2):
            raise ValueError(f"n_scales must be 1 or 2, got {self.n_scales}")
        step = 2**self.n_scales
        if self.height < 1 or self.width < 1 or self.height % step or self.width % step:
            raise ValueError(f"{self.n_scales} squeeze(s) halve the image: height and width must be positive "
                             f"multiples of {step}, got {self.height}x{self.width}")
        for field in ("n_blocks", "channels"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(self, field)}")
        if not 0 <= self.alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), got {self.alpha}")


def checkerboard_mask(channels: int, height: int, width: int, parity: int) -> Tensor:
    """(C, H, W) booleans, True where (i + j) % 2 == parity: the pixels a checkerboard coupling keeps."""
    i, j = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return ((i + j) % 2 == parity).expand(channels, height, width).clone()


def channel_mask(channels: int, height: int, width: int, parity: int) -> Tensor:
    """(C, H, W) booleans, True for the first half of the channels (parity 0) or the second (parity 1)."""
    first = torch.arange(channels) < channels // 2
    keep = first if parity == 0 else ~first
    return keep[:, None, None].expand(channels, height, width).clone()


def squeeze(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, 4C, H/2, W/2): each 2x2 block of pixels becomes 4 channels."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, 4 * c, h // 2, w // 2)


def unsqueeze(x: Tensor) -> Tensor:
    """The inverse of `squeeze`."""
    n, c, h, w = x.shape
    return x.view(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c // 4, 2 * h, 2 * w)


class ConvCoupling(nn.Module):
    """One affine coupling on (N, C, H, W) maps: the kept entries (mask True) give the scale and shift of the
    others. The net sees the kept entries and the mask itself (so a kept zero and a masked-out entry differ)."""

    def __init__(self, keep: Tensor, hidden: int) -> None:
        super().__init__()
        c = keep.shape[0]
        self.register_buffer("keep", keep.float())
        self.net = nn.Sequential(
            nn.Conv2d(c + 1, hidden, 3, padding=1), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU(),
        )
        self.head = nn.Conv2d(hidden, 2 * c, 3, padding=1)
        nn.init.zeros_(self.head.weight)  # starts as the identity map: s = t = 0
        nn.init.zeros_(self.head.bias)
        self.s_scale = nn.Parameter(torch.ones(c, 1, 1))

    def _s_t(self, kept: Tensor) -> tuple[Tensor, Tensor]:
        mask = self.keep[:1].expand(kept.shape[0], 1, *kept.shape[2:])
        s, t = self.head(self.net(torch.cat([kept, mask], dim=1))).chunk(2, dim=1)
        moved = 1 - self.keep
        # Only the moved entries change; the kept ones get s = t = 0 (and contribute 0 to log |det|).
        return torch.tanh(s) * self.s_scale * moved, t * moved

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x -> (x', log |det dx'/dx|) per image."""
        s, t = self._s_t(x * self.keep)
        return x * torch.exp(s) + t, s.flatten(1).sum(-1)

    def inverse(self, y: Tensor) -> Tensor:
        s, t = self._s_t(y * self.keep)  # the kept entries are unchanged, so s and t are those of the forward
        return (y - t) * torch.exp(-s)


class ImageRealNVP(nn.Module):
    """RealNVP on dequantised grey-level images: exact log-density of y, lower bounds on log P(x) of images."""

    def __init__(self, config: ImageFlowConfig) -> None:
        super().__init__()
        self.config = config
        self.height, self.width, self.levels = config.height, config.width, config.levels
        c, h, w = 1, config.height, config.width
        stages = [nn.ModuleList(ConvCoupling(checkerboard_mask(c, h, w, k % 2), config.channels)
                                for k in range(config.n_blocks))]
        for _ in range(config.n_scales):
            c, h, w = 4 * c, h // 2, w // 2
            stages.append(nn.ModuleList(ConvCoupling(channel_mask(c, h, w, k % 2), config.channels)
                                        for k in range(config.n_blocks)))
        # stages[0] acts on (1, H, W); stages[s] for s >= 1 after s squeezes.
        self.stages = nn.ModuleList(stages)
        self.latent_shape = (c, h, w)

    @property
    def n_pixels(self) -> int:
        return self.height * self.width

    @property
    def device(self) -> torch.device:
        return self.stages[0][0].s_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.stages[0][0].s_scale.dtype

    def to_latent(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Continuous images y (N, H, W) in [0, 1) -> (z (N, D), log |det dz/dy| (N,)), logit transform included."""
        a = self.config.alpha
        p = a + (1 - 2 * a) * y
        x = (torch.log(p) - torch.log1p(-p))[:, None]
        log_det = (math.log(1 - 2 * a) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(-1)
        for i, stage in enumerate(self.stages):
            if i:
                x = squeeze(x)
            for layer in stage:
                x, ld = layer(x)
                log_det = log_det + ld
        return x.flatten(1), log_det

    def forward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """The flow's map y -> (z, log |det dz/dy|): `to_latent`."""
        return self.to_latent(y)

    def inverse(self, z: Tensor) -> Tensor:
        """Latents z (N, D) -> continuous images y (N, H, W); in [0, 1) for the z of a y in [0, 1)."""
        x = z.view(-1, *self.latent_shape)
        for i in reversed(range(len(self.stages))):
            for layer in reversed(self.stages[i]):
                x = layer.inverse(x)
            if i:
                x = unsqueeze(x)
        a = self.config.alpha
        return ((torch.sigmoid(x[:, 0]) - a) / (1 - 2 * a))

    def log_prob_continuous(self, y: Tensor) -> Tensor:
        """The exact log-density (N,) in nats of continuous images y (N, H, W) in [0, 1)."""
        z, log_det = self.to_latent(y)
        return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * LOG_2PI + log_det

    def _dequantised(self, x: Tensor, u: Tensor) -> Tensor:
        y = (x.to(u.dtype) + u) / self.levels
        return self.log_prob_continuous(y) - self.n_pixels * math.log(self.levels)

    def dequantised_log_prob(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """log p((x + u) / levels) - D log(levels) (N,) in nats for images x (N, H, W) of levels and one draw of
        u ~ U[0, 1)^D: the log-density of x's cell at one point; in expectation a lower bound on log P(x).
        Differentiable: the training objective."""
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=self.dtype)
        return self._dequantised(x, u)

    @torch.no_grad()
    def importance_bound(self, x: Tensor, k: int, generator: torch.Generator | None = None,
                         chunk: int = 4096) -> Tensor:
        """log (1/k) sum_j exp(dequantised_log_prob(x; u_j)) (N,) in nats, u_j ~ U[0, 1)^D: a lower bound on log P(x)
        (in expectation), tighter as k grows; k = 1 is `dequantised_log_prob` with the same generator state.
        Evaluated in chunks of at most `chunk` (image, sample) pairs; the noise is drawn first, so chunking never
        changes the result."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        noise = torch.rand((k, *x.shape), generator=generator, device=x.device, dtype=self.dtype)
        per_image = max(1, chunk // k)
        out = []
        for start in range(0, x.shape[0], per_image):
            xs, u = x[start:start + per_image], noise[:, start:start + per_image]
            n = xs.shape[0]
            repeated = xs[None].expand(k, *xs.shape).reshape(k * n, *xs.shape[1:])
            log_w = self._dequantised(repeated, u.reshape(k * n, *xs.shape[1:])).view(k, n)
            out.append(torch.logsumexp(log_w, dim=0) - math.log(k))
        return torch.cat(out)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images (n, H, W) of grey levels (int64): z ~ N(0, I), y = inverse(z), level floor(y * levels) clamped
        to [0, levels - 1] (the cell y falls in)."""
        z = torch.randn(n, self.n_pixels, generator=generator, device=self.device, dtype=self.dtype)
        y = self.inverse(z)
        return torch.floor(y * self.levels).clamp(0, self.levels - 1).long()
