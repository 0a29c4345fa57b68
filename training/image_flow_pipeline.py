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
from genserve.models.image_flow import ImageFlowConfig, ImageRealNVP
from genserve.training.image_data import DATASETS, ImageSplit, training_data
from genserve.training.image_pipeline import grid_png
from genserve.training.runs import figure_png, pick_device, progress_bar, threads_for
from genserve.training.text_pipeline import LOSS_CURVE, TRAINING_LOG

KIND = "realnvp"  # the artifact's kind
SCORE_SEED = 0  # the dequantisation noise of evaluation, calibration (and served requests that give no seed)
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
        return _train(cfg, store, device, progress)


def _bound(model: ImageRealNVP, images: np.ndarray, k: int, device: torch.device,
           seed: int = SCORE_SEED) -> np.ndarray:
    """The importance-weighted bound (N,) in nats with k dequantisation draws per image, from a fixed seed."""
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.from_numpy(images).to(device)
    return model.importance_bound(x, k, generator).double().cpu().numpy()


def _train(cfg: ImageFlowTrainConfig, store: Path, device: torch.device, progress: bool) -> Path:
    started = time.perf_counter()
    data, train = training_data(cfg.dataset, cfg.exclude_classes, cfg.max_train_images)
    torch.manual_seed(cfg.seed)
    config = ImageFlowConfig(height=data.height, width=data.width, levels=data.levels, **cfg.architecture)
    model = ImageRealNVP(config).to(device)
    history, seconds = _fit(cfg, model, train, data.validation, device, progress)

    model.eval()
    n_pixels = model.n_pixels
    bits = n_pixels * math.log(2)
    test = data.test.images
    bounds = {k: _bound(model, test, k, device) for k in sorted(set(cfg.eval_ks) | {1})}
    metrics: dict[str, Any] = {
        "test_dequantised_nats": float(bounds[1].mean()),
        "test_bits_per_dim": -float(bounds[1].mean()) / bits,  # the standard dequantised bits/dim (k = 1)
        "test_importance_weighted_nats": {str(k): float(bounds[k].mean()) for k in cfg.eval_ks},
    }
    best_k = max(cfg.eval_ks)
    metrics["test_nll_bound_nats"] = -float(bounds[best_k].mean())  # an upper bound on -log P(x)
    metrics["test_bits_per_dim_bound"] = metrics["test_nll_bound_nats"] / bits
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
        store, kind=KIND, name=cfg.name, config=asdict(config),
        input_spec=artifact.ImageInputSpec(height=data.height, width=data.width, levels=data.levels, n_classes=0),
        training={"settings": {**asdict(cfg), "eval_ks": list(cfg.eval_ks)}, "data": data.description,
                  "split": {"train": len(train.images), "validation": len(val), "test": len(test),
                            "rule": "stratified 80/10/10, seed 0"},
                  "device": str(device), "torch_threads": torch.get_num_threads()},
        metrics=metrics, files=files, density="bound",
    )


def _fit(cfg: ImageFlowTrainConfig, model: ImageRealNVP, train: ImageSplit, validation: ImageSplit,
         device: torch.device, progress: bool) -> tuple[dict[str, Any], float]:
    images = torch.from_numpy(train.images).to(device)
    order_generator = torch.Generator().manual_seed(cfg.seed)
    noise_generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)) if cfg.cosine else 1.0)
    bits = model.n_pixels * math.log(2)
    history: dict[str, Any] = {"n_pixels": model.n_pixels, "train": [], "epochs": [], "best_epoch": 0}
    best_state, best_val, seconds, step = None, math.inf, 0.0, 0
    shown = {"loss": ("train bits/dim {}", ".3f"), "val": ("val bits/dim {}", ".3f")}
    with progress_bar(progress, f"realnvp {cfg.name}", total_steps, shown) as bar:
        for epoch in range(1, cfg.epochs + 1):
            epoch_started = time.perf_counter()
            model.train()
            order = torch.randperm(len(images), generator=order_generator).to(device)
            for i in range(steps_per_epoch):
                batch = images[order[i * cfg.batch_size:(i + 1) * cfg.batch_size]]
                nll = -model.dequantised_log_prob(batch, noise_generator).mean()  # nats per image
                loss = nll / model.n_pixels
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                train_bpd = float(nll.detach()) / bits
                history["train"].append([step, train_bpd])
                bar(step, {"loss": train_bpd})
            seconds += time.perf_counter() - epoch_started
            model.eval()
            val = -float(_bound(model, validation.images, 1, device).mean()) / bits
            history["epochs"].append({"epoch": epoch, "step": step, "validation_bits_per_dim": val,
                                      "seconds": round(seconds, 2)})
            bar(step, {"val": val})
            if val < best_val or best_state is None:
                best_val, history["best_epoch"] = val, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    history["training_seconds"] = round(seconds, 2)
    return history, seconds


def loss_curve_png(history: dict[str, Any], cfg: ImageFlowTrainConfig) -> bytes:
    """Training bits/dim by step (one dequantisation draw per batch) and validation bits/dim by epoch."""

    def draw(ax) -> None:
        rows = np.array(history["train"], dtype=float).reshape(-1, 2)
        if len(rows):
            ax.plot(rows[:, 0], rows[:, 1], lw=0.6, alpha=0.6, label="train (dequantised)")
        epochs = history["epochs"]
        ax.plot([e["step"] for e in epochs], [e["validation_bits_per_dim"] for e in epochs], "o-", ms=3,
                label="validation (dequantised)")
        ax.set_xlabel("step")
        ax.set_ylabel("bits/dim")
        arch = cfg.architecture
        ax.set_title(f"{cfg.name}: RealNVP, {arch['n_blocks']} blocks x {arch['n_scales'] + 1} stages, "
                     f"{arch['channels']} channels", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    return figure_png(draw)
