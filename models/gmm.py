"""Gaussian mixture model: exact log p(x), responsibilities, sampling, and the EM steps.

The model works on standardised features z = (x - feature_mean) / feature_scale, but every public
method takes and returns raw records: standardisation is part of the model, and log p(x) includes
the Jacobian of that affine map, so densities are those of the raw data.

Covariances are held as Cholesky factors of the precision (as scikit-learn does): with
Sigma^-1 = P P^T, log N(z | mu, Sigma) = -D/2 log 2pi + sum(log diag P) - 1/2 ||(z - mu) P||^2,
which needs no matrix inverse at scoring time. Everything is in log space (log-sum-exp).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

CovarianceType = Literal["full", "diag"]
LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class GMMConfig:
    n_features: int
    n_components: int
    covariance_type: CovarianceType = "full"

    def to_dict(self) -> dict:
        return asdict(self)

    def n_parameters(self) -> int:
        """Free parameters, as counted by BIC."""
        d, k = self.n_features, self.n_components
        cov = k * d * (d + 1) // 2 if self.covariance_type == "full" else k * d
        return cov + k * d + (k - 1)


class GaussianMixture(nn.Module):
    """p(x) = sum_k pi_k N(x | mu_k, Sigma_k), fitted by EM (see `e_step` and `m_step`)."""

    def __init__(self, config: GMMConfig, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.config = config
        k, d = config.n_components, config.n_features
        if config.covariance_type == "full":
            precision_chol = torch.eye(d, dtype=dtype).repeat(k, 1, 1)
        else:
            precision_chol = torch.ones(k, d, dtype=dtype)
        self.register_buffer("log_weights", torch.full((k,), -math.log(k), dtype=dtype))
        self.register_buffer("means", torch.zeros(k, d, dtype=dtype))
        self.register_buffer("precision_chol", precision_chol)
        self.register_buffer("feature_mean", torch.zeros(d, dtype=dtype))
        self.register_buffer("feature_scale", torch.ones(d, dtype=dtype))

    # ---- parameters -------------------------------------------------------------------------

    def set_standardisation(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_scale.copy_(scale)

    def set_parameters(self, weights: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor) -> None:
        """Set pi, mu and Sigma (full: K x D x D, diag: K x D variances), in standardised space."""
        self.log_weights.copy_(torch.log(weights))
        self.means.copy_(means)
        self.precision_chol.copy_(precision_cholesky(covariances, self.config.covariance_type))

    def covariances(self) -> torch.Tensor:
        if self.config.covariance_type == "diag":
            return self.precision_chol.pow(-2)
        precision = self.precision_chol @ self.precision_chol.transpose(-1, -2)
        return torch.linalg.inv(precision)

    # ---- densities ----------------------------------------------------------------------------

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.feature_mean) / self.feature_scale

    def component_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log pi_k + log N(z | mu_k, Sigma_k) for standardised z: (N, D) -> (N, K)."""
        k, d = self.config.n_components, self.config.n_features
        if self.config.covariance_type == "full":
            # One matmul for all components: (N, D) @ (D, K*D) -> (N, K, D), then subtract mu_k P_k.
            prec = self.precision_chol
            y = (z @ prec.permute(1, 0, 2).reshape(d, k * d)).reshape(-1, k, d)
            y = y - torch.einsum("kd,kde->ke", self.means, prec)
            log_det = torch.log(torch.diagonal(prec, dim1=-2, dim2=-1)).sum(-1)
        else:
            y = (z.unsqueeze(1) - self.means) * self.precision_chol
            log_det = torch.log(self.precision_chol).sum(-1)
        maha = (y * y).sum(-1)
        return self.log_weights + log_det - 0.5 * (d * LOG_2PI + maha)

    def log_jacobian(self) -> torch.Tensor:
        """log |dz/dx| of the standardisation, added to every log p(z) to give log p(x)."""
        return -torch.log(self.feature_scale).sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw records (N, D) -> (log p(x) in nats (N,), responsibilities (N, K))."""
        joint = self.component_log_prob(self.standardise(x))
        log_pz = torch.logsumexp(joint, dim=-1)
        return log_pz + self.log_jacobian(), torch.exp(joint - log_pz.unsqueeze(-1))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)[0]

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n raw records drawn from the mixture."""
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.config.n_features, dtype=self.means.dtype, generator=generator)
        prec = self.precision_chol[comp]
        if self.config.covariance_type == "full":
            # Sigma^-1 = P P^T, so z = mu + P^-T eps has covariance Sigma.
            z = torch.linalg.solve_triangular(prec.transpose(-1, -2), eps.unsqueeze(-1), upper=False)
            z = z.squeeze(-1)
        else:
            z = eps / prec
        return (self.means[comp] + z) * self.feature_scale + self.feature_mean


def precision_cholesky(covariances: torch.Tensor, covariance_type: CovarianceType) -> torch.Tensor:
    """P with P P^T = Sigma^-1 (upper triangular), or 1/sqrt(variance) for diagonal covariances."""
    if covariance_type == "diag":
        return covariances.rsqrt()
    chol = torch.linalg.cholesky(covariances)
    eye = torch.eye(covariances.shape[-1], dtype=covariances.dtype, device=covariances.device).expand_as(covariances)
    return torch.linalg.solve_triangular(chol, eye, upper=False).transpose(-1, -2)


# ---- EM ----------------------------------------------------------------------------------------


@dataclass
class EStep:
    log_prob: torch.Tensor  # log p(z_i | theta), (N,)
    log_resp: torch.Tensor  # log gamma_ik = log p(k | z_i, theta), (N, K)
    joint: torch.Tensor  # log pi_k N(z_i | mu_k, Sigma_k), (N, K)
    resp: torch.Tensor  # gamma_ik = exp(log_resp), (N, K)

    @classmethod
    def of(cls, joint: torch.Tensor) -> EStep:
        """Normalise the joint over components: a log-sum-exp shifted by each row's largest term, whose
        exponentials also give the responsibilities (one exp for both; EM's iterations are small enough
        that the number of passes over (N, K) is what they cost)."""
        peak = torch.nan_to_num(joint.amax(-1, keepdim=True), neginf=0.0)  # a row of -inf stays -inf
        shifted = joint - peak
        scaled = shifted.exp()
        total = scaled.sum(-1, keepdim=True)
        log_total = total.log()
        return cls(log_prob=(peak + log_total).squeeze(-1), log_resp=shifted - log_total, joint=joint,
                   resp=scaled / total)


def e_step(model: GaussianMixture, z: torch.Tensor) -> EStep:
    """Responsibilities gamma_ik = pi_k N(z_i|k) / sum_j pi_j N(z_i|j), in log space."""
    return EStep.of(model.component_log_prob(z))


def elbo(joint: torch.Tensor, log_resp: torch.Tensor, q: torch.Tensor | None = None,
         q_log_q: torch.Tensor | None = None) -> torch.Tensor:
    """L(q, theta) = sum_i sum_k q_ik (log p(z_i, k | theta) - log q_ik), for q = exp(log_resp).

    q and sum q log q (`posterior_q_log_q`) may be passed in when the caller has them already (EM reuses
    both from one iteration to the next)."""
    q = log_resp.exp() if q is None else q
    return (q * joint).sum() - (posterior_q_log_q(q, log_resp) if q_log_q is None else q_log_q)


def posterior_q_log_q(q: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_ik q_ik log q_ik, with 0 log 0 = 0: components with no responsibility contribute nothing (where
    log q is -inf the product is NaN, which nansum drops; where q underflowed to 0 it is 0 already)."""
    return (q * log_q).nansum()


def m_step(
    z: torch.Tensor, resp: torch.Tensor, covariance_type: CovarianceType, reg_covar: float,
    z_and_squares: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAP M-step: pi_k = N_k / n, mu_k = sum_i gamma_ik z_i / N_k, Sigma_k = S_k + (reg / N_k) I.

    S_k is the responsibility-weighted scatter. The `reg / N_k` term is the exact maximiser under
    the prior log p(Sigma_k) = -reg/2 tr(Sigma_k^-1) (an inverse-Wishart-style covariance floor),
    so EM still never decreases the penalised objective log p(z|theta) + log p(theta), and a
    component that shrinks onto a few points keeps a floor of order reg on its variances.
    `z_and_squares`: [z, z * z] side by side (N, 2D), for diagonal covariances, when the caller keeps it
    across iterations: the means and second moments then come from one matrix product.
    """
    n = z.shape[0]
    nk = resp.sum(0) + 10 * torch.finfo(z.dtype).eps
    if covariance_type == "diag":
        stacked = torch.cat([z, z * z], dim=1) if z_and_squares is None else z_and_squares
        means, sq = (resp.T @ stacked / nk.unsqueeze(-1)).split(z.shape[1], dim=1)
        cov = (sq - means * means).clamp_min(0) + (reg_covar / nk).unsqueeze(-1)
        return nk / n, means, cov
    means = (resp.T @ z) / nk.unsqueeze(-1)
    if covariance_type == "full":
        # All components in one batched product of the centred records with their weighted copies (measured
        # faster than an einsum over the same (K, N, D) tensor, and than one product per component).
        diff = z.unsqueeze(0) - means.unsqueeze(1)  # (K, N, D)
        cov = torch.bmm((diff * resp.T.unsqueeze(-1)).transpose(1, 2), diff)
        eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
        cov = cov / nk.view(-1, 1, 1) + (reg_covar / nk).view(-1, 1, 1) * eye
    return nk / n, means, cov


def log_prior(model: GaussianMixture, reg_covar: float) -> torch.Tensor:
    """log p(theta) up to a constant for the covariance prior that `m_step` maximises under."""
    if reg_covar == 0:
        return torch.zeros((), dtype=model.means.dtype, device=model.means.device)
    p = model.precision_chol
    trace_precision = (p * p).sum()  # tr(P P^T) = ||P||_F^2, also right for the diagonal case
    return -0.5 * reg_covar * trace_precision
