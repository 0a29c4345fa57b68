"""EM: the monotonicity and bound properties the theory promises, and agreement with scikit-learn."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SklearnGMM

from genserve.models.gmm import GaussianMixture, GMMConfig
from genserve.training.em import EMSettings, fit_gmm, initial_model, kmeans_plus_plus, run_em, select_components

SLACK = 1e-10


def mixture_data(n: int = 600, d: int = 4, separation: float = 4.0, seed: int = 0) -> torch.Tensor:
    """Standardised data from a 3-component mixture with correlated components whose centres form an
    equilateral triangle of side `separation` (component standard deviations are about 0.5)."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((3, d))
    centres[1, 0] = separation
    centres[2, :2] = separation * np.array([0.5, np.sqrt(3) / 2])
    parts = []
    sizes = [n // 2, n // 3, n - n // 2 - n // 3]
    for k, size in enumerate(sizes):
        a = rng.normal(size=(d, d)) * 0.3 + np.eye(d) * (0.5 + 0.2 * k)
        parts.append(centres[k] + rng.normal(size=(size, d)) @ a.T * 0.6)
    x = np.concatenate(parts)
    x = x[rng.permutation(len(x))]
    x = (x - x.mean(0)) / x.std(0)
    return torch.from_numpy(x)


def check_history(history, reg_covar: float) -> None:
    assert len(history) >= 3
    assert np.isnan(history[0].elbo_after_m_step)
    for t, it in enumerate(history):
        assert abs(it.kl_gap) < 1e-9, (t, it.kl_gap)
        assert it.kl_gap == pytest.approx(it.log_likelihood - it.elbo, abs=1e-15)
        if reg_covar == 0:
            assert it.objective == it.log_likelihood
        if t == 0:
            continue
        prev = history[t - 1]
        # log p(x | theta_t) >= L(q_{t-1}, theta_t): the E-step can only close the gap.
        assert it.log_likelihood >= it.elbo_after_m_step - SLACK, t
        assert it.objective >= prev.objective - SLACK, t
        # MAP-EM: L(q_{t-1}, theta_t) + log p(theta_t) / n >= objective_{t-1}, the M-step maximised exactly
        # that (objective - log_likelihood is the log prior / n at the same parameters).
        assert it.elbo_after_m_step + (it.objective - it.log_likelihood) >= prev.objective - SLACK, t
        if reg_covar == 0:
            # L(q_{t-1}, theta_t) >= L(q_{t-1}, theta_{t-1}) = log p(x | theta_{t-1}): what the M-step raised.
            assert it.elbo_after_m_step >= prev.log_likelihood - SLACK, t
            assert it.log_likelihood >= prev.log_likelihood - SLACK, t


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
@pytest.mark.parametrize("reg_covar", [0.0, 0.5])  # 0.5: large enough that a wrong floor shows
def test_em_monotone_and_kl_gap_closed(covariance_type, reg_covar):
    z = mixture_data(separation=2.5)  # overlapping: EM needs many iterations
    settings = EMSettings(covariance_type=covariance_type, reg_covar=reg_covar, max_iter=150, tol=1e-12, n_init=2)
    result = fit_gmm(z, 3, settings)
    check_history(result.history, reg_covar)
    assert result.n_iter == len(result.history) - 1
    assert result.log_likelihood == result.history[-1].log_likelihood
    assert result.objective == result.history[-1].objective
    # The returned model is the one the last history entry scored.
    with torch.no_grad():
        assert result.model.log_prob(z).mean().item() == pytest.approx(result.log_likelihood, abs=1e-12)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_run_em_from_a_poor_start_is_monotone(covariance_type):
    """Start far from the optimum (all means near the origin) so many iterations actually move."""
    z = mixture_data(seed=3)
    model = GaussianMixture(GMMConfig(4, 3, covariance_type))
    gen = torch.Generator().manual_seed(0)
    means = 0.1 * torch.randn(3, 4, generator=gen, dtype=torch.float64)
    covs = torch.eye(4, dtype=torch.float64).repeat(3, 1, 1) if covariance_type == "full" else torch.ones(3, 4)
    model.set_parameters(torch.full((3,), 1 / 3, dtype=torch.float64), means, covs.to(torch.float64))
    result = run_em(model, z, EMSettings(covariance_type=covariance_type, reg_covar=0.0, max_iter=60, tol=0.0))
    check_history(result.history, 0.0)
    assert result.history[-1].log_likelihood > result.history[0].log_likelihood + 0.1


def test_run_em_stops_on_tolerance():
    z = mixture_data(seed=4)
    gen = torch.Generator().manual_seed(1)
    model = initial_model(z, 3, EMSettings(), gen)
    result = run_em(model, z, EMSettings(tol=1e-3, max_iter=500))
    assert result.converged
    assert result.n_iter < 500
    last, prev = result.history[-1], result.history[-2]
    assert abs(last.objective - prev.objective) <= 1e-3 * max(1.0, abs(last.objective))


def test_run_em_max_iter_counts_m_steps():
    z = mixture_data(seed=5)
    model = initial_model(z, 3, EMSettings(), torch.Generator().manual_seed(0))
    result = run_em(model, z, EMSettings(tol=0.0, max_iter=4))
    assert not result.converged
    assert result.n_iter == 4
    assert len(result.history) == 5


def sklearn_fit(x, covariance_type, weights, means, precisions, max_iter) -> SklearnGMM:
    ref = SklearnGMM(
        n_components=len(weights),
        covariance_type=covariance_type,
        weights_init=weights,
        means_init=means,
        precisions_init=precisions,
        reg_covar=0.0,
        max_iter=max_iter,
        tol=0.0,
        n_init=1,
        random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref.fit(x)
    return ref


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_agrees_with_scikit_learn(covariance_type):
    z = mixture_data(separation=1.5, seed=6)  # overlapping components: EM takes a while
    x = z.numpy()
    init = initial_model(z, 3, EMSettings(covariance_type=covariance_type, reg_covar=0.0),
                         torch.Generator().manual_seed(2))
    weights = init.log_weights.exp().numpy().copy()
    means = init.means.numpy().copy()
    covs = init.covariances().numpy().copy()
    precisions = np.linalg.inv(covs) if covariance_type == "full" else 1.0 / covs

    final = {}
    # Early (parameters still moving fast) and late: a miscount of iterations would show at 3 steps.
    for max_iter in (3, 20):
        ours = run_em(copy.deepcopy(init), z,
                      EMSettings(covariance_type=covariance_type, reg_covar=0.0, max_iter=max_iter, tol=0.0))
        # Our n_iter counts M-steps (history holds one more entry, the initial parameters); so does
        # sklearn's n_iter_, which with tol=0 never stops early. Both get exactly max_iter M-steps.
        assert not ours.converged
        assert ours.n_iter == max_iter
        ref = sklearn_fit(x, covariance_type, weights, means, precisions, max_iter)
        assert ref.n_iter_ == max_iter

        assert ours.log_likelihood == pytest.approx(ref.score(x), rel=1e-6)
        np.testing.assert_allclose(ours.model.means.numpy(), ref.means_, atol=1e-6)
        np.testing.assert_allclose(ours.model.log_weights.exp().numpy(), ref.weights_, atol=1e-6)
        np.testing.assert_allclose(ours.model.covariances().numpy(), ref.covariances_, atol=1e-6)
        # sklearn's lower_bound_ is the log-likelihood at the parameters before its last M-step.
        assert ours.history[-2].log_likelihood == pytest.approx(ref.lower_bound_, rel=1e-6)
        final[max_iter] = ours.log_likelihood

    # The comparison is not trivial: the likelihood changes a lot between 3 and 20 M-steps.
    assert final[20] > final[3] + 1e-2


def test_select_components_picks_true_k_by_bic():
    z = mixture_data(n=600, separation=8.0, seed=7)
    settings = EMSettings(covariance_type="full", reg_covar=1e-3, max_iter=100, tol=1e-6, n_init=2)
    calls = []
    selection = select_components(z, [1, 2, 3, 4, 5], settings, on_restart=lambda: calls.append(1))
    assert selection.best.model.config.n_components == 3
    assert min(selection.bic, key=selection.bic.get) == 3
    assert set(selection.bic) == {1, 2, 3, 4, 5}
    assert len(calls) == 5 * settings.n_init
    assert selection.bic[3] == pytest.approx(selection.best.bic(z.shape[0]))


def test_fit_gmm_is_reproducible():
    z = mixture_data(seed=8)
    settings = EMSettings(max_iter=30, n_init=2, seed=3)
    a = fit_gmm(z, 3, settings)
    b = fit_gmm(z, 3, settings)
    assert a.seed == b.seed
    assert a.log_likelihood == b.log_likelihood
    assert torch.equal(a.model.means, b.model.means)


def test_kmeans_plus_plus_returns_distinct_data_rows():
    z = mixture_data(n=200, seed=9)
    for seed in range(5):
        centres = kmeans_plus_plus(z, 6, torch.Generator().manual_seed(seed))
        assert centres.shape == (6, 4)
        rows = [int(torch.nonzero((z == c).all(-1)).flatten()[0]) for c in centres]  # IndexError if not a row
        assert len(set(rows)) == 6
        assert torch.unique(centres, dim=0).shape[0] == 6


def test_kmeans_plus_plus_with_fewer_distinct_points_than_k():
    z = torch.tensor([[0.0, 0.0], [1.0, 1.0]] * 5, dtype=torch.float64)
    centres = kmeans_plus_plus(z, 4, torch.Generator().manual_seed(0))
    assert centres.shape == (4, 2)
    assert torch.unique(centres, dim=0).shape[0] == 2
