"""What the two image families with a bound on log p(x) share, the VAE (vae_pipeline.py) and RealNVP on images
(image_flow_pipeline.py): importance-weighted bounds from a fixed seed, and the pieces of their runs besides the
fit and the test metrics: data, the validation bound that calibrates, and an artifact with `density: bound`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from genserve.artifacts import artifact
from genserve.training.image_data import calibrate_images, split_sizes, training_data
from genserve.training.loop import FamilyRun, Fitted, calibration_files
from genserve.training.reporting import grid_png, log_files

SCORE_SEED = 0  # the draws of evaluation and calibration (and of served requests that give no seed)


def importance_bound(model: nn.Module, images: np.ndarray, k: int, device: torch.device,
                     seed: int = SCORE_SEED) -> np.ndarray:
    """The importance-weighted bound (N,) in nats with k samples per image, from a fixed seed."""
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.from_numpy(images).to(device)
    return model.importance_bound(x, k, generator).double().cpu().numpy()


class BoundImageRun(FamilyRun, ABC):
    """The pieces of the shared run (training/loop.py) that a VAE's and an image flow's have in common. A subclass
    names its `kind` and supplies `fit`, `evaluate` (its test metrics, then `validation_metrics`) and
    `loss_curve`."""

    kind: str

    def prepare(self) -> None:
        cfg = self.cfg
        self.data, self.train = training_data(cfg.dataset, cfg.exclude_classes, cfg.max_train_images)

    def validation_metrics(self, model: nn.Module) -> dict[str, Any]:
        """The validation split's bound with `score_samples` samples: what a served request reports, so what
        calibrates."""
        cfg = self.cfg
        self.validation_log_probs = importance_bound(model, self.data.validation.images, cfg.score_samples,
                                                     self.device)
        return {"validation_bound_nats": float(self.validation_log_probs.mean()), "score_samples": cfg.score_samples}

    def calibrate(self, fitted: Fitted, metrics: dict[str, Any]) -> dict[str, bytes]:
        calibration, reference, neighbours, gaussians = calibrate_images(
            self.validation_log_probs, fitted.module.n_pixels, self.data, self.train)
        return calibration_files(calibration, reference, metrics, neighbours, gaussians)

    @abstractmethod
    def fit(self) -> Fitted: ...

    @abstractmethod
    def evaluate(self, fitted: Fitted) -> dict[str, Any]: ...

    @abstractmethod
    def loss_curve(self, history: dict[str, Any]) -> bytes: ...

    def export(self, fitted: Fitted, metrics: dict[str, Any], files: dict[str, bytes]) -> Path:
        cfg, data = self.cfg, self.data
        model = fitted.module.cpu()
        grid = grid_png(model.sample(cfg.grid_size**2, torch.Generator().manual_seed(cfg.seed)).numpy(), data.levels,
                        cfg.grid_size)
        metrics.update({
            "parameters": sum(p.numel() for p in model.parameters()),
            "epochs": cfg.epochs,
            "best_epoch": fitted.history["best_epoch"],
            "training_seconds": round(fitted.seconds, 2),
            "train_images": len(self.train.images),
            "total_seconds": round(time.perf_counter() - self.started, 2),
        })
        files = {artifact.WEIGHTS: artifact.module_weights(model), **files, artifact.SAMPLES_PNG: grid,
                 **log_files(fitted.history, self.loss_curve(fitted.history))}
        return artifact.write_artifact(
            self.store, kind=self.kind, name=cfg.name, config=asdict(model.config),
            input_spec=artifact.ImageInputSpec(height=data.height, width=data.width, levels=data.levels, n_classes=0),
            training={"settings": {**asdict(cfg), "eval_ks": list(cfg.eval_ks)}, "data": data.description,
                      "split": split_sizes(data, self.train), "device": str(self.device),
                      "torch_threads": torch.get_num_threads()},
            metrics=metrics, files=files, density="bound",
        )
