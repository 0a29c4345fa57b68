"""A DCGAN-style generative adversarial network (Radford et al. 2016) for small grey-level images, with a
spectrally normalised discriminator (Miyato et al. 2018) and, when class-conditional, a projection
discriminator (Miyato & Koyama 2018).

A GAN only samples: it has no density, so it has no `log_prob` (its artifact says density "none").

Images are discrete, integer grey levels (N, H, W) in [0, levels); the networks work on continuous images
in [0, 1]:

- the generator maps z ~ N(0, I) (and a label) to an image in [0, 1] (a sigmoid); `sample` turns it into grey
  levels by rounding, level = round((levels - 1) * x), so a binarised image's pixel is 1 where x >= 0.5;
- the discriminator sees real images scaled to [0, 1], x / (levels - 1), optionally with uniform noise of
  width `noise` grey-level steps added (`unit_images`: dequantisation, so real images are not exactly on a
  grid that the generator's continuous output could never reach). The noise is reflected back into [0, 1] at
  the edges, and with `noise` <= 1 it stays within the level's rounding bin: rounding a noisy real image gives
  the real image back.

Architecture, for a `channels` base width C and an image H x W (both at least 4):

- generator: z -> linear -> 2C maps of ceil(H/4) x ceil(W/4) -> BatchNorm, ReLU -> twice: nearest upsampling
  x2, 3x3 conv to C maps, BatchNorm, ReLU -> 3x3 conv to one map -> sigmoid, cropped to H x W (28 = 7 * 4 and
  8 = 2 * 4 need no crop). When class-conditional, the label enters through every BatchNorm, whose gain and bias
  are the label's (conditional BatchNorm, as in Miyato & Koyama 2018).
  Two departures from DCGAN, both measured on digits. Upsampling and a convolution instead of 4x4 stride-2
  transposed convolutions: with those, every setting tried (learning rates 1e-4 and 2e-4, batch 32 and 64,
  widths 32 and 64, DCGAN's N(0, 0.02) initialisation, no dequantisation noise, no spectral norm) collapsed onto
  one or two digits within 20 epochs (the samples' class entropy below 1 bit), while this one kept all ten (2.8
  of 3.3 bits). Conditional BatchNorm instead of a label embedding concatenated to z: with the concatenation the
  generator learnt to ignore z, one image per class (60 epochs: the samples' mean per-pixel standard deviation
  within a class 0.04, against 0.13 with conditional BatchNorm and 0.15 in the test split).
- discriminator: 3x3 conv (C) -> 4x4 stride-2 conv (C) -> 3x3 conv (2C) -> 4x4 stride-2 conv (2C), each
  followed by LeakyReLU(0.2), flattened to features phi(x) -> logit = w . phi(x) + b (+ embed(y) . phi(x) when
  conditional: the projection term). Every conv, linear and embedding of the discriminator is spectrally
  normalised (torch.nn.utils.parametrizations.spectral_norm); it has no BatchNorm.

A class-conditional generator stores the training set's class prior (`class_log_prior`, a buffer saved with its
weights, as models/image.py does), from which `sample` draws labels when given none.

The served artifact holds only the generator's weights: `build_generator(config)` rebuilds it from the
manifest's config, and `GAN.generator_state()` is what is saved.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from genserve.models.image import ImageShape

LEAKY_SLOPE = 0.2
MIN_SIDE = 4  # two stride-2 convolutions in the discriminator


@dataclass
class GANConfig(ImageShape):
    latent_dim: int = 64  # size of z ~ N(0, I)
    channels: int = 64  # base width C: the generator's maps are 2C, C, C; the discriminator's C, C, 2C, 2C
    minibatch_std_group: int = 4  # the discriminator's minibatch standard deviation over groups of this many
    # consecutive images (0: none)

    def __post_init__(self) -> None:
        if self.height < MIN_SIDE or self.width < MIN_SIDE:
            raise ValueError(f"a GAN needs images of at least {MIN_SIDE}x{MIN_SIDE}, got {self.height}x{self.width}")
        if self.levels < 2:
            raise ValueError(f"levels must be 2 or more, got {self.levels}")
        if self.n_classes < 0:
            raise ValueError(f"n_classes must be 0 (unconditional) or positive, got {self.n_classes}")
        if self.minibatch_std_group < 0:
            raise ValueError(f"minibatch_std_group must be 0 (none) or positive, got {self.minibatch_std_group}")
        for name in ("latent_dim", "channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> GANConfig:
        """From a manifest's config; an unknown field is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"GANConfig has no fields {unknown}; it has: {', '.join(sorted(known))}")
        return cls(**config)


def _config(config: GANConfig | dict[str, Any]) -> GANConfig:
    return config if isinstance(config, GANConfig) else GANConfig.from_dict(config)


def unit_images(x: Tensor, levels: int, noise: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """Grey levels (N, H, W) -> the discriminator's input (N, 1, H, W) in [0, 1]: x / (levels - 1), plus, when
    `noise` > 0, uniform noise of width `noise` level steps centred on the level, reflected at 0 and 1. For
    `noise` <= 1, round((levels - 1) * result) gives x back (up to ties at the bin edges)."""
    if not 0 <= noise <= 1:
        raise ValueError(f"noise must be within [0, 1] grey-level steps, got {noise}")
    v = x.float().unsqueeze(1) / (levels - 1)
    if noise:
        where = generator.device if generator is not None else v.device
        u = torch.rand(v.shape, generator=generator, device=where).to(v.device)
        v = v + (u - 0.5) * (noise / (levels - 1))
        v = 1 - (1 - v.abs()).abs()  # reflect at 0, then at 1
    return v


def to_levels(x: Tensor, levels: int) -> Tensor:
    """Continuous images in [0, 1], (N, 1, H, W) or (N, H, W) -> grey levels (N, H, W): round((levels - 1) x)."""
    if x.dim() == 4:
        x = x[:, 0]
    return torch.round(x.clamp(0, 1) * (levels - 1)).long()


def _check_labels(labels: Tensor | None, n: int, n_classes: int) -> None:
    if labels is None:
        if n_classes:
            raise ValueError("this model is class-conditional: give labels")
        return
    if not n_classes:
        raise ValueError("this model is not class-conditional: give no labels")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"labels must be within [0, {n_classes}), got {labels.tolist()}")


class ClassBatchNorm2d(nn.Module):
    """BatchNorm2d with a learnt gain and bias per class (conditional BatchNorm, n_classes > 0), or one shared
    pair (n_classes 0: plain BatchNorm2d)."""

    def __init__(self, channels: int, n_classes: int):
        super().__init__()
        self.n_classes = n_classes
        self.bn = nn.BatchNorm2d(channels, affine=not n_classes)
        if n_classes:
            self.gain = nn.Embedding(n_classes, channels)
            self.bias = nn.Embedding(n_classes, channels)
            nn.init.ones_(self.gain.weight)
            nn.init.zeros_(self.bias.weight)

    def forward(self, x: Tensor, labels: Tensor | None) -> Tensor:
        h = self.bn(x)
        if self.n_classes:
            h = h * self.gain(labels)[:, :, None, None] + self.bias(labels)[:, :, None, None]
        return h


class Generator(nn.Module):
    """z (N, latent_dim) [+ labels (N,)] -> images (N, 1, H, W) in [0, 1]; `sample` gives grey levels."""

    def __init__(self, config: GANConfig | dict[str, Any]):
        super().__init__()
        self.config = cfg = _config(config)
        self.height, self.width, self.levels, self.n_classes = cfg.height, cfg.width, cfg.levels, cfg.n_classes
        self.latent_dim = cfg.latent_dim
        c = cfg.channels
        self.h0, self.w0 = math.ceil(cfg.height / 4), math.ceil(cfg.width / 4)
        self.project = nn.Linear(cfg.latent_dim, 2 * c * self.h0 * self.w0, bias=False)
        self.norms = nn.ModuleList([ClassBatchNorm2d(2 * c, cfg.n_classes), ClassBatchNorm2d(c, cfg.n_classes),
                                    ClassBatchNorm2d(c, cfg.n_classes)])
        self.convs = nn.ModuleList([nn.Conv2d(2 * c, c, 3, padding=1, bias=False),
                                    nn.Conv2d(c, c, 3, padding=1, bias=False)])
        self.out = nn.Conv2d(c, 1, 3, padding=1)
        # Uniform until the trainer sets it from the training labels (saved with the weights).
        k = max(cfg.n_classes, 1)
        self.register_buffer("class_log_prior", torch.full((k,), -math.log(k)))

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        _check_labels(labels, z.shape[0], self.n_classes)
        h = F.relu(self.norms[0](self.project(z).view(z.shape[0], -1, self.h0, self.w0), labels))
        for conv, norm in zip(self.convs, self.norms[1:], strict=True):
            h = F.relu(norm(conv(F.interpolate(h, scale_factor=2, mode="nearest")), labels))
        return torch.sigmoid(self.out(h)[:, :, : self.height, : self.width])

    def set_class_prior(self, labels: Tensor) -> None:
        """The class prior p(y) from training labels, for sampling without labels."""
        _check_labels(labels, labels.shape[0], self.n_classes)
        counts = torch.bincount(labels, minlength=self.n_classes).to(self.class_log_prior)
        self.class_log_prior.copy_(torch.log(counts / counts.sum()))

    def noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """z ~ N(0, I), (n, latent_dim), drawn where the generator lives (a CPU generator can serve a CUDA
        model) and moved to the model's device."""
        device = self.class_log_prior.device
        where = generator.device if generator is not None else device
        return torch.randn(n, self.latent_dim, generator=generator, device=where).to(device)

    def draw_labels(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n labels from the stored class prior (conditional models only)."""
        if not self.n_classes:
            raise ValueError("this model is not class-conditional: it has no labels to draw")
        device = self.class_log_prior.device
        where = generator.device if generator is not None else device
        prior = self.class_log_prior.exp().to(where)
        return torch.multinomial(prior, n, replacement=True, generator=generator).to(device)

    @torch.no_grad()
    def sample(self, n: int, labels: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """n images as grey levels, LongTensor (n, H, W) in [0, levels): round((levels - 1) * G(z, y)).

        Always in eval mode (BatchNorm's running statistics: an image does not depend on the rest of its
        batch), restored afterwards. A conditional model given no labels draws them from its class prior first,
        with the same generator: sample(n, None, g) equals sample(n, draw_labels(n, g), g) for one seeded g."""
        if self.n_classes and labels is None:
            labels = self.draw_labels(n, generator)
        _check_labels(labels, n, self.n_classes)
        if labels is not None:
            labels = labels.to(self.class_log_prior.device)
        was_training = self.training
        self.eval()
        try:
            return to_levels(self(self.noise(n, generator), labels), self.levels)
        finally:
            self.train(was_training)


def minibatch_std(h: Tensor, group: int) -> Tensor:
    """(N, C, H, W) -> (N, C + 1, H, W): one more map, constant per image, the mean over features of their standard
    deviation across the image's group (`group` consecutive images of the batch; the last group may be smaller).
    Low when the images of a group are alike: it lets the discriminator see a generator that ignores z
    (ProGAN's minibatch standard deviation, Karras et al. 2018)."""
    n = h.shape[0]
    if n % group == 0:
        var = h.view(n // group, group, *h.shape[1:]).var(1, unbiased=False)
        stat = torch.sqrt(var + 1e-8).mean((1, 2, 3)).repeat_interleave(group)
    else:
        stat = torch.cat([torch.sqrt(g.var(0, unbiased=False) + 1e-8).mean().expand(len(g))
                          for g in h.split(group)])
    return torch.cat([h, stat[:, None, None, None].expand(-1, 1, *h.shape[2:])], dim=1)


class Discriminator(nn.Module):
    """Images (N, 1, H, W) or (N, H, W) in [0, 1] [+ labels] -> logits (N,) of "real"."""

    def __init__(self, config: GANConfig | dict[str, Any]):
        super().__init__()
        self.config = cfg = _config(config)
        self.n_classes = cfg.n_classes
        c = cfg.channels
        self.convs = nn.ModuleList([
            spectral_norm(nn.Conv2d(1, c, 3, padding=1)),
            spectral_norm(nn.Conv2d(c, c, 4, stride=2, padding=1)),
            spectral_norm(nn.Conv2d(c, 2 * c, 3, padding=1)),
            spectral_norm(nn.Conv2d(2 * c + (1 if cfg.minibatch_std_group else 0), 2 * c, 4, stride=2, padding=1)),
        ])
        self.group = cfg.minibatch_std_group
        self.n_features = 2 * c * (cfg.height // 4) * (cfg.width // 4)
        self.out = spectral_norm(nn.Linear(self.n_features, 1))
        self.embed = spectral_norm(nn.Embedding(cfg.n_classes, self.n_features)) if cfg.n_classes else None

    def features(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        h = x * 2 - 1  # centred on 0
        for i, conv in enumerate(self.convs):
            if self.group and i == len(self.convs) - 1:
                h = minibatch_std(h, self.group)
            h = F.leaky_relu(conv(h), LEAKY_SLOPE)
        return h.flatten(1)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        _check_labels(labels, x.shape[0], self.n_classes)
        phi = self.features(x)
        logit = self.out(phi)[:, 0]
        if self.embed is not None:
            logit = logit + (self.embed(labels) * phi).sum(1)
        return logit


class GAN(nn.Module):
    """The generator and the discriminator of one run, and their config. Only the generator is served."""

    def __init__(self, config: GANConfig | dict[str, Any]):
        super().__init__()
        self.config = _config(config)
        self.generator = Generator(self.config)
        self.discriminator = Discriminator(self.config)

    @property
    def n_classes(self) -> int:
        return self.config.n_classes

    @property
    def levels(self) -> int:
        return self.config.levels

    def set_class_prior(self, labels: Tensor) -> None:
        self.generator.set_class_prior(labels)

    def generator_state(self) -> dict[str, Tensor]:
        """What the served artifact's weights are: the generator's state (with its class prior)."""
        return self.generator.state_dict()

    def sample(self, n: int, labels: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Grey levels (n, H, W) from the generator: see `Generator.sample`."""
        return self.generator.sample(n, labels, generator)


def build_generator(config: GANConfig | dict[str, Any]) -> Generator:
    """The untrained generator for a config (a manifest's `config`), ready for the artifact's weights."""
    return Generator(config)

