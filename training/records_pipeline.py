"""`genserve train realnvp|made-mog`: records -> standardise -> maximum likelihood by Adam -> evaluate -> calibrate
-> artifact, beside the GMM (training/gmm_pipeline.py) and served through the same endpoints.

The split, the standardisation (stored in the model), the reference model for likelihood ratios, the calibration
of every anomaly score type on the validation split and the ONNX graph (log_prob and an empty responsibilities
output, checked against torch) are the GMM's. Training: minibatches of the standardised training split, Adam with
a cosine decay to a tenth, gradient clipping, validation NLL after every epoch and the best epoch's weights kept,
stopping `patience` epochs after the best one (the validation split both picks the epoch and calibrates, as small
tabular sets leave nothing else to hold out). Both models give an exact log p(x): the artifact's density
capability is `exact`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from genserve.artifacts import artifact
from genserve.artifacts.calibration import fit_anomaly_calibration
from genserve.artifacts.families import GMM_KIND, RECORDS_KINDS
from genserve.artifacts.neighbours import NeighbourIndex, fit_neighbours
from genserve.artifacts.reference import fit_gaussian
from genserve.artifacts.scores import compute_scores
from genserve.models.registry import build_records_model
from genserve.training.data import Tabular, exclude_classes, load_tabular, split, standardisation
from genserve.training.loop import BestEpoch, Fitted, calibration_files, cosine_decay, optimizer_step, run_family
from genserve.training.onnx_export import check_onnx, export_onnx
from genserve.training.reporting import log_files, progress_bar, records_loss_curve

# The records kinds trained here by gradient; the GMM, fitted by EM, is gmm_pipeline.py's.
KINDS = tuple(k for k in RECORDS_KINDS if k != GMM_KIND)
# Per kind: the architecture (fields of its config besides n_features) and the optimisation; sized for the
# scikit-learn tables (hundreds of records, 4-64 features): seconds on a CPU.
DEFAULTS: dict[str, dict[str, Any]] = {
    "realnvp": dict(arch=dict(n_layers=8, hidden=64, n_hidden=2), epochs=300, batch_size=64, learning_rate=1e-3,
                    weight_decay=1e-4),
    "made-mog": dict(arch=dict(hidden=[128, 128], n_components=5), epochs=300, batch_size=64,
                     learning_rate=1e-3, weight_decay=1e-4),
}


@dataclass
class RecordsTrainConfig:
    model: str  # realnvp | made-mog
    dataset: str  # sklearn:NAME or FILE.csv
    name: str
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    weight_decay: float | None = None
    grad_clip: float = 5.0
    patience: int = 50  # stop after this many epochs without a better validation NLL (0: never)
    architecture: dict[str, Any] | None = None  # overrides of the defaults' architecture fields
    validation_fraction: float = 0.2
    label_column: str | None = None
    exclude_classes: list[int] | None = None
    seed: int = 0
    export_onnx: bool = True

    def resolved(self) -> RecordsTrainConfig:
        if self.model not in KINDS:
            raise ValueError(f"unknown records model {self.model!r}; use one of {', '.join(KINDS)} (or gmm)")
        defaults = DEFAULTS[self.model]
        cfg = replace(self, architecture={**defaults["arch"], **(self.architecture or {})},
                      **{k: defaults[k] if getattr(self, k) is None else getattr(self, k)
                         for k in ("epochs", "batch_size", "learning_rate", "weight_decay")})
        for field in ("epochs", "batch_size"):
            if getattr(cfg, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(cfg, field)}")
        if not cfg.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {cfg.learning_rate}")
        artifact.validate_name(cfg.name)
        return cfg


def train_records(cfg: RecordsTrainConfig, store: Path, progress: bool = True, data: Tabular | None = None) -> Path:
    """Fit, evaluate, calibrate and export a RealNVP or MADE-MoG; returns the new artifact's directory."""
    cfg = cfg.resolved()
    return run_family(RecordsRun(cfg.model, cfg, store, progress, data))


class RecordsRun:
    """The records family's pieces of the shared run (training/loop.py), for a RealNVP or MADE-MoG. The GMM's run
    (gmm_pipeline.py) shares them but for the fit, its metrics and its files."""

    report_total_seconds = True  # the GMM's manifest keeps its duration in training.duration_s alone

    def __init__(self, kind: str, cfg: Any, store: Path, progress: bool, data: Tabular | None) -> None:
        self.kind, self.cfg, self.store, self.progress, self.data = kind, cfg, store, progress, data
        self.started = time.perf_counter()

    def prepare(self) -> None:
        """The records (`data` when given, else cfg.dataset's), their split and the training split's
        standardisation."""
        cfg = self.cfg
        data = self.data if self.data is not None else load_tabular(cfg.dataset, cfg.label_column)
        if cfg.exclude_classes:
            data = exclude_classes(data, cfg.exclude_classes)
        self.data, self.parts = data, split(data.x, cfg.validation_fraction, cfg.seed)
        self.mean, self.scale = standardisation(self.parts.train)

    def fit(self) -> Fitted:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = build_records_model(cfg.model, {"n_features": self.data.x.shape[1], **cfg.architecture})
        model.set_standardisation(torch.from_numpy(self.mean), torch.from_numpy(self.scale))
        history, seconds = _fit(cfg, model, self.parts.train, self.parts.validation, self.progress)
        return Fitted(model, history, seconds)

    def fit_metrics(self, fitted: Fitted) -> dict[str, Any]:
        """What the manifest reports of the fit itself, before the likelihoods."""
        return {"parameters": sum(p.numel() for p in fitted.module.parameters()), "epochs": self.cfg.epochs,
                "best_epoch": fitted.history["best_epoch"], "training_seconds": round(fitted.seconds, 2)}

    def evaluate(self, fitted: Fitted) -> dict[str, Any]:
        """Log-likelihoods per record of both splits (the validation split's also calibrate)."""
        d = self.data.x.shape[1]
        with torch.no_grad():
            train_lp = fitted.module.log_prob(torch.from_numpy(self.parts.train)).numpy()
            self.validation_log_probs = val_lp = fitted.module.log_prob(torch.from_numpy(self.parts.validation)).numpy()
        return {
            **self.fit_metrics(fitted),
            "train_log_likelihood_per_record": float(train_lp.mean()),
            "validation_log_likelihood_per_record": float(val_lp.mean()),
            "validation_nll_nats": float(-val_lp.mean()),
            "validation_bits_per_dim": float(-val_lp.mean() / (d * math.log(2))),
        }

    def calibrate(self, fitted: Fitted, metrics: dict[str, Any]) -> dict[str, bytes]:
        """Every records score type on held-out records (`held_out_scores`), against a Gaussian and a neighbour
        index fitted to the training split."""
        reference = fit_gaussian(self.parts.train)
        neighbours = fit_neighbours(self.parts.train, "standardised", self.mean, self.scale)
        validation = self.held_out_scores(fitted, reference, neighbours, metrics)
        calibration = fit_anomaly_calibration("records", validation)
        nll = calibration.scores["nll"]
        metrics["anomaly_threshold_nll_nats"] = nll.threshold
        metrics["anomaly_false_positive_rate"] = nll.false_positive_rate
        return calibration_files(calibration, reference, metrics, neighbours)

    def held_out_scores(self, fitted: Fitted, reference: torch.nn.Module, neighbours: NeighbourIndex,
                        metrics: dict[str, Any]) -> dict[str, np.ndarray]:
        """The raw scores the calibration is fitted on: the validation split's, under the fitted model."""
        return records_scores(self.validation_log_probs, self.parts.validation, reference, neighbours)

    def history_files(self, fitted: Fitted) -> dict[str, bytes]:
        """The files that tell how the model was fitted."""
        title = f"{self.cfg.name}: {self.cfg.model}"
        return log_files(fitted.history, records_loss_curve(fitted.history, title))

    def export(self, fitted: Fitted, metrics: dict[str, Any], files: dict[str, bytes]) -> Path:
        cfg, model, parts, data = self.cfg, fitted.module, self.parts, self.data
        weights = save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()})
        files = {artifact.WEIGHTS: weights, **files, **self.history_files(fitted)}
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
            "duration_s": round(time.perf_counter() - self.started, 3),
        }
        if self.report_total_seconds:
            metrics["total_seconds"] = round(time.perf_counter() - self.started, 2)
        return artifact.write_artifact(
            self.store, kind=self.kind, name=cfg.name, config=model.config.to_dict(),
            input_spec=artifact.InputSpec(n_features=data.x.shape[1], feature_names=data.feature_names),
            training=training, metrics=metrics, files=files, density="exact",
        )


def records_scores(log_prob: np.ndarray, x: np.ndarray, reference: torch.nn.Module, neighbours: NeighbourIndex
                   ) -> dict[str, np.ndarray]:
    """Every records score type of records `x` given the model's log p(x), the reference and the index."""
    with torch.no_grad():
        ref_lp = reference.log_prob(torch.from_numpy(x)).numpy()
    return compute_scores("records", log_prob, x.shape[1], reference_log_prob=ref_lp,
                          knn_distance=neighbours.distance(x))


def _fit(cfg: RecordsTrainConfig, model: torch.nn.Module, train: np.ndarray, validation: np.ndarray,
         progress: bool) -> tuple[dict[str, Any], float]:
    """Adam on minibatches with a cosine decay to a tenth, the validation NLL after every epoch; ends with the
    best epoch's weights, `patience` epochs after it at the latest."""
    x, x_val = torch.from_numpy(train), torch.from_numpy(validation)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    scheduler = cosine_decay(optimizer, cfg.epochs * steps_per_epoch, floor=0.1)
    history: dict[str, Any] = {"epochs": [], "best_epoch": 0}
    best, seconds = BestEpoch(history), 0.0
    shown = {"loss": ("nll {}", ".3f"), "val": ("val {}", ".3f")}
    with progress_bar(progress, f"{cfg.model} {cfg.name}", cfg.epochs, shown) as bar:
        for epoch in range(1, cfg.epochs + 1):
            epoch_started = time.perf_counter()
            model.train()
            order = torch.randperm(len(x), generator=generator)
            losses = []
            for i in range(steps_per_epoch):
                loss = -model.log_prob(x[order[i * cfg.batch_size:(i + 1) * cfg.batch_size]]).mean()
                optimizer_step(optimizer, loss, model.parameters(), cfg.grad_clip)
                scheduler.step()
                losses.append(float(loss.detach()))
            seconds += time.perf_counter() - epoch_started
            model.eval()
            with torch.no_grad():
                val = float(-model.log_prob(x_val).mean())
            history["epochs"].append({"epoch": epoch, "train_nll": float(np.mean(losses)), "validation_nll": val})
            best.offer(model, epoch, val)  # a diverged (NaN) epoch is never kept
            bar(epoch, {"loss": float(np.mean(losses)), "val": val})
            if best.stale(epoch, cfg.patience):
                history["stopped_early_at"] = epoch  # tiny tables overfit fast; the best epoch is long past
                break
    if best.state is None:
        raise RuntimeError(f"{cfg.model} {cfg.name!r}: the validation NLL was never finite; lower the learning rate")
    best.restore(model)
    history["training_seconds"] = round(seconds, 2)
    return history, seconds
