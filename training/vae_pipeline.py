"""`genserve train vae`: a convolutional VAE on binarised MNIST or the 8x8 digits, by the ELBO with a KL warm-up.

Data as for the autoregressive image models (training/image_data.py: fixed stratified splits). Training: Adam,
minibatches of the training split, the objective E_q log p(x | z) - beta KL(q(z | x) || p(z)) with beta rising
linearly from 0 to 1 over the first `warmup_epochs` (models/vae.py `kl_weight`), so the decoder learns to use the
code before the KL pulls the posterior to the prior; from then on it is the ELBO itself. Every step's
reconstruction and KL terms are recorded (the training curves), the validation ELBO after every epoch; the best
epoch after the warm-up is kept.

Evaluation on the test split: the ELBO and the importance-weighted bound for each K of `eval_ks` (1 to 1000 by
default), in nats and bits/dim: lower bounds on log p(x) that tighten as K grows. The validation split calibrates
every anomaly score type on the importance-weighted bound with `score_samples` samples (16), the K a served
request uses unless it asks for another, drawn from a fixed seed. The artifact says `density: bound`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genserve.artifacts import artifact
from genserve.models.vae import ConvVAE, VAEConfig, beta_elbo_loss, kl_weight
from genserve.training.image_data import DATASETS, ImageSplit
from genserve.training.latent import SCORE_SEED, BoundImageRun, importance_bound
from genserve.training.loop import BestEpoch, Fitted, optimizer_step, pick_device, run_family, threads_for
from genserve.training.reporting import progress_bar, vae_loss_curve

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {d: dict(arch=dict(latent_dim=4, channels=8, hidden=32), epochs=2, batch_size=64, learning_rate=3e-3,
                     warmup_epochs=1, eval_ks=(1, 10)) for d in DATASETS},
    # Minutes on 2 CPU cores.
    "default": {
        "mnist5k": dict(arch=dict(latent_dim=16, channels=32, hidden=256), epochs=40, batch_size=64,
                        learning_rate=1e-3, warmup_epochs=10, eval_ks=(1, 10, 100, 1000)),
        "digits": dict(arch=dict(latent_dim=8, channels=16, hidden=128), epochs=150, batch_size=32,
                       learning_rate=1e-3, warmup_epochs=30, eval_ks=(1, 10, 100, 1000)),
    },
}


@dataclass
class VAETrainConfig:
    dataset: str  # mnist5k | digits
    name: str
    preset: str = "default"
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    warmup_epochs: int | None = None  # epochs over which the KL weight rises from 0 to 1
    architecture: dict[str, Any] | None = None  # overrides: latent_dim, channels, hidden
    eval_ks: tuple[int, ...] | None = None  # importance samples of the test split's bounds
    score_samples: int = 16  # K of the served and calibrated bound
    max_train_images: int | None = None
    exclude_classes: list[int] | None = None
    grad_clip: float = 5.0
    grid_size: int = 8
    seed: int = 0
    device: str | None = None
    threads: int | None = None

    def resolved(self) -> VAETrainConfig:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown image dataset {self.dataset!r}; use one of: {', '.join(DATASETS)}")
        if self.preset not in PRESETS or self.dataset not in PRESETS[self.preset]:
            raise ValueError(f"unknown preset {self.preset!r}; use one of: {', '.join(PRESETS)}")
        p = PRESETS[self.preset][self.dataset]
        cfg = replace(self, architecture={**p["arch"], **(self.architecture or {})},
                      **{k: p[k] if getattr(self, k) is None else getattr(self, k)
                         for k in ("epochs", "batch_size", "learning_rate", "warmup_epochs", "eval_ks")})
        cfg.eval_ks = tuple(cfg.eval_ks)
        for field in ("epochs", "batch_size", "score_samples"):
            if getattr(cfg, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(cfg, field)}")
        if cfg.warmup_epochs < 0 or not cfg.learning_rate > 0 or min(cfg.eval_ks) < 1:
            raise ValueError("warmup_epochs must be >= 0, learning_rate > 0 and every eval K >= 1")
        artifact.validate_name(cfg.name)
        return cfg


def train_vae(cfg: VAETrainConfig, store: Path, progress: bool = True) -> Path:
    """Train, evaluate, calibrate and write a VAE artifact; returns its directory."""
    cfg = cfg.resolved()
    device = pick_device(cfg.device)
    with threads_for(device, cfg.threads):
        return run_family(VAERun(cfg, store, device, progress))


def _elbo(model: ConvVAE, images: np.ndarray, device: torch.device, seed: int = SCORE_SEED) -> np.ndarray:
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        return model.elbo(torch.from_numpy(images).to(device), generator)[0].double().cpu().numpy()


class VAERun(BoundImageRun):
    """The VAE's pieces of the shared run (training/loop.py); the rest are latent.BoundImageRun's."""

    kind = "vae"

    def fit(self) -> Fitted:
        cfg, data = self.cfg, self.data
        torch.manual_seed(cfg.seed)
        model = ConvVAE(VAEConfig(height=data.height, width=data.width, levels=data.levels, **cfg.architecture))
        model = model.to(self.device)
        history, seconds = _fit(cfg, model, self.train, data.validation, self.device, self.progress)
        return Fitted(model, history, seconds)

    def evaluate(self, fitted: Fitted) -> dict[str, Any]:
        """The test split's ELBO and importance-weighted bounds (nats, bits/dim), then the validation bound."""
        cfg, model, device = self.cfg, fitted.module, self.device
        bits = model.n_pixels * math.log(2)
        test = self.data.test.images
        metrics: dict[str, Any] = {"test_elbo_nats": float(_elbo(model, test, device).mean())}
        metrics["test_importance_weighted_nats"] = {str(k): float(importance_bound(model, test, k, device).mean())
                                                    for k in cfg.eval_ks}
        best_k = str(max(cfg.eval_ks))
        metrics["test_nll_bound_nats"] = -metrics["test_importance_weighted_nats"][best_k]  # an upper bound on the NLL
        metrics["test_bits_per_dim_bound"] = metrics["test_nll_bound_nats"] / bits
        metrics["test_elbo_bits_per_dim"] = -metrics["test_elbo_nats"] / bits
        return {**metrics, **self.validation_metrics(model)}

    def loss_curve(self, history: dict[str, Any]) -> bytes:
        return vae_loss_curve(history, f"{self.cfg.name}: VAE, latent {self.cfg.architecture['latent_dim']}")


def _fit(cfg: VAETrainConfig, model: ConvVAE, train: ImageSplit, validation: ImageSplit, device: torch.device,
         progress: bool) -> tuple[dict[str, Any], float]:
    """Adam on the beta-ELBO, beta rising over the warm-up; ends with the best epoch's weights after it."""
    images = torch.from_numpy(train.images).to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    history: dict[str, Any] = {"n_pixels": model.n_pixels, "train": [], "epochs": [], "best_epoch": 0,
                               "warmup_steps": warmup_steps}
    best, seconds, step = BestEpoch(history, maximise=True, keep_first=True), 0.0, 0
    shown = {"loss": ("-elbo {}", ".1f"), "val": ("val elbo {}", ".1f")}
    with progress_bar(progress, f"vae {cfg.name}", cfg.epochs * steps_per_epoch, shown) as bar:
        for epoch in range(1, cfg.epochs + 1):
            epoch_started = time.perf_counter()
            model.train()
            order = torch.randperm(len(images), generator=generator).to(device)
            for i in range(steps_per_epoch):
                beta = kl_weight(step, warmup_steps)
                loss, reconstruction, kl = beta_elbo_loss(model, images[order[i * cfg.batch_size:
                                                                             (i + 1) * cfg.batch_size]], beta)
                optimizer_step(optimizer, loss, model.parameters(), cfg.grad_clip)
                step += 1
                history["train"].append([step, float(reconstruction.detach()), float(kl.detach()), beta])
                bar(step, {"loss": float((kl - reconstruction).detach())})
            seconds += time.perf_counter() - epoch_started
            model.eval()
            val = float(_elbo(model, validation.images, device).mean())
            history["epochs"].append({"epoch": epoch, "step": step, "validation_elbo": val, "beta": beta,
                                      "seconds": round(seconds, 2)})
            bar(step, {"val": val})
            # Only epochs that optimised the ELBO itself (after the warm-up) compete; the last one if none did.
            if step >= warmup_steps or epoch == cfg.epochs:
                best.offer(model, epoch, val)
    best.restore(model)
    history["training_seconds"] = round(seconds, 2)
    return history, seconds
