"""GaussianMixture against brute-force torch.distributions, and the EM steps against their definitions."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from genserve.models.gmm import GaussianMixture, GMMConfig, e_step, elbo, m_step

K, D = 3, 4
FEATURE_MEAN = torch.tensor([10.0, -3.0, 0.5, 250.0], dtype=torch.float64)
FEATURE_SCALE = torch.tensor([2.0, 0.25, 7.0, 40.0], dtype=torch.float64)


def random_spd(gen: torch.Generator, k: int, d: int) -> torch.Tensor:
    a = torch.randn(k, d, d, generator=gen, dtype=torch.float64)
    return a @ a.transpose(-1, -2) / d + 0.3 * torch.eye(d, dtype=torch.float64)


def make_model(covariance_type: str, seed: int = 0) -> tuple[GaussianMixture, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A mixture with non-trivial parameters and standardisation; returns (model, weights, means, covs)."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    means = 2.0 * torch.randn(K, D, generator=gen, dtype=torch.float64)
    if covariance_type == "full":
        covs = random_spd(gen, K, D)
    else:
        covs = 0.2 + torch.rand(K, D, generator=gen, dtype=torch.float64) * 2.0
    model = GaussianMixture(GMMConfig(D, K, covariance_type))
    model.set_parameters(weights, means, covs)
    model.set_standardisation(FEATURE_MEAN, FEATURE_SCALE)
    return model, weights, means, covs


def raw_components(weights, means, covs, covariance_type):
    """The mixture's components in raw space: x = mean + scale * z."""
    raw_means = FEATURE_MEAN + FEATURE_SCALE * means
    if covariance_type == "full":
        s = torch.diag(FEATURE_SCALE)
        raw_covs = s @ covs @ s
    else:
        raw_covs = torch.diag_embed(covs * FEATURE_SCALE**2)
    return raw_means, raw_covs


def brute_force_joint(x, weights, means, covs, covariance_type) -> torch.Tensor:
    """log pi_k + log N(x | raw component k), (N, K), straight from torch.distributions in raw space."""
    raw_means = FEATURE_MEAN + FEATURE_SCALE * means
    cols = []
    for k in range(K):
        if covariance_type == "full":
            s = torch.diag(FEATURE_SCALE)
            dist = MultivariateNormal(raw_means[k], covariance_matrix=s @ covs[k] @ s)
            lp = dist.log_prob(x)
        else:
            lp = Normal(raw_means[k], covs[k].sqrt() * FEATURE_SCALE).log_prob(x).sum(-1)
        cols.append(torch.log(weights[k]) + lp)
    return torch.stack(cols, dim=-1)


def records(n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    z = 2.5 * torch.randn(n, D, generator=gen, dtype=torch.float64)
    return FEATURE_MEAN + FEATURE_SCALE * z


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_log_prob_matches_brute_force(covariance_type):
    model, weights, means, covs = make_model(covariance_type)
    x = records(200)
    want = torch.logsumexp(brute_force_joint(x, weights, means, covs, covariance_type), dim=-1)
    got = model.log_prob(x)
    assert got.shape == (200,)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_standardisation_jacobian(covariance_type):
    """log p(x) = log p_z(z) - sum log scale: the raw density integrates to one, not the standardised one."""
    model, *_ = make_model(covariance_type)
    x = records(50)
    z = model.standardise(x)
    log_pz = torch.logsumexp(model.component_log_prob(z), dim=-1)
    torch.testing.assert_close(model.log_prob(x), log_pz - torch.log(FEATURE_SCALE).sum(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_covariances_round_trip(covariance_type):
    model, _, _, covs = make_model(covariance_type)
    torch.testing.assert_close(model.covariances(), covs, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_responsibilities_are_the_posterior(covariance_type):
    model, weights, means, covs = make_model(covariance_type)
    x = records(200, seed=2)
    _, resp = model(x)
    torch.testing.assert_close(resp.sum(-1), torch.ones(200, dtype=torch.float64), atol=1e-12, rtol=0)
    joint = brute_force_joint(x, weights, means, covs, covariance_type)
    want = torch.softmax(joint, dim=-1)
    torch.testing.assert_close(resp, want, atol=1e-9, rtol=0)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_sample_is_seeded(covariance_type):
    model, *_ = make_model(covariance_type)
    a = model.sample(500, generator=torch.Generator().manual_seed(7))
    b = model.sample(500, generator=torch.Generator().manual_seed(7))
    c = model.sample(500, generator=torch.Generator().manual_seed(8))
    assert a.shape == (500, D)
    assert a.dtype == torch.float64
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_sample_moments_match_the_mixture(covariance_type):
    model, weights, means, covs = make_model(covariance_type)
    raw_means, raw_covs = raw_components(weights, means, covs, covariance_type)
    mix_mean = (weights[:, None] * raw_means).sum(0)
    second = (weights[:, None, None] * (raw_covs + raw_means[:, :, None] * raw_means[:, None, :])).sum(0)
    mix_cov = second - torch.outer(mix_mean, mix_mean)

    n = 20_000
    x = model.sample(n, generator=torch.Generator().manual_seed(123))
    emp_mean = x.mean(0)
    emp_cov = torch.cov(x.T, correction=0)

    sd = mix_cov.diagonal().sqrt()
    # Standard error of a mean is sd / sqrt(n) (~0.007 sd here): allow 5 of them.
    assert torch.all((emp_mean - mix_mean).abs() <= 5 * sd / math.sqrt(n))
    # Compare covariances as correlations-scaled errors: |delta cov_ij| / (sd_i sd_j) below 0.05.
    scaled = (emp_cov - mix_cov) / torch.outer(sd, sd)
    assert scaled.abs().max() < 0.05


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_elbo_with_posterior_equals_log_likelihood(covariance_type):
    model, *_ = make_model(covariance_type)
    z = model.standardise(records(300, seed=3))
    step = e_step(model, z)
    log_lik = step.log_prob.sum()
    bound = elbo(step.joint, step.log_resp)
    assert abs((log_lik - bound).item()) / z.shape[0] < 1e-9
    torch.testing.assert_close(step.log_resp.exp().sum(-1), torch.ones(300, dtype=torch.float64))


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_elbo_with_any_other_q_is_smaller(covariance_type):
    model, *_ = make_model(covariance_type)
    z = model.standardise(records(300, seed=4))
    step = e_step(model, z)
    log_lik = step.log_prob.sum().item()

    uniform = torch.full_like(step.log_resp, -math.log(K))
    gen = torch.Generator().manual_seed(5)
    random_q = torch.log_softmax(torch.randn(step.log_resp.shape, generator=gen, dtype=torch.float64), dim=-1)
    # A small perturbation of the posterior: still strictly below (the gap is the KL divergence).
    nudged = torch.log_softmax(step.log_resp + 1e-2 * torch.randn(step.log_resp.shape, generator=gen,
                                                                    dtype=torch.float64), dim=-1)
    for log_q in (uniform, random_q, nudged):
        bound = elbo(step.joint, log_q).item()
        assert bound < log_lik
        # and the gap is exactly sum_i KL(q_i || posterior_i)
        q = log_q.exp()
        kl = (q * (log_q - step.log_resp)).sum().item()
        assert log_lik - bound == pytest.approx(kl, rel=1e-8, abs=1e-9)


def test_elbo_handles_zero_responsibilities():
    joint = torch.tensor([[-1.0, -2.0], [-3.0, -0.5]], dtype=torch.float64)
    log_q = torch.tensor([[0.0, -math.inf], [-math.inf, 0.0]], dtype=torch.float64)
    assert elbo(joint, log_q).item() == pytest.approx(-1.5, abs=1e-15)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_m_step_on_hard_assignments_is_per_cluster_mle(covariance_type):
    gen = torch.Generator().manual_seed(9)
    n = 90
    z = torch.randn(n, D, generator=gen, dtype=torch.float64) * 3.0 + 1.0
    labels = torch.arange(n) % K
    labels = labels[torch.randperm(n, generator=gen)]
    labels[:5] = 0  # unequal cluster sizes
    resp = torch.nn.functional.one_hot(labels, K).to(torch.float64)

    weights, means, covs = m_step(z, resp, covariance_type, reg_covar=0.0)
    for k in range(K):
        members = z[labels == k]
        assert weights[k].item() == pytest.approx(len(members) / n, rel=1e-12)
        torch.testing.assert_close(means[k], members.mean(0), atol=1e-10, rtol=0)
        biased = torch.cov(members.T, correction=0)
        want = biased if covariance_type == "full" else biased.diagonal()
        torch.testing.assert_close(covs[k], want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_m_step_covariance_floor_is_reg_over_nk(covariance_type):
    gen = torch.Generator().manual_seed(10)
    z = torch.randn(60, D, generator=gen, dtype=torch.float64)
    resp = torch.softmax(torch.randn(60, K, generator=gen, dtype=torch.float64), dim=-1)
    _, _, plain = m_step(z, resp, covariance_type, reg_covar=0.0)
    _, _, floored = m_step(z, resp, covariance_type, reg_covar=0.5)
    nk = resp.sum(0)
    extra = floored - plain
    if covariance_type == "full":
        extra_diag = extra.diagonal(dim1=-2, dim2=-1)
        off = extra - torch.diag_embed(extra_diag)
        assert off.abs().max() < 1e-12
    else:
        extra_diag = extra
    torch.testing.assert_close(extra_diag, (0.5 / nk)[:, None].expand(K, D), atol=1e-12, rtol=0)


def test_n_parameters():
    assert GMMConfig(4, 3, "full").n_parameters() == 3 * 10 + 3 * 4 + 2
    assert GMMConfig(4, 3, "diag").n_parameters() == 3 * 4 + 3 * 4 + 2
