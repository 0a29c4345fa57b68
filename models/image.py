"""What every autoregressive image model shares: the pixel likelihoods, label marginalisation, sampling.

An image is an integer tensor (N, H, W) of grey levels in [0, levels). A model factorises
p(x | y) = prod_i p(x_i | x_<i, y) over the pixels in some ordering, each conditional a Bernoulli
(levels == 2, one logit) or a softmax over the levels (levels > 2, one logit per level).

A class-conditional model (n_classes > 0) also stores the training set's class prior, so
log p(x) = logsumexp_y [log p(y) + log p(x | y)] is exact when no label is given.

Subclasses implement `pixel_logits` (all conditionals in one parallel pass: teacher forcing);
sampling is sequential, one pixel at a time in raster order, and subclasses that can reuse work
between steps override `sample_pixels`.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ImageShape:
    """The images a model is for; every image model's config extends it."""

    height: int
    width: int
    levels: int  # grey levels: 2 for binarised images
    n_classes: int = 0  # > 0: class-conditional


class ImageModel(nn.Module):
    """Base class: subclasses call super().__init__(height, width, levels, n_classes) and implement
    `pixel_logits`."""

    def __init__(self, height: int, width: int, levels: int, n_classes: int = 0):
        super().__init__()
        if height < 1 or width < 1:
            raise ValueError(f"image shape must be positive, got {height}x{width}")
        if levels < 2:
            raise ValueError(f"levels must be 2 or more, got {levels}")
        self.height, self.width, self.levels, self.n_classes = height, width, levels, n_classes
        # Uniform until the trainer sets it from the training labels.
        self.register_buffer("class_log_prior", torch.full((max(n_classes, 1),), -math.log(max(n_classes, 1))))

    @property
    def n_pixels(self) -> int:
        return self.height * self.width

    @property
    def out_channels(self) -> int:
        """Logits per pixel: one (Bernoulli) for binary images, one per level otherwise."""
        return 1 if self.levels == 2 else self.levels

    def set_class_prior(self, labels: Tensor) -> None:
        """The class prior p(y) from training labels (each class seen at least once, or its log p(y) is -inf)."""
        self._check_labels(labels, labels.shape[0], allow_none=False)
        counts = torch.bincount(labels, minlength=self.n_classes).to(self.class_log_prior)
        self.class_log_prior.copy_(torch.log(counts / counts.sum()))

    def scaled(self, x: Tensor) -> Tensor:
        """Grey levels as floats in [0, 1], the networks' input."""
        return x.to(self.class_log_prior.dtype) / (self.levels - 1)

    # ---- what subclasses implement ----------------------------------------------------------------

    def pixel_logits(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """(N, H, W) levels -> (N, H*W, out_channels): the logits of p(x_i | x_<i, y) for every pixel
        i in raster order, each depending only on the pixels before i in the model's ordering."""
        raise NotImplementedError

    # ---- likelihoods -----------------------------------------------------------------------------

    def conditional_log_probs(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """(N, H*W): log p(x_i | x_<i, y), raster order; labels required when conditional."""
        return pixel_log_likelihood(self.pixel_logits(x, labels), x.flatten(1))

    def score_given(self, x: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """log p(x | y) (N,) and the per-pixel conditionals (N, H*W), labels as given (None only for
        an unconditional model). This is what the ONNX graph computes. MADE overrides it to
        average over its orderings."""
        cond = self.conditional_log_probs(x, labels)
        return cond.sum(1), cond

    def score(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """log p(x [| y]) in nats (N,) and each pixel's log p(x_i | x_<i [, y]) (N, H, W).

        A conditional model given no labels answers for the marginal p(x) = sum_y p(y) p(x | y),
        exactly (see `marginalise_labels`)."""
        self._check_images(x)
        self._check_labels(labels, x.shape[0], allow_none=True)
        if self.n_classes and labels is None:
            per_class = [self.score_given(x, self._full_labels(x, y)) for y in range(self.n_classes)]
            log_prob, cond = marginalise_labels(torch.stack([lp for lp, _ in per_class]),
                                                torch.stack([c for _, c in per_class]), self.class_log_prior)
        else:
            log_prob, cond = self.score_given(x, labels)
        return log_prob, cond.view(-1, self.height, self.width)

    def class_log_probs(self, x: Tensor) -> Tensor:
        """(N, n_classes): log p(x | y) of every image under every class, one pass per class (conditional
        models only): the class-conditional evidence anomaly scores are made of it."""
        if not self.n_classes:
            raise ValueError("this model is not class-conditional: it has no classes to compare")
        self._check_images(x)
        return torch.stack([self.score_given(x, self._full_labels(x, y))[0] for y in range(self.n_classes)], dim=1)

    def log_prob(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.score(x, labels)[0]

    def pixel_log_probs(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.score(x, labels)[1]

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.log_prob(x, labels)

    # ---- sampling --------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        n: int | None = None,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
        prefix: Tensor | None = None,
        known: int = 0,
    ) -> tuple[Tensor, Tensor | None]:
        """Draw images, all of them in one batch, pixel by pixel in raster order.

        `prefix` (N, H, W) with `known` > 0 completes images: its first `known` pixels in raster
        order are kept and the rest sampled given them. A conditional model given no labels draws them:
        from the class prior for new images, from the posterior p(y | known pixels) for completions, so
        both come from the marginal p(x). Returns the images and the labels (None if unconditional)."""
        device = self.class_log_prior.device
        if prefix is not None:
            self._check_images(prefix)
            x = prefix.to(device=device, dtype=torch.long).clone()
            n = x.shape[0]
        else:
            if n is None:
                raise ValueError("give n or a prefix")
            x = torch.zeros(n, self.height, self.width, dtype=torch.long, device=device)
            known = 0
        if not 0 <= known <= self.n_pixels:
            raise ValueError(f"known must be within [0, {self.n_pixels}], got {known}")
        self._check_labels(labels, n, allow_none=True)
        x.view(n, -1)[:, known:] = 0  # never let unknown pixels leak in, whatever the model
        if self.n_classes and labels is None:
            labels = self._draw_labels(x, known, generator)
        if labels is not None:
            labels = labels.to(device)
        return self.sample_pixels(x, labels, known, generator), labels

    def _draw_labels(self, x: Tensor, known: int, generator: torch.Generator | None) -> Tensor:
        """One label per image from p(y | x_<known) ∝ p(y) p(x_<known | y) (the prior when known is 0)."""
        log_posterior = self.class_log_prior[:, None].expand(-1, x.shape[0])
        if known:
            # Raster-order conditionals (for MADE: its raster ordering, the one that completes), so the
            # prefix's likelihood never looks past the known pixels.
            prefix = torch.stack([self.conditional_log_probs(x, self._full_labels(x, y))[:, :known].sum(1)
                                  for y in range(self.n_classes)])  # (Y, N): log p(x_<known | y)
            log_posterior = log_posterior + prefix
        posterior = torch.softmax(log_posterior, dim=0)
        u = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=posterior.dtype)
        return (u[None, :] > posterior.cumsum(0)).sum(0).clamp(max=self.n_classes - 1)

    def sample_pixels(self, x: Tensor, labels: Tensor | None, known: int, generator: torch.Generator | None) -> Tensor:
        """Fill x's pixels from `known` on, in raster order. The default recomputes all logits
        once per pixel; subclasses with cheaper incremental steps override it."""
        flat = x.view(x.shape[0], -1)
        for i in range(known, self.n_pixels):
            logits = self.pixel_logits(x, labels)[:, i]
            flat[:, i] = draw_pixel(logits, generator)
        return x

    # ---- helpers ---------------------------------------------------------------------------------

    def _full_labels(self, x: Tensor, y: int) -> Tensor:
        return torch.full((x.shape[0],), y, dtype=torch.long, device=x.device)

    def _check_images(self, x: Tensor) -> None:
        if x.dim() != 3 or tuple(x.shape[1:]) != (self.height, self.width):
            raise ValueError(f"images must have shape (N, {self.height}, {self.width}), got {tuple(x.shape)}")
        if x.dtype.is_floating_point or x.dtype == torch.bool or x.is_complex():
            raise ValueError(f"images must be integer grey levels, got dtype {x.dtype}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.levels):
            raise ValueError(f"grey levels must be within [0, {self.levels}), got [{int(x.min())}, {int(x.max())}]")

    def _check_labels(self, labels: Tensor | None, n: int, allow_none: bool) -> None:
        if labels is None:
            if not (allow_none or not self.n_classes):
                raise ValueError("this model is class-conditional: give labels")
            return
        if not self.n_classes:
            raise ValueError("this model is not class-conditional: give no labels")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.n_classes):
            raise ValueError(f"labels must be within [0, {self.n_classes}), got {labels.tolist()}")


def marginalise_labels(log_probs: Tensor, conditionals: Tensor, class_log_prior: Tensor) -> tuple[Tensor, Tensor]:
    """From each class's log p(x | y) (Y, N) and conditionals log p(x_i | x_<i, y) (Y, N, D), the
    marginal log p(x) (N,) and marginal conditionals (N, D): log p(x_<=i) - log p(x_<i) with
    p(x_<=i) = sum_y p(y) p(x_<=i | y), which sum to log p(x) exactly (for MADE's averaged
    conditionals, to the marginal of the average)."""
    log_prob = torch.logsumexp(log_probs + class_log_prior[:, None], dim=0)
    prefix = torch.logsumexp(conditionals.cumsum(-1) + class_log_prior[:, None, None], dim=0)
    cond = torch.diff(prefix, dim=-1, prepend=torch.zeros_like(prefix[:, :1]))
    return log_prob, cond


def pixel_log_likelihood(logits: Tensor, x: Tensor) -> Tensor:
    """(N, D, C) logits and (N, D) levels -> (N, D) log-probabilities: Bernoulli when C == 1
    (logit of level 1), softmax over the levels otherwise."""
    if logits.shape[-1] == 1:
        logit = logits[..., 0]
        # log sigmoid(l) for x = 1, log sigmoid(-l) for x = 0, stably.
        return -F.softplus(torch.where(x == 1, -logit, logit))
    return torch.log_softmax(logits, dim=-1).gather(-1, x.unsqueeze(-1)).squeeze(-1)


_job = threading.local()  # .cancel: the threading.Event of the sampling job running on this thread, if any


class SamplingCancelled(Exception):
    """A sampling job was cancelled (its caller went away); raised at the next pixel drawn."""


@contextlib.contextmanager
def cancellable(cancel: threading.Event) -> Iterator[None]:
    """Sampling on this thread (every family draws through `draw_pixel`) stops with SamplingCancelled at its
    next pixel once `cancel` is set: a server frees the worker of a client that disconnected."""
    _job.cancel = cancel
    try:
        yield
    finally:
        _job.cancel = None


def draw_pixel(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """One level per row from (N, C) logits, by inverse CDF on one uniform draw per row: a seeded generator
    gives the same images for the same request."""
    cancel = getattr(_job, "cancel", None)
    if cancel is not None and cancel.is_set():
        raise SamplingCancelled("the sampling job was cancelled")
    # Drawn where the generator lives (a CPU generator can serve a CUDA model), then moved.
    where = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape[0], generator=generator, device=where, dtype=logits.dtype).to(logits.device)
    if logits.shape[-1] == 1:
        return (u < torch.sigmoid(logits[:, 0])).long()
    cdf = torch.softmax(logits, dim=-1).cumsum(-1)
    return (u[:, None] > cdf).sum(-1).clamp(max=logits.shape[-1] - 1)
