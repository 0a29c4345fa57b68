"""`genserve train gmm`: data -> standardise -> EM (BIC if asked) -> evaluate -> calibrate -> artifact.

The data, split, standardisation, evaluation, calibration and export are the records family's
(records_pipeline.RecordsRun); the fit is EM (training/em.py), restarted `n_init` times for each candidate number
of components, the best by BIC.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genserve.artifacts import artifact
from genserve.artifacts.families import GMM_KIND
from genserve.artifacts.neighbours import NeighbourIndex, fit_neighbours
from genserve.artifacts.reference import fit_gaussian
from genserve.models.gmm import CovarianceType
from genserve.training.data import Tabular, standardisation
from genserve.training.em import EMSettings, select_components
from genserve.training.loop import Fitted, run_family
from genserve.training.records_pipeline import RecordsRun, records_scores

EM_HISTORY = "em_history.json"
# Fewer held-out records than this and the GMM calibrates on cross-fitted scores: a 1% threshold placed on 50
# held-out records flagged 7.5% of fresh normal ones (breast_cancer, docs/anomaly.md).
CROSS_FIT_BELOW = 1_000
CROSS_FOLDS = 5


@dataclass
class GMMTrainConfig:
    dataset: str
    name: str
    components: int | None = None  # None: choose by BIC among 1..max_components
    max_components: int = 8
    covariance_type: CovarianceType = "full"
    reg_covar: float = 1e-2
    max_iter: int = 200
    tol: float = 1e-6
    n_init: int = 3
    seed: int = 0
    validation_fraction: float = 0.2
    label_column: str | None = None
    exclude_classes: list[int] | None = None  # scikit-learn datasets: leave out records of these target classes
    export_onnx: bool = True


def train_gmm(cfg: GMMTrainConfig, store: Path, progress: bool = True, data: Tabular | None = None) -> Path:
    """Fit, evaluate, calibrate and export a GMM; returns the new artifact's directory. `data` replaces
    cfg.dataset (records already in memory, e.g. one class of a labelled set)."""
    artifact.validate_name(cfg.name)
    return run_family(GMMRun(GMM_KIND, cfg, store, progress, data))


class GMMRun(RecordsRun):
    """The records family's run with EM for the fit."""

    report_total_seconds = False

    def fit(self) -> Fitted:
        cfg = self.cfg
        self.z = torch.from_numpy((self.parts.train - self.mean) / self.scale)
        candidates = [cfg.components] if cfg.components else list(range(1, cfg.max_components + 1))
        candidates = [k for k in candidates if k <= self.z.shape[0]]
        started = time.perf_counter()
        with _progress(self.progress, f"EM {cfg.name}", len(candidates) * cfg.n_init) as advance:
            self.selection = select_components(self.z, candidates, self.em_settings(), on_restart=advance)
        fit = self.selection.best
        fit.model.set_standardisation(torch.from_numpy(self.mean), torch.from_numpy(self.scale))
        history = {"restart_seed": fit.seed, "iterations": [asdict(h) for h in fit.history]}
        return Fitted(fit.model, history, time.perf_counter() - started)

    def em_settings(self) -> EMSettings:
        cfg = self.cfg
        return EMSettings(covariance_type=cfg.covariance_type, reg_covar=cfg.reg_covar, max_iter=cfg.max_iter,
                          tol=cfg.tol, n_init=cfg.n_init, seed=cfg.seed)

    def held_out_scores(self, fitted: Fitted, reference: torch.nn.Module, neighbours: NeighbourIndex,
                        metrics: dict[str, Any]) -> dict[str, np.ndarray]:
        """With fewer than CROSS_FIT_BELOW validation records, cross-fitted scores of every record: the training
        and validation splits pooled and cut into CROSS_FOLDS folds, each fold scored by a GMM (the fitted number
        of components, EM as configured), reference and index fitted on the other folds, standardised by them.
        Each fold model sees as many records as the fitted one (4/5 of the pool is about the training split), so
        its held-out scores are distributed as the served model's on fresh records, and the calibration rests on
        every record instead of a fifth of them."""
        validation = self.parts.validation
        if len(validation) >= CROSS_FIT_BELOW:
            return super().held_out_scores(fitted, reference, neighbours, metrics)
        pool = np.concatenate([self.parts.train, validation])
        fold = np.random.default_rng(self.cfg.seed).permutation(len(pool)) % CROSS_FOLDS
        k = fitted.module.config.n_components
        scores = []
        for f in range(CROSS_FOLDS):
            train, held = pool[fold != f], pool[fold == f]
            mean, scale = standardisation(train)
            z = torch.from_numpy((train - mean) / scale)
            model = select_components(z, [min(k, len(train))], self.em_settings()).best.model
            model.set_standardisation(torch.from_numpy(mean), torch.from_numpy(scale))
            with torch.no_grad():
                log_prob = model.log_prob(torch.from_numpy(held)).numpy()
            scores.append(records_scores(log_prob, held, fit_gaussian(train),
                                         fit_neighbours(train, "standardised", mean, scale)))
        metrics["anomaly_calibration"] = {"cross_fitted_folds": CROSS_FOLDS, "records": len(pool)}
        return {name: np.concatenate([s[name] for s in scores]) for name in scores[0]}

    def fit_metrics(self, fitted: Fitted) -> dict[str, Any]:
        fit = self.selection.best
        return {
            "n_components": fitted.module.config.n_components,
            "covariance_type": self.cfg.covariance_type,
            "bic": fit.bic(self.z.shape[0]),
            "bic_by_components": {str(k): v for k, v in self.selection.bic.items()},
            "em_iterations": fit.n_iter,
            "em_converged": fit.converged,
        }

    def history_files(self, fitted: Fitted) -> dict[str, bytes]:
        return {EM_HISTORY: json.dumps(fitted.history).encode()}


@contextmanager
def _progress(enabled: bool, description: str, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar when enabled, else nothing; yields an `advance()` callback."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)
