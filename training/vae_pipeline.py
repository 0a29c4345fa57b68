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

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genserve.artifacts import artifact
from genserve.artifacts.calibration import CalibrationSet
from genserve.artifacts.reference import fit_local_pixels, reference_files
from genserve.artifacts.scores import compute_scores, png_bits
from genserve.models.vae import ConvVAE, VAEConfig, beta_elbo_loss, kl_weight
from genserve.training.image_data import DATASETS, ImageSplit, training_data
from genserve.training.image_pipeline import grid_png
from genserve.training.runs import figure_png, pick_device, progress_bar, threads_for
from genserve.training.text_pipeline import LOSS_CURVE, TRAINING_LOG

SCORE_SEED = 0  # the importance samples of calibration (and of served requests that give no seed)
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
        return _train_vae(cfg, store, device, progress)


def _bound(model: ConvVAE, images: np.ndarray, k: int, device: torch.device, seed: int = SCORE_SEED) -> np.ndarray:
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.from_numpy(images).to(device)
    return model.importance_bound(x, k, generator).double().cpu().numpy()


def _elbo(model: ConvVAE, images: np.ndarray, device: torch.device, seed: int = SCORE_SEED) -> np.ndarray:
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        return model.elbo(torch.from_numpy(images).to(device), generator)[0].double().cpu().numpy()


def _train_vae(cfg: VAETrainConfig, store: Path, device: torch.device, progress: bool) -> Path:
    started = time.perf_counter()
    data, train = training_data(cfg.dataset, cfg.exclude_classes, cfg.max_train_images)
    torch.manual_seed(cfg.seed)
    config = VAEConfig(height=data.height, width=data.width, levels=data.levels, **cfg.architecture)
    model = ConvVAE(config).to(device)
    history, seconds = _fit(cfg, model, train, data.validation, device, progress)

    model.eval()
    n_pixels = model.n_pixels
    bits = n_pixels * math.log(2)
    test = data.test.images
    metrics: dict[str, Any] = {"test_elbo_nats": float(_elbo(model, test, device).mean())}
    metrics["test_importance_weighted_nats"] = {str(k): float(_bound(model, test, k, device).mean())
                                                for k in cfg.eval_ks}
    best_k = str(max(cfg.eval_ks))
    metrics["test_nll_bound_nats"] = -metrics["test_importance_weighted_nats"][best_k]  # an upper bound on the NLL
    metrics["test_bits_per_dim_bound"] = metrics["test_nll_bound_nats"] / bits
    metrics["test_elbo_bits_per_dim"] = -metrics["test_elbo_nats"] / bits
    val = data.validation.images
    val_lp = _bound(model, val, cfg.score_samples, device)
    reference = fit_local_pixels(train.images, data.levels)
    calibration = CalibrationSet.fit(compute_scores(
        "image", val_lp, n_pixels, reference_log_prob=reference.log_prob(torch.from_numpy(val)).numpy(),
        complexity_bits=png_bits(val, data.levels)))
    model = model.cpu()
    grid = grid_png(model.sample(cfg.grid_size**2, torch.Generator().manual_seed(cfg.seed)).numpy(), data.levels,
                    cfg.grid_size)
    metrics.update({
        "validation_bound_nats": float(val_lp.mean()),
        "score_samples": cfg.score_samples,
        "anomaly_thresholds": {k: c.threshold for k, c in calibration.scores.items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": cfg.epochs,
        "best_epoch": history["best_epoch"],
        "training_seconds": round(seconds, 2),
        "train_images": len(train.images),
        "total_seconds": round(time.perf_counter() - started, 2),
    })
    files = {
        artifact.WEIGHTS: artifact.module_weights(model),
        artifact.CALIBRATION: json.dumps(calibration.to_dict()).encode(),
        **reference_files(reference),
        artifact.SAMPLES_PNG: grid,
        LOSS_CURVE: loss_curve_png(history, cfg),
        TRAINING_LOG: json.dumps(history, indent=1).encode(),
    }
    return artifact.write_artifact(
        store, kind="vae", name=cfg.name, config=asdict(config),
        input_spec=artifact.ImageInputSpec(height=data.height, width=data.width, levels=data.levels, n_classes=0),
        training={"settings": {**asdict(cfg), "eval_ks": list(cfg.eval_ks)}, "data": data.description,
                  "split": {"train": len(train.images), "validation": len(val), "test": len(test),
                            "rule": "stratified 80/10/10, seed 0"},
                  "device": str(device), "torch_threads": torch.get_num_threads()},
        metrics=metrics, files=files, density="bound",
    )


def _fit(cfg: VAETrainConfig, model: ConvVAE, train: ImageSplit, validation: ImageSplit, device: torch.device,
         progress: bool) -> tuple[dict[str, Any], float]:
    images = torch.from_numpy(train.images).to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    history: dict[str, Any] = {"n_pixels": model.n_pixels, "train": [], "epochs": [], "best_epoch": 0,
                               "warmup_steps": warmup_steps}
    best_state, best_val, seconds, step = None, -math.inf, 0.0, 0
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
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
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
            eligible = step >= warmup_steps or epoch == cfg.epochs
            if eligible and (val > best_val or best_state is None):
                best_val, history["best_epoch"] = val, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    history["training_seconds"] = round(seconds, 2)
    return history, seconds


def loss_curve_png(history: dict[str, Any], cfg: VAETrainConfig) -> bytes:
    """The two terms of the ELBO by step (-E_q log p(x|z) and the KL, nats per image), the validation ELBO's
    negative by epoch, and the KL weight."""

    def draw(ax) -> None:
        rows = np.array(history["train"], dtype=float).reshape(-1, 4)
        if len(rows):
            ax.plot(rows[:, 0], -rows[:, 1], lw=0.6, alpha=0.6, label="reconstruction -E log p(x|z)")
            ax.plot(rows[:, 0], rows[:, 2], lw=0.6, alpha=0.6, label="KL(q(z|x) || p(z))")
        epochs = history["epochs"]
        ax.plot([e["step"] for e in epochs], [-e["validation_elbo"] for e in epochs], "o-", ms=3,
                label="validation -ELBO")
        if history["warmup_steps"]:
            ax.axvline(history["warmup_steps"], color="grey", lw=0.8, ls="--", label="KL warm-up ends")
        ax.set_xlabel("step")
        ax.set_ylabel("nats per image")
        ax.set_title(f"{cfg.name}: VAE, latent {cfg.architecture['latent_dim']}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    return figure_png(draw)
