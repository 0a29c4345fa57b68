"""The convolutional VAE: shapes on both datasets' sizes, the closed-form KL against Monte Carlo, and the ordering
of its bounds (the ELBO below the importance-weighted bound, which grows with K toward log p(x))."""

from __future__ import annotations

import pytest
import torch

from genserve.models.vae import ConvVAE, VAEConfig, beta_elbo_loss, kl_weight


def vae(height: int = 8, width: int = 8, levels: int = 17, seed: int = 0) -> ConvVAE:
    torch.manual_seed(seed)
    return ConvVAE(VAEConfig(height=height, width=width, levels=levels, latent_dim=4, channels=8, hidden=32)).eval()


def images(n: int, height: int, width: int, levels: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(levels, (n, height, width), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(8, 8, 17), (28, 28, 2)])
def test_shapes_for_digits_and_mnist(shape) -> None:
    h, w, levels = shape
    model = vae(h, w, levels)
    x = images(3, h, w, levels)
    mu, log_var = model.encode(x)
    assert mu.shape == log_var.shape == (3, 4)
    assert model.decode(mu).shape == (3, h * w, 1 if levels == 2 else levels)
    g = torch.Generator().manual_seed(0)
    for out in (model.sample(5, g), model.reconstruct(x), model.interpolate(x[0], x[1], 6)):
        assert out.dtype == torch.long and out.shape[1:] == (h, w) and out.min() >= 0 and out.max() < levels
    a, b = (model.sample(5, torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(a, b)
    # The interpolation's ends are the two images' reconstructions.
    path = model.interpolate(x[0], x[1], 6)
    assert torch.equal(path[0], model.reconstruct(x[:1])[0]) and torch.equal(path[-1], model.reconstruct(x[1:2])[0])


def test_the_closed_form_kl_matches_monte_carlo() -> None:
    model = vae()
    x = images(2, 8, 8, 17)
    with torch.no_grad():
        _, _, kl = model.elbo(x)
        mu, log_var = model.encode(x)
        q = torch.distributions.Normal(mu, torch.exp(0.5 * log_var))
        z = q.sample((20000,))
        mc = (q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)).sum(-1).mean(0)
    torch.testing.assert_close(kl, mc, atol=0.05, rtol=0.02)


def fitted_vae() -> tuple[ConvVAE, torch.Tensor]:
    """A tiny VAE fitted for a moment to binarised 8x8 digits, so that its code carries information (an untrained
    decoder ignores z, and every bound is the same)."""
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images > 7).long()
    model = vae(levels=2).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch = x[torch.randint(len(x) - 100, (64,), generator=g)]
        loss, _, _ = beta_elbo_loss(model, batch, beta=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), x[-100:]


def test_the_importance_weighted_bound_rises_with_k_and_stays_reproducible() -> None:
    model, x = fitted_vae()
    bounds = {k: model.importance_bound(x, k, torch.Generator().manual_seed(0)).mean().item()
              for k in (1, 10, 100, 1000)}
    assert bounds[1] < bounds[10] < bounds[100] < bounds[1000] < 0
    with torch.no_grad():
        elbo = torch.stack([model.elbo(x, torch.Generator().manual_seed(s))[0] for s in range(100)]).mean()
    # K = 1 is the ELBO in expectation (a sampled KL instead of the closed form).
    k1 = torch.stack([model.importance_bound(x, 1, torch.Generator().manual_seed(s)) for s in range(100)]).mean()
    assert k1.item() == pytest.approx(elbo.item(), abs=0.3)
    a = model.importance_bound(x, 50, torch.Generator().manual_seed(3))
    b = model.importance_bound(x, 50, torch.Generator().manual_seed(3), chunk=7)  # chunking changes nothing
    torch.testing.assert_close(a, b)


def test_the_kl_warm_up_and_the_loss() -> None:
    assert [kl_weight(s, 10) for s in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0] and kl_weight(3, 0) == 1.0
    model = vae().train()
    loss, reconstruction, kl = beta_elbo_loss(model, images(4, 8, 8, 17), beta=0.5)
    loss.backward()
    assert kl > 0 and loss.item() == pytest.approx(-(reconstruction - 0.5 * kl).item(), rel=1e-5)
    assert all(p.grad is not None for p in model.parameters())


def test_the_config_refuses_what_it_cannot_build() -> None:
    with pytest.raises(ValueError, match="multiples of 4"):
        VAEConfig(height=6, width=6, levels=2)
    with pytest.raises(ValueError, match="unconditional"):
        VAEConfig(height=8, width=8, levels=2, n_classes=10)
