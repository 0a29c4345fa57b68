"""`genserve train gmm`: data -> standardise -> EM (BIC if asked) -> evaluate -> calibrate -> artifact."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from genserve.artifacts import artifact
from genserve.artifacts.calibration import CalibrationSet
from genserve.artifacts.reference import fit_gaussian, reference_files
from genserve.artifacts.scores import compute_scores
from genserve.models.gmm import CovarianceType, GaussianMixture
from genserve.training.data import Tabular, exclude_classes, load_tabular, split
from genserve.training.em import EMSettings, select_components
from genserve.training.onnx_export import check_onnx, export_onnx

GMM_KIND = "gmm"
EM_HISTORY = "em_history.json"


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


def standardisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0)
    scale = x.std(0)
    # A constant feature keeps scale 1 (its density is then set by the covariance floor).
    return mean, np.where(scale > 1e-12, scale, 1.0)


def mean_log_prob(model: GaussianMixture, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.log_prob(torch.from_numpy(x)).numpy()


def train_gmm(cfg: GMMTrainConfig, store: Path, progress: bool = True, data: Tabular | None = None) -> Path:
    """Fit, evaluate, calibrate and export a GMM; returns the new artifact's directory. `data` replaces
    cfg.dataset (records already in memory, e.g. one class of a labelled set)."""
    artifact.validate_name(cfg.name)
    started = time.perf_counter()
    if data is None:
        data = load_tabular(cfg.dataset, cfg.label_column)
    if cfg.exclude_classes:
        data = exclude_classes(data, cfg.exclude_classes)
    parts = split(data.x, cfg.validation_fraction, cfg.seed)
    mean, scale = standardisation(parts.train)
    z = torch.from_numpy((parts.train - mean) / scale)

    settings = EMSettings(
        covariance_type=cfg.covariance_type,
        reg_covar=cfg.reg_covar,
        max_iter=cfg.max_iter,
        tol=cfg.tol,
        n_init=cfg.n_init,
        seed=cfg.seed,
    )
    candidates = [cfg.components] if cfg.components else list(range(1, cfg.max_components + 1))
    candidates = [k for k in candidates if k <= z.shape[0]]
    with _progress(progress, f"EM {cfg.name}", len(candidates) * cfg.n_init) as advance:
        selection = select_components(z, candidates, settings, on_restart=advance)
    fit = selection.best
    model = fit.model
    model.set_standardisation(torch.from_numpy(mean), torch.from_numpy(scale))

    d = data.x.shape[1]
    train_lp = mean_log_prob(model, parts.train)
    val_lp = mean_log_prob(model, parts.validation)
    reference = fit_gaussian(parts.train)
    with torch.no_grad():
        ref_lp = reference.log_prob(torch.from_numpy(parts.validation)).numpy()
    calibration = CalibrationSet.fit(compute_scores("records", val_lp, d, reference_log_prob=ref_lp))
    nll_cal = calibration.scores["nll"]
    metrics = {
        "n_components": model.config.n_components,
        "covariance_type": cfg.covariance_type,
        "bic": fit.bic(z.shape[0]),
        "bic_by_components": {str(k): v for k, v in selection.bic.items()},
        "em_iterations": fit.n_iter,
        "em_converged": fit.converged,
        "train_log_likelihood_per_record": float(train_lp.mean()),
        "validation_log_likelihood_per_record": float(val_lp.mean()),
        "validation_nll_nats": float(-val_lp.mean()),
        "validation_bits_per_dim": float(-val_lp.mean() / (d * math.log(2))),
        "anomaly_threshold_nll_nats": nll_cal.threshold,
        "anomaly_false_positive_rate": nll_cal.false_positive_rate,
        "anomaly_thresholds": {k: c.threshold for k, c in calibration.scores.items()},
    }

    files = {
        artifact.WEIGHTS: save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}),
        artifact.CALIBRATION: json.dumps(calibration.to_dict()).encode(),
        **reference_files(reference),
        EM_HISTORY: json.dumps({"restart_seed": fit.seed, "iterations": [asdict(h) for h in fit.history]}).encode(),
    }
    if cfg.export_onnx:
        example = torch.from_numpy(parts.validation[: min(8, len(parts.validation))])
        files[artifact.ONNX] = export_onnx(model, example, "records", ["log_prob", "responsibilities"])
        metrics["onnx_max_abs_error"] = check_onnx(model, files[artifact.ONNX], torch.from_numpy(parts.validation))

    training = {
        "dataset": data.source,
        "n_train": int(parts.train.shape[0]),
        "n_validation": int(parts.validation.shape[0]),
        "split_seed": parts.seed,
        "validation_fraction": parts.validation_fraction,
        "settings": asdict(cfg),
        "duration_s": round(time.perf_counter() - started, 3),
    }
    return artifact.write_artifact(
        store,
        kind=GMM_KIND,
        name=cfg.name,
        config=model.config.to_dict(),
        input_spec=artifact.InputSpec(n_features=d, feature_names=data.feature_names),
        training=training,
        metrics=metrics,
        files=files,
    )


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
