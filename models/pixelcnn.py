"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders").

Each pixel's conditional p(x_i | x_<i, y) in raster order comes from a stack of causal convolutions. A plain
stack of masked convolutions (`MaskedConv2d`) has a blind spot: pixels above and to the right of i that no
chain of masked kernels reaches. The gated model splits the work between two stacks that together see every
earlier pixel:

- the vertical stack sees the rows at and above the current one, every column within reach; shifted down by one
  row, it tells the horizontal stack about the rows strictly above;
- the horizontal stack sees the current row, left of the pixel (first layer) or up to it (later layers).

Every layer gates its output, tanh(f) * sigmoid(g), with the label's embedding added to f and g.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genserve.models.image import ImageModel, ImageShape, draw_pixel


class MaskedConv2d(nn.Conv2d):
    """A 'same'-padded convolution that sees only the pixels before the centre in raster order (mask 'A', for
    the first layer: the pixel's own value is what is being predicted) or up to and including it (mask 'B')."""

    def __init__(self, mask_type: str, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int]):
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        super().__init__(in_channels, out_channels, (kh, kw), padding=(kh // 2, kw // 2))
        mask = torch.ones(kh, kw)
        mask[kh // 2, kw // 2 + (mask_type == "B"):] = 0  # the centre row: from the centre (A) or after it (B)
        mask[kh // 2 + 1:] = 0  # every row below the centre
        self.register_buffer("mask", mask, persistent=False)  # derived from the type: not saved

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


@dataclass
class PixelCNNConfig(ImageShape):
    channels: int = 32  # feature maps per stack
    n_layers: int = 5
    kernel_size: int = 5  # odd: k x k reach for the vertical stack, 1 x k for the horizontal one
    head_channels: int = 64


def gate(x: Tensor) -> Tensor:
    f, g = x.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)


def shift_down(x: Tensor) -> Tensor:
    """Row r takes row r - 1's values (zeros in row 0): what row r may know of the vertical stack."""
    return F.pad(x, (0, 0, 1, 0))[:, :, : x.shape[2]]


class GatedLayer(nn.Module):
    def __init__(self, in_channels: int, channels: int, kernel_size: int, n_classes: int, first: bool):
        super().__init__()
        k = kernel_size
        # Rows r - k//2 .. r, columns c - k//2 .. c + k//2: padded at the top only, so never a row below.
        self.v_pad = (k // 2, k // 2, k // 2, 0)
        self.v_conv = nn.Conv2d(in_channels, 2 * channels, (k // 2 + 1, k))
        self.h_conv = MaskedConv2d("A" if first else "B", in_channels, 2 * channels, (1, k))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.label = nn.Embedding(n_classes, 4 * channels) if n_classes else None
        # The first layer's input at pixel i is x_i itself, so it must not be carried past the mask.
        self.residual = not first

    def vertical(self, v: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """The vertical stack's next input, and its pre-activation, which (shifted down a row, through
        v_to_h) feeds the horizontal stack."""
        v_pre = self.v_conv(F.pad(v, self.v_pad))
        v_label = v_pre if self.label is None else v_pre + self.label(labels)[:, : v_pre.shape[1], None, None]
        return gate(v_label), v_pre

    def horizontal(self, h: Tensor, from_v: Tensor, labels: Tensor | None) -> Tensor:
        """The horizontal stack's next input; `from_v` = v_to_h(the vertical pre-activation shifted down)."""
        h_pre = self.h_conv(h) + from_v
        if self.label is not None:
            h_pre = h_pre + self.label(labels)[:, h_pre.shape[1]:, None, None]
        h_new = self.h_out(gate(h_pre))
        return h + h_new if self.residual else h_new

    def forward(self, v: Tensor, h: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        v_next, v_pre = self.vertical(v, labels)
        return v_next, self.horizontal(h, self.v_to_h(shift_down(v_pre)), labels)


class GatedPixelCNN(ImageModel):
    def __init__(self, config: PixelCNNConfig):
        super().__init__(config.height, config.width, config.levels, config.n_classes)
        for name in ("channels", "n_layers", "head_channels"):
            if getattr(config, name) < 1:
                raise ValueError(f"{name} must be 1 or more, got {getattr(config, name)}")
        k = config.kernel_size
        if k < 3 or k % 2 == 0:
            raise ValueError(f"kernel_size must be odd and 3 or more, got {k}")
        self.config = config
        c = config.channels
        self.layers = nn.ModuleList(
            GatedLayer(1 if i == 0 else c, c, k, config.n_classes, first=i == 0) for i in range(config.n_layers)
        )
        head = config.head_channels
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c, head, 1), nn.ReLU(), nn.Conv2d(head, self.out_channels, 1))

    def _features(self, values: Tensor, labels: Tensor | None) -> Tensor:
        """(N, R, W) grey values in [0, 1] -> the horizontal stack's (N, channels, R, W); any R <= height, as
        row r depends only on rows <= r."""
        v = h = values[:, None]
        for layer in self.layers:
            v, h = layer(v, h, labels)
        return h

    def _logits_from_values(self, values: Tensor, labels: Tensor | None) -> Tensor:
        """pixel_logits on float values: the same network, differentiable in its input (for the tests)."""
        return self.head(self._features(values, labels)).flatten(2).transpose(1, 2)

    def pixel_logits(self, x: Tensor, labels: Tensor | None) -> Tensor:
        return self._logits_from_values(self.scaled(x), labels)

    def sample_pixels(self, x: Tensor, labels: Tensor | None, known: int, generator: torch.Generator | None) -> Tensor:
        # Row by row: what the vertical stacks tell row r depends only on rows < r, so they run once per row
        # (on the rows within their reach), and each pixel of the row reruns only the horizontal stacks (one row
        # wide) and the head (one pixel). Exactly the full pass's logits, at a small fraction of its cost.
        values = self.scaled(x)
        reach = self.config.n_layers * (self.config.kernel_size // 2)  # rows above that a vertical output sees
        for r in range(known // self.width, self.height):
            from_v = self._vertical_into_row(values, r, reach, labels)
            for c in range(max(known - r * self.width, 0), self.width):
                h = values[:, None, r : r + 1]
                for layer, v_term in zip(self.layers, from_v, strict=True):
                    h = layer.horizontal(h, v_term, labels)
                x[:, r, c] = draw_pixel(self.head(h[:, :, :, c : c + 1])[:, :, 0, 0], generator)
                values[:, r, c] = self.scaled(x[:, r, c])
        return x

    def _vertical_into_row(self, values: Tensor, r: int, reach: int, labels: Tensor | None) -> list[Tensor]:
        """Each layer's vertical contribution to row r's horizontal stack (N, 2C, 1, W), from rows < r."""
        if r == 0:  # nothing above: the shift pads row 0 with zeros
            return [layer.v_to_h(values.new_zeros(values.shape[0], layer.v_to_h.in_channels, 1, self.width))
                    for layer in self.layers]
        # Row r - 1 of layer l's output depends on rows >= r - 1 - l * (k // 2) only: crop the rest away.
        v = values[:, None, max(0, r - 1 - reach) : r]
        from_v = []
        for layer in self.layers:
            v, v_pre = layer.vertical(v, labels)
            from_v.append(layer.v_to_h(v_pre[:, :, -1:]))
        return from_v
