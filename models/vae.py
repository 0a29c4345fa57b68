"""A convolutional variational autoencoder (Kingma & Welling 2014) for grey-level images, and its bounds on log p(x).

Encoder: two stride-2 convolutions (H, W -> H/4, W/4), a linear layer to the mean and log-variance of
q(z | x) = N(mu(x), diag(sigma(x)^2)). Decoder: a linear layer back to the H/4 x W/4 map, two stride-2 transposed
convolutions, and per pixel a Bernoulli logit (2 levels) or a softmax over the levels (more), the likelihoods of
models/image.py. The prior is N(0, I). H and W must be multiples of 4 (28x28 MNIST, 8x8 digits).

A VAE has no exact log p(x); it gives lower bounds (the artifact's density capability is `bound`):
- the ELBO, E_q[log p(x | z)] - KL(q(z | x) || p(z)), the KL in closed form, the expectation from one sample of the
  reparameterised z = mu + sigma * eps (training; the test split's ELBO averages several);
- the importance-weighted bound (Burda et al. 2016), log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x) with z_k ~ q,
  which is the ELBO at K = 1 in expectation, never decreases in expectation as K grows, and tends to log p(x).
Both are Monte Carlo estimates: a torch.Generator makes them reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from genserve.models.image import ImageShape, draw_pixel, pixel_log_likelihood

LOG_2PI = math.log(2 * math.pi)


@dataclass
class VAEConfig(ImageShape):
    latent_dim: int = 16
    channels: int = 32  # the first convolution's; the second has twice as many
    hidden: int = 256  # the linear layer between the feature map and the latent code

    def __post_init__(self) -> None:
        if self.height % 4 or self.width % 4:
            raise ValueError(f"the VAE halves the image twice: height and width must be multiples of 4, got "
                             f"{self.height}x{self.width}")
        if self.n_classes:
            raise ValueError("this VAE is unconditional: n_classes must be 0")
        for field in ("latent_dim", "channels", "hidden"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(self, field)}")


class ConvVAE(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.height, self.width, self.levels = config.height, config.width, config.levels
        c, h4, w4 = config.channels, config.height // 4, config.width // 4
        self.out_channels = 1 if config.levels == 2 else config.levels
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(2 * c * h4 * w4, config.hidden), nn.SiLU(),
            nn.Linear(config.hidden, 2 * config.latent_dim),
        )
        self.decoder_input = nn.Sequential(
            nn.Linear(config.latent_dim, config.hidden), nn.SiLU(),
            nn.Linear(config.hidden, 2 * c * h4 * w4), nn.SiLU(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(c, self.out_channels, 4, stride=2, padding=1),
        )
        self._map = (2 * c, h4, w4)

    @property
    def n_pixels(self) -> int:
        return self.height * self.width

    @property
    def device(self) -> torch.device:
        return self.decoder_input[0].weight.device

    def scaled(self, x: Tensor) -> Tensor:
        """Grey levels (N, H, W) as floats in [0, 1], one channel: the encoder's input."""
        return (x.float() / (self.levels - 1))[:, None]

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images (N, H, W) of levels -> the mean and log-variance of q(z | x), each (N, latent_dim)."""
        mu, log_var = self.encoder(self.scaled(x)).chunk(2, dim=-1)
        return mu, log_var.clamp(-12.0, 8.0)  # keeps exp() finite while training goes wild early on

    def decode(self, z: Tensor) -> Tensor:
        """Latent codes (N, latent_dim) -> per-pixel logits (N, H*W, out_channels), raster order."""
        logits = self.decoder(self.decoder_input(z).view(-1, *self._map))
        return logits.flatten(2).transpose(1, 2)

    def reconstruction_log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z) (N,) in nats."""
        return pixel_log_likelihood(self.decode(z), x.flatten(1)).sum(-1)

    def elbo(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(ELBO, reconstruction term E_q log p(x | z), KL(q || p)), each (N,) in nats, from one reparameterised
        sample of z; the KL in closed form."""
        mu, log_var = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * log_var) * eps
        reconstruction = self.reconstruction_log_prob(x, z)
        kl = 0.5 * (mu * mu + torch.exp(log_var) - 1.0 - log_var).sum(-1)
        return reconstruction - kl, reconstruction, kl

    @torch.no_grad()
    def importance_bound(self, x: Tensor, k: int, generator: torch.Generator | None = None,
                         chunk: int = 4096) -> Tensor:
        """The importance-weighted bound with k samples per image (N,), in nats; k = 1 is a one-sample ELBO
        estimate with the KL sampled too. Decoded in chunks of at most `chunk` (image, sample) pairs."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        mu, log_var = self.encode(x)
        std = torch.exp(0.5 * log_var)
        # All the noise first, so that the chunking (a memory bound) never changes the result.
        noise = torch.randn((k, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        per_image = max(1, chunk // k)
        out = []
        for start in range(0, x.shape[0], per_image):
            m, s, xs = mu[start:start + per_image], std[start:start + per_image], x[start:start + per_image]
            eps = noise[:, start:start + per_image]
            z = m + s * eps  # (k, n, latent)
            log_q = (-0.5 * eps * eps - torch.log(s) - 0.5 * LOG_2PI).sum(-1)
            log_prior = (-0.5 * z * z - 0.5 * LOG_2PI).sum(-1)
            n = xs.shape[0]
            repeated = xs[None].expand(k, *xs.shape).reshape(k * n, *xs.shape[1:])
            log_lik = self.reconstruction_log_prob(repeated, z.reshape(k * n, -1)).view(k, n)
            out.append(torch.logsumexp(log_lik + log_prior - log_q, dim=0) - math.log(k))
        return torch.cat(out)

    @torch.no_grad()
    def images_from(self, z: Tensor, generator: torch.Generator | None = None, mode: bool = False) -> Tensor:
        """Images (N, H, W) decoded from latent codes: each pixel drawn from p(x | z), or its most likely level."""
        logits = self.decode(z)
        if mode:
            pixels = (logits[..., 0] > 0).long() if self.out_channels == 1 else logits.argmax(-1)
        else:
            pixels = draw_pixel(logits.reshape(-1, self.out_channels), generator).view(z.shape[0], -1)
        return pixels.view(-1, self.height, self.width)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images from the model: z ~ N(0, I), then every pixel from p(x | z)."""
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=self.device)
        return self.images_from(z, generator)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Each image through the posterior mean and back: the decoder's most likely image given mu(x)."""
        mu, _ = self.encode(x)
        return self.images_from(mu, mode=True)

    @torch.no_grad()
    def interpolate(self, a: Tensor, b: Tensor, steps: int) -> Tensor:
        """`steps` images (steps, H, W) decoded (most likely levels) from posterior means on the line from a's to
        b's, both ends included."""
        mu, _ = self.encode(torch.stack([a, b]))
        t = torch.linspace(0, 1, steps, device=mu.device)[:, None]
        return self.images_from((1 - t) * mu[0] + t * mu[1], mode=True)

    def forward(self, x: Tensor) -> Tensor:
        """The ELBO (N,) of one sample per image, for training."""
        return self.elbo(x)[0]


def kl_weight(step: int, warmup_steps: int) -> float:
    """The KL term's weight (beta) at a training step: a linear warm-up from 0 to 1 over `warmup_steps` (so the
    decoder learns to use z before the KL pulls q to the prior), then 1: the objective is the ELBO itself."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def beta_elbo_loss(model: ConvVAE, x: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, mean reconstruction term, mean KL): the negative of E_q log p(x | z) - beta KL, per image."""
    _, reconstruction, kl = model.elbo(x)
    return -(reconstruction - beta * kl).mean(), reconstruction.mean(), kl.mean()
