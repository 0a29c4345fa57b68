"""RealNVP and MADE-MoG for records: invertibility, the log-determinant against a brute-force Jacobian, the
autoregressive property from gradients, and densities that integrate to one."""

from __future__ import annotations

import math

import pytest
import torch

from genserve.models.flow import RealNVP, RealNVPConfig
from genserve.models.made_mog import MADEMoG, MADEMoGConfig


def perturbed(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Random weights everywhere (RealNVP's couplings start as the identity), and a non-trivial standardisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
        d = model.feature_mean.numel()
        model.set_standardisation(torch.randn(d, generator=g, dtype=torch.float64),
                                  0.5 + torch.rand(d, generator=g, dtype=torch.float64))
    return model.eval()


def flow(d: int = 3) -> RealNVP:
    torch.manual_seed(0)  # the layers' initialisation
    return perturbed(RealNVP(RealNVPConfig(n_features=d, n_layers=4, hidden=16)))


def made_mog(d: int = 3) -> MADEMoG:
    torch.manual_seed(0)
    return perturbed(MADEMoG(MADEMoGConfig(n_features=d, hidden=(24, 24), n_components=3)), scale=0.1)


def test_realnvp_inverse_reproduces_the_input() -> None:
    model = flow(5)
    x = torch.randn(64, 5, dtype=torch.float64) * 3
    z, _ = model.to_latent(x)
    torch.testing.assert_close(model.from_latent(z), x, atol=1e-10, rtol=1e-10)
    assert not torch.allclose(z, (x - model.feature_mean) / model.feature_scale)  # the couplings do something


def test_realnvp_log_determinant_equals_the_brute_force_jacobian() -> None:
    model = flow(4)
    for x in torch.randn(5, 4, dtype=torch.float64):
        jacobian = torch.autograd.functional.jacobian(lambda v: model.to_latent(v[None])[0][0], x)
        _, log_det = model.to_latent(x[None])
        assert float(log_det.detach()) == pytest.approx(float(torch.linalg.slogdet(jacobian).logabsdet), abs=1e-9)


def grid_integral(model: torch.nn.Module, half_width: float = 30.0, n: int = 1501) -> float:
    """The density over a 2-D grid around the data, summed (the midpoint rule)."""
    axis = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    xs, ys = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten()], -1) * model.feature_scale + model.feature_mean
    cell = (axis[1] - axis[0]) ** 2 * model.feature_scale.prod()
    with torch.no_grad():
        return float(torch.exp(model.log_prob(points)).sum() * cell)


@pytest.mark.parametrize("build", [flow, made_mog], ids=["realnvp", "made-mog"])
def test_densities_integrate_to_one(build) -> None:
    assert grid_integral(build(2)) == pytest.approx(1.0, abs=2e-3)


def test_made_mog_conditionals_see_only_earlier_features() -> None:
    model = made_mog(5)
    z = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    log_weights, means, log_scales = model.conditionals(z)
    for d in range(5):
        output = log_weights[0, d].sum() + means[0, d].sum() + log_scales[0, d].sum()
        (grad,) = torch.autograd.grad(output, z, retain_graph=True)
        assert torch.all(grad[0, d:] == 0), d  # nothing from feature d or later
        if d:
            assert torch.all(grad[0, :d] != 0), d  # every earlier feature reaches it


@pytest.mark.parametrize("build", [flow, made_mog], ids=["realnvp", "made-mog"])
def test_sampling_is_reproducible_and_follows_the_density(build) -> None:
    model = build(2)
    a = model.sample(4000, torch.Generator().manual_seed(1))
    b = model.sample(4000, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (4000, 2) and a.dtype == torch.float64
    # Samples are where the density is: their mean log-density is close to the negative entropy estimated on
    # the grid, and well above that of points drawn uniformly over the same box.
    with torch.no_grad():
        sampled = float(model.log_prob(a).mean())
        box = (torch.rand(4000, 2, dtype=torch.float64) * 2 - 1) * 4 * model.feature_scale + model.feature_mean
        uniform = float(model.log_prob(box).mean())
    assert sampled > uniform + 1.0
    assert math.isfinite(sampled)


def test_configs_refuse_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        RealNVPConfig(n_features=1)
    with pytest.raises(ValueError, match="use a GMM"):
        MADEMoGConfig(n_features=1)
