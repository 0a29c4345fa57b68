"""Fitting Gaussian mixtures by EM: k-means++ initialisation, restarts, BIC model selection.

The math of one E-step and one M-step lives in `models.gmm`; this module owns the loop, the
stopping rule and the bookkeeping that lets tests check what the theory promises: after every
E-step the KL gap log p(x) - ELBO is zero, and the (penalised) log-likelihood never decreases.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from genserve.models.gmm import (
    LOG_2PI,
    CovarianceType,
    EStep,
    GaussianMixture,
    GMMConfig,
    elbo,
    log_prior,
    m_step,
    posterior_q_log_q,
)


@dataclass
class EMIteration:
    log_likelihood: float  # mean log p(z_i | theta_t) per record
    elbo: float  # mean L(q_t, theta_t) per record, q_t the E-step posterior under theta_t
    kl_gap: float  # log_likelihood - elbo: KL(q_t || p(k | z, theta_t)), ~0 after the E-step
    objective: float  # log_likelihood + log prior / n: what MAP-EM never decreases
    # mean L(q_{t-1}, theta_t): the bound after the M-step, before the E-step closes the gap
    elbo_after_m_step: float


@dataclass
class EMResult:
    model: GaussianMixture
    history: list[EMIteration]
    converged: bool
    n_iter: int
    seed: int
    log_likelihood: float  # mean log p(z) per record at the returned parameters
    objective: float

    def bic(self, n: int) -> float:
        """Bayesian information criterion on n standardised records (lower is better)."""
        return -2.0 * self.log_likelihood * n + self.model.config.n_parameters() * math.log(n)


@dataclass
class EMSettings:
    covariance_type: CovarianceType = "full"
    reg_covar: float = 1e-3
    max_iter: int = 200
    tol: float = 1e-6  # relative change of the mean objective between iterations
    n_init: int = 3
    kmeans_iter: int = 10
    seed: int = 0


def kmeans_plus_plus(z: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to D(x)^2."""
    n = z.shape[0]
    centres = [z[torch.randint(n, (1,), generator=generator)].squeeze(0)]
    dist2 = ((z - centres[0]) ** 2).sum(-1)
    for _ in range(1, k):
        total = dist2.sum()
        if total <= 0:  # fewer distinct points than components: any point will do
            idx = torch.randint(n, (1,), generator=generator)
        else:
            idx = torch.multinomial(dist2 / total, 1, generator=generator)
        centres.append(z[idx].squeeze(0))
        dist2 = torch.minimum(dist2, ((z - centres[-1]) ** 2).sum(-1))
    return torch.stack(centres)


def kmeans_responsibilities(z: torch.Tensor, k: int, n_iter: int, generator: torch.Generator) -> torch.Tensor:
    """Hard assignments (N, K) from k-means++ seeding and a few Lloyd iterations."""
    centres = kmeans_plus_plus(z, k, generator)
    for _ in range(n_iter):
        labels = torch.cdist(z, centres).argmin(-1)
        onehot = torch.nn.functional.one_hot(labels, k).to(z.dtype)
        counts = onehot.sum(0)
        moved = (onehot.T @ z) / counts.clamp_min(1).unsqueeze(-1)
        centres = torch.where(counts.unsqueeze(-1) > 0, moved, centres)  # keep empty clusters' centres
    labels = torch.cdist(z, centres).argmin(-1)
    return torch.nn.functional.one_hot(labels, k).to(z.dtype)


def initial_model(
    z: torch.Tensor, n_components: int, settings: EMSettings, generator: torch.Generator
) -> GaussianMixture:
    resp = kmeans_responsibilities(z, n_components, settings.kmeans_iter, generator)
    model = GaussianMixture(GMMConfig(z.shape[1], n_components, settings.covariance_type), dtype=z.dtype)
    model.set_parameters(*m_step(z, resp, settings.covariance_type, settings.reg_covar))
    return model


def fitting_e_step(model: GaussianMixture, z: torch.Tensor, z_and_squares: torch.Tensor | None = None) -> EStep:
    """models.gmm.e_step, faster on the standardised training data for diagonal covariances.

    sum_d (z_d - mu_kd)^2 p_kd^2 expanded, as scikit-learn does, instead of an (N, K, D) tensor: with
    [z, z * z] side by side (computed once per fit, not per iteration) the whole joint is one matrix
    product, several times faster. The expansion loses digits when |z| is far larger than |mu|, which
    standardised training data never is; scoring arbitrary records keeps the model's direct form."""
    if model.config.covariance_type != "diag":
        return EStep.of(model.component_log_prob(z))
    p, means = model.precision_chol, model.means
    p2 = p.square()
    # log pi_k + log det P_k - 1/2 (D log 2 pi + sum_d mu_kd^2 p_kd^2): what does not depend on z
    const = model.log_weights + p.log().sum(-1) - 0.5 * (z.shape[1] * LOG_2PI + (means.square() * p2).sum(-1))
    stacked = torch.cat([z, z * z], dim=1) if z_and_squares is None else z_and_squares
    # Computed as (K, 2D) @ (2D, N) and used through its (N, K) transpose: MKL's float64 product is about twice
    # as fast with the N records along the output's rows than with K = 2-20 columns, and the responsibilities
    # inherit the (K, N) layout, which the M-step's product wants too.
    weights = torch.cat([means * p2, -0.5 * p2], dim=1)
    return EStep.of(torch.addmm(const.unsqueeze(-1), weights, stacked.T).T)


@torch.no_grad()
def run_em(
    model: GaussianMixture, z: torch.Tensor, settings: EMSettings, seed: int = 0
) -> EMResult:
    """EM from the model's current parameters until the objective stops improving.

    Iteration t scores theta_t (the parameters after t M-steps) and then, unless converged,
    takes the next M-step; so `history` has one entry per parameter set, n_iter = M-steps.
    Each iteration's posterior q and its sum q log q serve three times: this iteration's bound, the
    M-step, and next iteration's bound with the old q at the new parameters (what the M-step raised).
    """
    n = z.shape[0]
    z_and_squares = None
    if settings.covariance_type == "diag":  # (N, 2D), stored record-minor: see fitting_e_step
        z_and_squares = torch.cat([z, z * z], dim=1).T.contiguous().T
    history: list[EMIteration] = []
    converged = False
    previous: tuple[torch.Tensor, torch.Tensor] | None = None  # last iteration's q and sum q log q
    for t in range(settings.max_iter + 1):
        step = fitting_e_step(model, z, z_and_squares)
        q = step.resp
        q_log_q = posterior_q_log_q(q, step.log_resp)
        ll = step.log_prob.sum().item() / n
        bound = elbo(step.joint, step.log_resp, q, q_log_q).item() / n
        stale = math.nan if previous is None else elbo(step.joint, step.log_resp, *previous).item() / n
        objective = ll + (log_prior(model, settings.reg_covar).item() / n if settings.reg_covar else 0.0)
        history.append(EMIteration(ll, bound, ll - bound, objective, stale))
        if t > 0 and abs(objective - history[-2].objective) <= settings.tol * max(1.0, abs(objective)):
            converged = True
            break
        if t == settings.max_iter:
            break
        model.set_parameters(*m_step(z, q, settings.covariance_type, settings.reg_covar, z_and_squares))
        previous = (q, q_log_q)
    last = history[-1]
    return EMResult(model, history, converged, len(history) - 1, seed, last.log_likelihood, last.objective)


def fit_gmm(
    z: torch.Tensor,
    n_components: int,
    settings: EMSettings,
    on_restart: Callable[[], None] | None = None,
) -> EMResult:
    """Best of `settings.n_init` EM runs from k-means++ starts, by final penalised objective."""
    best: EMResult | None = None
    for restart in range(settings.n_init):
        seed = settings.seed * 1000 + restart
        generator = torch.Generator().manual_seed(seed)
        try:
            model = initial_model(z, n_components, settings, generator)
            result = run_em(model, z, settings, seed)
        except torch.linalg.LinAlgError:
            result = None  # a degenerate start (singular covariance); other restarts decide
        usable = result is not None and math.isfinite(result.objective)
        if usable and (best is None or result.objective > best.objective):
            best = result
        if on_restart is not None:
            on_restart()
    if best is None:
        raise ValueError(
            f"every EM restart for {n_components} components failed with a singular covariance; "
            "raise --reg-covar, use --covariance diag, or use fewer components"
        )
    return best


@dataclass
class Selection:
    best: EMResult
    bic: dict[int, float] = field(default_factory=dict)


def select_components(
    z: torch.Tensor,
    candidates: list[int],
    settings: EMSettings,
    on_restart: Callable[[], None] | None = None,
) -> Selection:
    """Fit each candidate number of components and keep the one with the lowest BIC."""
    n = z.shape[0]
    results = {k: fit_gmm(z, k, settings, on_restart) for k in candidates}
    bic = {k: r.bic(n) for k, r in results.items()}
    return Selection(best=results[min(bic, key=bic.get)], bic=bic)
