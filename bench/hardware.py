"""What this machine can do at best, as the roofline's two ceilings: matmul FLOP/s and memory bandwidth.

    .venv/bin/python -m bench.hardware [--quick]

Both are measured with torch itself, with its current number of threads, so they bound what any torch model
(ours or transformers') can reach here: decoding one token at batch 1 reads every weight once and does about two
FLOPs per weight, so it is bandwidth-bound, and bench/decoding.py reports its achieved bytes/s and FLOP/s as
percentages of these two numbers.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import median_seconds


def peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n by n x n fp32 torch.mm (2 n^3 FLOPs), median over repeats; the compute ceiling."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator)
    b = torch.randn(n, n, generator=generator)
    out = torch.empty(n, n)
    seconds = median_seconds(lambda: torch.mm(a, b, out=out), repeats=repeats, min_time=0.0)
    return 2.0 * n**3 / seconds


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
    print(f"peak fp32 matmul: {peak_flops(repeats=repeats) / 1e9:.1f} GFLOP/s")
    print(f"peak copy bandwidth: {peak_bandwidth(repeats=repeats) / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
