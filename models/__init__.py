"""Pure torch modules and their math: densities, sampling steps, caches. No I/O, no HTTP."""

from genserve.models.gmm import GaussianMixture, GMMConfig

__all__ = ["GMMConfig", "GaussianMixture"]
