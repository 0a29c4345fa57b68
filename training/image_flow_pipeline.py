"""Training of RealNVP on grey-level images (models/image_flow.py): uniform dequantisation, bits/dim, bounds.

Data as for the other image models (training/image_data.py: fixed stratified splits). Training: Adam with a cosine
decay of the learning rate, minibatches of the training split, the loss the negative mean dequantised
log-likelihood per pixel, -mean(log p((x + u) / levels) - D log levels) / D, with a fresh u ~ U[0, 1)^D every batch.
Every step's training bits/dim is recorded, the validation split's (one fixed draw of u) after every epoch; the
best epoch is kept.

Evaluation on the test split: `test_bits_per_dim` is the standard dequantised bits/dim, -E_u[log p(x + u)
- D log levels] / (D ln 2) from one draw per image (k = 1): an upper bound, in expectation, on the discrete images'
-log2 P(x) per pixel. `test_importance_weighted_nats` gives the importance-weighted bound (uniform dequantisation
as the proposal) for each K of `eval_ks`, lower bounds on log P(x) that tighten as K grows; the tightest gives
`test_nll_bound_nats` and `test_bits_per_dim_bound`. The validation split calibrates every anomaly score type on
the bound with `score_samples` samples (16), the K of a served request that asks for none, from a fixed seed.
The model's density is exact for the continuous dequantised variable only, so the artifact says `density: bound`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from genserve.artifacts import artifact
from genserve.models.image_flow import ImageFlowConfig, ImageRealNVP
from genserve.training.image_data import DATASETS, ImageSplit
from genserve.training.latent import BoundImageRun, importance_bound
from genserve.training.loop import BestEpoch, Fitted, cosine_decay, optimizer_step, pick_device, run_family, threads_for
from genserve.training.reporting import flow_loss_curve, progress_bar

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {d: dict(arch=dict(n_blocks=2, channels=8, n_scales=1), epochs=2, batch_size=64, learning_rate=3e-3,
                     eval_ks=(1, 10)) for d in DATASETS},
    # Minutes on 2 CPU cores.
    "default": {
        "mnist5k": dict(arch=dict(n_blocks=4, channels=32, n_scales=2), epochs=20, batch_size=64,
                        learning_rate=1e-3, eval_ks=(1, 10, 100)),
        "digits": dict(arch=dict(n_blocks=4, channels=32, n_scales=2), epochs=60, batch_size=32,
                       learning_rate=1e-3, eval_ks=(1, 10, 100)),
    },
}


@dataclass
class ImageFlowTrainConfig:
    dataset: str  # mnist5k | digits
    name: str
    preset: str = "default"
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    architecture: dict[str, Any] | None = None  # overrides: n_blocks, channels, n_scales, alpha
    eval_ks: tuple[int, ...] | None = None  # importance samples of the test split's bounds
    score_samples: int = 16  # K of the served and calibrated bound
    cosine: bool = True  # cosine decay of the learning rate to 0 over the run
    max_train_images: int | None = None
    exclude_classes: list[int] | None = None
    grad_clip: float = 5.0
    grid_size: int = 8
    seed: int = 0
    device: str | None = None
    threads: int | None = None

    def resolved(self) -> ImageFlowTrainConfig:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown image dataset {self.dataset!r}; use one of: {', '.join(DATASETS)}")
        if self.preset not in PRESETS or self.dataset not in PRESETS[self.preset]:
            raise ValueError(f"unknown preset {self.preset!r}; use one of: {', '.join(PRESETS)}")
        p = PRESETS[self.preset][self.dataset]
        cfg = replace(self, architecture={**p["arch"], **(self.architecture or {})},
                      **{k: p[k] if getattr(self, k) is None else getattr(self, k)
                         for k in ("epochs", "batch_size", "learning_rate", "eval_ks")})
        cfg.eval_ks = tuple(cfg.eval_ks)
        for field in ("epochs", "batch_size", "score_samples"):
            if getattr(cfg, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(cfg, field)}")
        if not cfg.learning_rate > 0 or min(cfg.eval_ks) < 1:
            raise ValueError("learning_rate must be > 0 and every eval K >= 1")
        artifact.validate_name(cfg.name)
        return cfg


def train_image_flow(cfg: ImageFlowTrainConfig, store: Path, progress: bool = True) -> Path:
    """Train, evaluate, calibrate and write an image RealNVP artifact; returns its directory."""
    cfg = cfg.resolved()
    device = pick_device(cfg.device)
    with threads_for(device, cfg.threads):
        return run_family(ImageFlowRun(cfg, store, device, progress))


class ImageFlowRun(BoundImageRun):
    """The image RealNVP's pieces of the shared run (training/loop.py); the rest are latent.BoundImageRun's."""

    kind = "realnvp"  # the artifact's kind: a latent image model (a records RealNVP is records_pipeline.py's)

    def fit(self) -> Fitted:
        cfg, data = self.cfg, self.data
        torch.manual_seed(cfg.seed)
        config = ImageFlowConfig(height=data.height, width=data.width, levels=data.levels, **cfg.architecture)
        model = ImageRealNVP(config).to(self.device)
        history, seconds = _fit(cfg, model, self.train, data.validation, self.device, self.progress)
        return Fitted(model, history, seconds)

    def evaluate(self, fitted: Fitted) -> dict[str, Any]:
        """The test split's dequantised bits/dim and importance-weighted bounds, then the validation bound."""
        cfg, model = self.cfg, fitted.module
        bits = model.n_pixels * math.log(2)
        test = self.data.test.images
        bounds = {k: importance_bound(model, test, k, self.device) for k in sorted(set(cfg.eval_ks) | {1})}
        metrics: dict[str, Any] = {
            "test_dequantised_nats": float(bounds[1].mean()),
            "test_bits_per_dim": -float(bounds[1].mean()) / bits,  # the standard dequantised bits/dim (k = 1)
            "test_importance_weighted_nats": {str(k): float(bounds[k].mean()) for k in cfg.eval_ks},
        }
        metrics["test_nll_bound_nats"] = -float(bounds[max(cfg.eval_ks)].mean())  # an upper bound on -log P(x)
        metrics["test_bits_per_dim_bound"] = metrics["test_nll_bound_nats"] / bits
        return {**metrics, **self.validation_metrics(model)}

    def loss_curve(self, history: dict[str, Any]) -> bytes:
        arch = self.cfg.architecture
        return flow_loss_curve(history, f"{self.cfg.name}: RealNVP, {arch['n_blocks']} blocks x "
                                        f"{arch['n_scales'] + 1} stages, {arch['channels']} channels")


def _fit(cfg: ImageFlowTrainConfig, model: ImageRealNVP, train: ImageSplit, validation: ImageSplit,
         device: torch.device, progress: bool) -> tuple[dict[str, Any], float]:
    """Adam on the dequantised NLL, a fresh noise draw every batch; ends with the best epoch's weights."""
    images = torch.from_numpy(train.images).to(device)
    order_generator = torch.Generator().manual_seed(cfg.seed)
    noise_generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = cosine_decay(optimizer, total_steps, floor=0.0) if cfg.cosine else None
    bits = model.n_pixels * math.log(2)
    history: dict[str, Any] = {"n_pixels": model.n_pixels, "train": [], "epochs": [], "best_epoch": 0}
    best, seconds, step = BestEpoch(history, keep_first=True), 0.0, 0
    shown = {"loss": ("train bits/dim {}", ".3f"), "val": ("val bits/dim {}", ".3f")}
    with progress_bar(progress, f"realnvp {cfg.name}", total_steps, shown) as bar:
        for epoch in range(1, cfg.epochs + 1):
            epoch_started = time.perf_counter()
            model.train()
            order = torch.randperm(len(images), generator=order_generator).to(device)
            for i in range(steps_per_epoch):
                batch = images[order[i * cfg.batch_size:(i + 1) * cfg.batch_size]]
                nll = -model.dequantised_log_prob(batch, noise_generator).mean()  # nats per image
                optimizer_step(optimizer, nll / model.n_pixels, model.parameters(), cfg.grad_clip)
                if scheduler is not None:
                    scheduler.step()
                step += 1
                train_bpd = float(nll.detach()) / bits
                history["train"].append([step, train_bpd])
                bar(step, {"loss": train_bpd})
            seconds += time.perf_counter() - epoch_started
            model.eval()
            val = -float(importance_bound(model, validation.images, 1, device).mean()) / bits
            history["epochs"].append({"epoch": epoch, "step": step, "validation_bits_per_dim": val,
                                      "seconds": round(seconds, 2)})
            bar(step, {"val": val})
            best.offer(model, epoch, val)
    best.restore(model)
    history["training_seconds"] = round(seconds, 2)
    return history, seconds
