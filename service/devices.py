"""The device a model is loaded on, chosen at load time (CUDA when this process has a GPU, else the CPU: one
code path for both), and random generators on it."""

from __future__ import annotations

import torch


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    """A generator on `device` seeded with `seed`, or from fresh entropy when None (the same seed gives the same
    draws on the same device)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator

