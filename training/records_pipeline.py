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

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from genserve.artifacts import artifact
from genserve.artifacts.calibration import CalibrationSet
from genserve.artifacts.reference import fit_gaussian, reference_files
from genserve.artifacts.scores import compute_scores
from genserve.models.registry import build_records_model
from genserve.training.data import Tabular, exclude_classes, load_tabular, split
from genserve.training.gmm_pipeline import standardisation
from genserve.training.onnx_export import check_onnx, export_onnx
from genserve.training.runs import figure_png, progress_bar
from genserve.training.text_pipeline import LOSS_CURVE, TRAINING_LOG

KINDS = ("realnvp", "made-mog")
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
    started = time.perf_counter()
    if data is None:
        data = load_tabular(cfg.dataset, cfg.label_column)
    if cfg.exclude_classes:
        data = exclude_classes(data, cfg.exclude_classes)
    parts = split(data.x, cfg.validation_fraction, cfg.seed)
    d = data.x.shape[1]
    mean, scale = standardisation(parts.train)
    torch.manual_seed(cfg.seed)
    model = build_records_model(cfg.model, {"n_features": d, **cfg.architecture})
    model.set_standardisation(torch.from_numpy(mean), torch.from_numpy(scale))

    history, seconds = _fit(cfg, model, parts.train, parts.validation, progress)

    with torch.no_grad():
        train_lp = model.log_prob(torch.from_numpy(parts.train)).numpy()
        val_lp = model.log_prob(torch.from_numpy(parts.validation)).numpy()
    reference = fit_gaussian(parts.train)
    with torch.no_grad():
        ref_lp = reference.log_prob(torch.from_numpy(parts.validation)).numpy()
    calibration = CalibrationSet.fit(compute_scores("records", val_lp, d, reference_log_prob=ref_lp))
    nll_cal = calibration.scores["nll"]
    metrics: dict[str, Any] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": cfg.epochs,
        "best_epoch": history["best_epoch"],
        "training_seconds": round(seconds, 2),
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
        LOSS_CURVE: loss_curve_png(history, cfg),
        TRAINING_LOG: json.dumps(history, indent=1).encode(),
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
    metrics["total_seconds"] = round(time.perf_counter() - started, 2)
    return artifact.write_artifact(
        store, kind=cfg.model, name=cfg.name, config=model.config.to_dict(),
        input_spec=artifact.InputSpec(n_features=d, feature_names=data.feature_names),
        training=training, metrics=metrics, files=files, density="exact",
    )


def _fit(cfg: RecordsTrainConfig, model: torch.nn.Module, train: np.ndarray, validation: np.ndarray,
         progress: bool) -> tuple[dict[str, Any], float]:
    x = torch.from_numpy(train)
    x_val = torch.from_numpy(validation)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    history: dict[str, Any] = {"epochs": [], "best_epoch": 0}
    best_state, best_val, seconds = None, math.inf, 0.0
    shown = {"loss": ("nll {}", ".3f"), "val": ("val {}", ".3f")}
    with progress_bar(progress, f"{cfg.model} {cfg.name}", cfg.epochs, shown) as bar:
        for epoch in range(1, cfg.epochs + 1):
            epoch_started = time.perf_counter()
            model.train()
            order = torch.randperm(len(x), generator=generator)
            losses = []
            for i in range(steps_per_epoch):
                loss = -model.log_prob(x[order[i * cfg.batch_size:(i + 1) * cfg.batch_size]]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
            seconds += time.perf_counter() - epoch_started
            model.eval()
            with torch.no_grad():
                val = float(-model.log_prob(x_val).mean())
            history["epochs"].append({"epoch": epoch, "train_nll": float(np.mean(losses)), "validation_nll": val})
            if val < best_val:  # NaN never is: a diverged epoch is never kept
                best_val, history["best_epoch"] = val, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            bar(epoch, {"loss": float(np.mean(losses)), "val": val})
            if cfg.patience and epoch - history["best_epoch"] >= cfg.patience:
                history["stopped_early_at"] = epoch  # tiny tables overfit fast; the best epoch is long past
                break
    if best_state is None:
        raise RuntimeError(f"{cfg.model} {cfg.name!r}: the validation NLL was never finite; lower the learning rate")
    model.load_state_dict(best_state)
    history["training_seconds"] = round(seconds, 2)
    return history, seconds


def loss_curve_png(history: dict[str, Any], cfg: RecordsTrainConfig) -> bytes:
    """Training and validation NLL (nats per record) by epoch, the best epoch marked."""

    def draw(ax) -> None:
        rows = history["epochs"]
        epochs = [r["epoch"] for r in rows]
        ax.plot(epochs, [r["train_nll"] for r in rows], label="train")
        ax.plot(epochs, [r["validation_nll"] for r in rows], label="validation")
        ax.axvline(history["best_epoch"], color="grey", lw=0.8, ls="--", label="best epoch")
        ax.set_xlabel("epoch")
        ax.set_ylabel("NLL (nats per record)")
        ax.set_title(f"{cfg.name}: {cfg.model}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()

    return figure_png(draw)
