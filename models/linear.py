"""Dense layers at inference on the faster of the CPU's two matrix libraries.

PyTorch's CPU build multiplies with MKL (`F.linear`, `torch.mm`) and ships oneDNN next to it. On
some CPUs MKL runs far below the hardware: on the AMD EPYC machines genserve is benchmarked on,
MKL's fp32 GEMM reached 175 GFLOP/s on a 2048-square product where oneDNN reached 400, and for the
few rows of a decoding step (1 to 16) MKL read the weights at 5-15 GB/s where oneDNN read them at
16-29 GB/s (bench/hardware.py and the benchmark record, docs/benchmarks.md). oneDNN pays a fixed
cost of about 15 microseconds a call, and MKL is quick on narrow matrices, so small products stay
with MKL; the two thresholds below are the break-even points measured on that machine (1 to 256
rows; weights 128 to 3072 wide, 49k to 39M elements).

Only where no gradient is wanted (decoding, scoring, sampling: under `torch.inference_mode()` or
`torch.no_grad()`), on the CPU, in float32; everything else, training included, is `F.linear`.
The results are IEEE float32 either way; only the order of the sums differs (about 1e-6 relative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ONEDNN_MIN_MACS = 1 << 19  # rows x in x out from which oneDNN is faster when both sides are >= ONEDNN_MIN_WIDTH
ONEDNN_MIN_WIDTH = 256
ONEDNN_MIN_MACS_NARROW = 1 << 22  # and from which it is faster for narrower weights too


def _onednn_linear_available() -> bool:
    """Whether this build has oneDNN's linear and it computes what F.linear does (checked once, on a tiny product:
    a build or CPU where it is missing or wrong keeps everything on F.linear)."""
    try:
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
            return False
        with torch.inference_mode():
            x = torch.arange(6, dtype=torch.float32).view(2, 3)
            weight = torch.arange(12, dtype=torch.float32).view(4, 3) / 7
            bias = torch.ones(4)
            got = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
            return bool(torch.allclose(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


ONEDNN = _onednn_linear_available()


def uses_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear(x, weight)` runs on oneDNN here. Cheapest tests first: this runs for every layer
    of every decoding step, and a small model's step takes well under a millisecond."""
    if not ONEDNN or torch.compiler.is_compiling():  # export and compile trace F.linear: no branch on shapes
        return False
    macs = x.numel() * weight.shape[0]
    if macs < ONEDNN_MIN_MACS or (macs < ONEDNN_MIN_MACS_NARROW and min(weight.shape) < ONEDNN_MIN_WIDTH):
        return False
    return (x.device.type == "cpu" and x.dtype == torch.float32 == weight.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`: x (..., in), weight (out, in), bias (out,) or None -> (..., out)."""
    if uses_onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
