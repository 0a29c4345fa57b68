"""MADE: masked autoencoder for distribution estimation (Germain et al. 2015).

An MLP D -> hidden... -> D * out_channels whose weights are multiplied by 0/1 masks so that output i
sees only the pixels before i in some ordering: every unit k gets a degree m(k), input pixel d the
degree of its place in the ordering (1..D), a hidden unit sees the units of the layer below with
m(below) <= m(k), and output d sees the last hidden units with m(hidden) < m(d). A masked direct
input -> output connection (strictly earlier pixels only) adds a logistic-regression path.

Order-agnostic training: the model holds a small fixed set of `n_masks` orderings and connectivities.
Mask 0 is the raster (identity) order, so completion uses it and a raster-order prefix can be
conditioned on (new samples come from the whole ensemble); the others are random permutations drawn
from `mask_seed`. The trainer draws `mask` uniformly from range(n_masks) per minibatch and minimises
-score_with_mask(x, y, mask)[0].
At test time log p(x) is the ensemble over all masks (`score_given`), as in the paper.

The orderings and hidden degrees are persistent buffers: an artifact fixes its connectivity whatever
RNG implementation rebuilds it. The masks are derived from them, and cached (outside the state dict)
for as long as those buffers are unchanged: load_state_dict or .to() makes new ones. While exporting,
they are computed in the graph from the degrees, so the ONNX file holds no mask tensors.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genserve.models.image import ImageModel, ImageShape, draw_pixel, pixel_log_likelihood


@dataclass
class MADEConfig(ImageShape):
    hidden: tuple[int, ...] = (512, 512)
    n_masks: int = 8  # orderings/connectivities; mask 0 is the raster order
    mask_seed: int = 0


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied elementwise by a 0/1 mask given per call: (out, in), or
    (out / g, in) shared by each run of g consecutive outputs (one pixel's g logits)."""

    def masked_weight(self, mask: Tensor) -> Tensor:
        weight = self.weight.view(mask.shape[0], -1, self.in_features) * mask[:, None, :]
        return weight.view(self.out_features, self.in_features)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return F.linear(x, self.masked_weight(mask), self.bias)


def made_degrees(n_pixels: int, hidden: tuple[int, ...], n_masks: int, seed: int) -> tuple[Tensor, list[Tensor]]:
    """Input degrees (n_masks, D): pixel d is generated input_degrees[m, d]-th (1-based) in ordering m,
    mask 0 the raster order; and each hidden layer's degrees (n_masks, width).

    A hidden unit's degree lies in [min degree of the layer below, D - 1]; a layer at least as wide as
    the range holds every value in it at least once (the rest drawn uniformly), so every earlier pixel
    reaches every later output and the chain rule is exactly expressible."""
    g = torch.Generator().manual_seed(seed)
    d = n_pixels
    inputs = torch.empty(n_masks, d, dtype=torch.long)
    layers = [torch.empty(n_masks, width, dtype=torch.long) for width in hidden]
    for m in range(n_masks):
        order = torch.arange(d) if m == 0 else torch.randperm(d, generator=g)  # order[t]: the t-th pixel
        inputs[m, order] = torch.arange(1, d + 1)
        high = d - 1
        low = min(1, high)
        for layer in layers:
            width = layer.shape[1]
            values = torch.arange(low, high + 1)
            if width >= len(values):
                extra = torch.randint(low, high + 1, (width - len(values),), generator=g)
                degrees = torch.cat([values, extra])[torch.randperm(width, generator=g)]
            else:
                degrees = torch.randint(low, high + 1, (width,), generator=g)
            layer[m] = degrees
            low = int(degrees.min())
    return inputs, layers


class MADE(ImageModel):
    def __init__(self, config: MADEConfig):
        super().__init__(config.height, config.width, config.levels, config.n_classes)
        hidden = tuple(config.hidden)
        if not hidden or min(hidden) < 1:
            raise ValueError(f"MADE needs one or more hidden layers of positive width, got {hidden}")
        if config.n_masks < 1:
            raise ValueError(f"n_masks must be 1 or more, got {config.n_masks}")
        self.config = config
        d, c = self.n_pixels, self.out_channels
        sizes = (d, *hidden)
        self.hidden_layers = nn.ModuleList(MaskedLinear(a, b) for a, b in itertools.pairwise(sizes))
        self.output = MaskedLinear(hidden[-1], d * c)
        self.direct = MaskedLinear(d, d * c, bias=False)
        # The label precedes every pixel: its embedding adds to every hidden pre-activation and the output.
        self.class_embedding = nn.Embedding(config.n_classes, sum(hidden) + d * c) if config.n_classes else None
        if self.class_embedding is not None:
            nn.init.zeros_(self.class_embedding.weight)
        inputs, layers = made_degrees(d, hidden, config.n_masks, config.mask_seed)
        self.register_buffer("input_degrees", inputs)
        for i, degrees in enumerate(layers):
            self.register_buffer(f"hidden_degrees_{i}", degrees)
        self._mask_cache: dict[int, tuple[list[Tensor], tuple, list[Tensor]]] = {}

    @property
    def n_masks(self) -> int:
        return self.input_degrees.shape[0]

    def ordering(self, mask: int) -> Tensor:
        """The pixels (raster indices) in the order mask `mask` generates them."""
        return torch.argsort(self.input_degrees[mask])

    def degrees(self, mask: int) -> list[Tensor]:
        """The input degrees and each hidden layer's, for one mask."""
        return [self.input_degrees[mask], *(getattr(self, f"hidden_degrees_{i}")[mask]
                                            for i in range(len(self.hidden_layers)))]

    def masks(self, mask: int) -> list[Tensor]:
        """0/1 masks of mask `mask`: each hidden layer's (out, in), then the output layer's and the direct
        connection's per pixel, (D, in), shared by the pixel's out_channels logits. Cached."""
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return self._build_masks(mask)
        buffers = [self.input_degrees, *(getattr(self, f"hidden_degrees_{i}") for i in range(len(self.hidden_layers)))]
        # The buffers themselves (held, so never freed and their memory reused) and their in-place versions.
        key = (self.output.weight.dtype, [b._version for b in buffers])
        cached = self._mask_cache.get(mask)
        if cached is None or cached[1] != key or any(a is not b for a, b in zip(cached[0], buffers, strict=True)):
            cached = self._mask_cache[mask] = (buffers, key, self._build_masks(mask))
        return cached[2]

    def _build_masks(self, mask: int) -> list[Tensor]:
        degrees = self.degrees(mask)
        dtype = self.output.weight.dtype
        out = [(above[:, None] >= below[None, :]).to(dtype) for below, above in itertools.pairwise(degrees)]
        out.append((degrees[0][:, None] > degrees[-1][None, :]).to(dtype))  # output: strictly later pixels
        out.append((degrees[0][:, None] > degrees[0][None, :]).to(dtype))  # direct: strictly earlier pixels
        return out

    def _logits_from_values(self, values: Tensor, labels: Tensor | None, mask: int = 0) -> Tensor:
        """(N, D) float inputs -> (N, D, out_channels) logits under mask `mask`."""
        n = values.shape[0]
        masks = self.masks(mask)
        embedding = self.class_embedding(labels) if self.class_embedding is not None else None
        h, offset = values, 0
        for layer, m in zip(self.hidden_layers, masks, strict=False):
            a = layer(h, m)
            if embedding is not None:
                a = a + embedding[:, offset: offset + layer.out_features]
                offset += layer.out_features
            h = torch.relu(a)
        out = self.output(h, masks[-2]) + self.direct(values, masks[-1])
        if embedding is not None:
            out = out + embedding[:, offset:]
        return out.view(n, self.n_pixels, self.out_channels)

    def pixel_logits(self, x: Tensor, labels: Tensor | None, mask: int = 0) -> Tensor:
        return self._logits_from_values(self.scaled(x).flatten(1), labels, mask)

    def score_with_mask(self, x: Tensor, labels: Tensor | None, mask: int) -> tuple[Tensor, Tensor]:
        """log p_m(x | y) (N,) and its conditionals (N, D) under one ordering/connectivity: the training
        loss, with `mask` drawn uniformly from range(n_masks) per minibatch by the trainer."""
        cond = pixel_log_likelihood(self.pixel_logits(x, labels, mask), x.flatten(1))
        return cond.sum(1), cond

    def score_given(self, x: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """The test-time ensemble: log p(x | y) = log mean_m p_m(x | y) over all masks, a normalised
        density (a mixture of the masks' models), and the per-pixel conditionals averaged over the masks,
        each pixel's log p_m(x_i | x_<i in ordering m, y) in raster position.

        The conditionals are not the mixture's own: they sum to the mean over masks of log p_m(x | y),
        which by Jensen is a lower bound on the returned log p(x | y)."""
        scores = [self.score_with_mask(x, labels, m) for m in range(self.n_masks)]
        log_prob = torch.logsumexp(torch.stack([lp for lp, _ in scores]), dim=0) - math.log(self.n_masks)
        cond = torch.stack([c for _, c in scores]).mean(0)
        return log_prob, cond

    def sample_pixels(self, x: Tensor, labels: Tensor | None, known: int, generator: torch.Generator | None) -> Tensor:
        """New images come from the ensemble that `score` reports, exactly: each image picks one of the masks
        uniformly and is generated in that mask's ordering. Completions of a raster-order prefix use mask 0
        (the raster order), the one member that can condition on it: they come from p_0(rest | prefix)."""
        if known > 0 or self.n_masks == 1:
            return self._sample_in_order(x, labels, 0, known, generator)
        where = generator.device if generator is not None else x.device
        u = torch.rand(x.shape[0], generator=generator, device=where).to(x.device)
        chosen = (u * self.n_masks).long().clamp(max=self.n_masks - 1)
        for mask in range(self.n_masks):
            rows = torch.nonzero(chosen == mask).squeeze(1)
            if len(rows):
                x[rows] = self._sample_in_order(x[rows], None if labels is None else labels[rows], mask, 0, generator)
        return x

    def _sample_in_order(self, x: Tensor, labels: Tensor | None, mask: int, start: int,
                         generator: torch.Generator | None) -> Tensor:
        """Pixels from the start-th on in mask `mask`'s ordering: one pass of the hidden layers per pixel, the
        masked weights formed once and only the pixel's own output rows computed."""
        n, c = x.shape[0], self.out_channels
        flat = x.view(n, -1)
        values = self.scaled(flat)
        masks = self.masks(mask)
        hidden = [(layer.masked_weight(m), layer.bias) for layer, m in zip(self.hidden_layers, masks, strict=False)]
        w_out, w_direct = self.output.masked_weight(masks[-2]), self.direct.masked_weight(masks[-1])
        embedding = self.class_embedding(labels) if self.class_embedding is not None else None
        hidden_total = sum(layer.out_features for layer in self.hidden_layers)
        for i in self.ordering(mask)[start:].tolist():
            h, offset = values, 0
            for w, b in hidden:
                a = F.linear(h, w, b)
                if embedding is not None:
                    a = a + embedding[:, offset: offset + w.shape[0]]
                    offset += w.shape[0]
                h = torch.relu(a)
            rows = slice(i * c, (i + 1) * c)
            logits = F.linear(h, w_out[rows], self.output.bias[rows]) + F.linear(values, w_direct[rows])
            if embedding is not None:
                logits = logits + embedding[:, hidden_total + i * c: hidden_total + (i + 1) * c]
            flat[:, i] = draw_pixel(logits, generator)
            values[:, i] = self.scaled(flat[:, i])
        return x
