"""Fully visible sigmoid belief network: each pixel's conditional a logistic (or softmax) regression on
the pixels before it in raster order. About D^2/2 weights per output channel; the simplest baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genserve.models.image import ImageModel, ImageShape, draw_pixel


@dataclass
class FVSBNConfig(ImageShape):
    pass


class FVSBN(ImageModel):
    def __init__(self, config: FVSBNConfig):
        super().__init__(config.height, config.width, config.levels, config.n_classes)
        self.config = config
        d, c = self.n_pixels, self.out_channels
        # weight[i, k, j]: pixel j's input to logit k of pixel i, used only for j < i.
        self.weight = nn.Parameter(torch.zeros(d, c, d))
        self.bias = nn.Parameter(torch.zeros(d, c))
        self.class_bias = nn.Embedding(config.n_classes, d * c) if config.n_classes else None
        if self.class_bias is not None:
            nn.init.zeros_(self.class_bias.weight)
        mask = torch.tril(torch.ones(d, d), diagonal=-1)[:, None, :].expand(d, c, d).contiguous()
        self.register_buffer("mask", mask, persistent=False)  # derived from the shape: not saved

    def _bias(self, labels: Tensor | None, n: int) -> Tensor:
        bias = self.bias.expand(n, -1, -1)
        if self.class_bias is not None:
            bias = bias + self.class_bias(labels).view(n, self.n_pixels, self.out_channels)
        return bias

    def pixel_logits(self, x: Tensor, labels: Tensor | None) -> Tensor:
        n, d, c = x.shape[0], self.n_pixels, self.out_channels
        weight = (self.weight * self.mask).view(d * c, d)
        return F.linear(self.scaled(x).flatten(1), weight).view(n, d, c) + self._bias(labels, n)

    def sample_pixels(self, x: Tensor, labels: Tensor | None, known: int, generator: torch.Generator | None) -> Tensor:
        # Pixel i needs only row i of the weights: one pass over the weights in all, not one per pixel.
        n = x.shape[0]
        flat = x.view(n, -1)
        bias = self._bias(labels, n)
        values = self.scaled(flat)
        for i in range(known, self.n_pixels):
            logits = bias[:, i] + values[:, :i] @ self.weight[i, :, :i].T
            flat[:, i] = draw_pixel(logits, generator)
            values[:, i] = self.scaled(flat[:, i])
        return x
