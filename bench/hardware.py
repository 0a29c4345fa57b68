"""What this machine can do at best, as the roofline's two ceilings: matmul FLOP/s and memory bandwidth.

    .venv/bin/python -m bench.hardware [--quick]

Both are measured with torch itself, with its current number of threads, so they bound what any torch model
(ours or transformers') can reach here; the FLOP/s are those of the faster of the two matrix libraries torch
ships. Decoding one token at batch 1 reads every weight once and does about two FLOPs per weight, so it is
bandwidth-bound, and bench/decoding.py reports its achieved bytes/s and FLOP/s as percentages of these two numbers.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import median_seconds
from genserve.models.linear import ONEDNN


def matmul_flops(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of an n x n by n x n fp32 product (2 n^3 FLOPs), median over repeats, by each matrix library torch
    ships: MKL (torch.mm) and, where the build has it, oneDNN (the library models/linear.py uses when it is
    faster). On some CPUs (the AMD EPYC here) MKL reaches well under half of what oneDNN does."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator)
    b = torch.randn(n, n, generator=generator)
    out = torch.empty(n, n)
    calls = {"MKL": lambda: torch.mm(a, b, out=out)}
    if ONEDNN:
        weight = b.t().contiguous()  # oneDNN's linear takes the (out, in) weight: a @ weight.T = a @ b
        calls["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, weight, None, "none", [], "")
    with torch.inference_mode():
        return {name: 2.0 * n**3 / median_seconds(fn, repeats=repeats, min_time=0.0) for name, fn in calls.items()}


def peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """The compute ceiling: the faster library's FLOP/s on the n x n product."""
    return max(matmul_flops(n, repeats).values())


def peak_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s of copying a `megabytes` fp32 tensor into another, counting the bytes read and the bytes written,
    median over repeats; far larger than any CPU cache, so this is main memory's bandwidth."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)  # written once before timing (median_seconds' warm-up), so its pages exist
    seconds = median_seconds(lambda: dst.copy_(src), repeats=repeats, min_time=0.0)
    return 2.0 * src.nbytes / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 5
    print(f"torch threads: {torch.get_num_threads()}")
    for library, flops in matmul_flops(repeats=repeats).items():
        print(f"fp32 2048x2048 matmul, {library}: {flops / 1e9:.1f} GFLOP/s")
    print(f"peak copy bandwidth: {peak_bandwidth(repeats=repeats) / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
