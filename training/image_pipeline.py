"""`genserve train pixelcnn|made|nade|fvsbn`: fit an autoregressive image model by maximum likelihood.

Data (training/image_data.py) -> Adam with cosine decay over the epochs, one pass over the training split
per epoch -> validation NLL after every epoch, the best epoch's weights kept -> test NLL in nats and bits/dim
(exact; for a class-conditional model both log p(x | y) and the marginal log p(x)) -> anomaly calibration on
the validation split -> ONNX graph checked against torch -> artifact with a sample grid and the loss curve.

MADE is trained order-agnostically: each minibatch uses one of its fixed orderings, drawn at random; its
reported likelihood is the ensemble over all of them.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from genserve.artifacts import artifact
from genserve.artifacts.calibration import CalibrationSet
from genserve.artifacts.reference import fit_local_pixels, reference_files
from genserve.artifacts.scores import compute_scores, png_bits
from genserve.models.image import ImageModel
from genserve.models.registry import IMAGE_KINDS, build_image_model, image_classes
from genserve.training.checkpoints import LocalRun, read_checkpoint, restore_checkpoint, write_checkpoint
from genserve.training.image_data import DATASETS, ImageDataset, ImageSplit, training_data
from genserve.training.runs import figure_png, pick_device, progress_bar, threads_for
from genserve.training.text_pipeline import LOSS_CURVE, TRAINING_LOG

TRAINING_DIR = ".training"  # STORE/.training/NAME/: sample grids written during training
CHECKPOINTS = ".checkpoints"  # STORE/.checkpoints/NAME/: the last epoch's checkpoint (training/checkpoints.py)
BEST = "best.safetensors"  # in a checkpoint: the weights of the best epoch so far
# Fields that may differ between a checkpoint and the run resuming it: none of them changes what is trained.
RESUME_MAY_DIFFER = frozenset({"epochs", "device", "threads", "resume", "export_onnx", "workers", "sample_every",
                               "grid_size"})
EVAL_BATCH = 250

# Presets: per dataset and model kind, the architecture (fields of the model's config) and the optimisation.
# "default" is what `genserve serve` trains on first run and what docs/image-models.md reports (minutes on
# 2 CPU cores); "tiny" is for tests and smoke runs (seconds).
PRESETS: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    "tiny": {
        dataset: {
            "pixelcnn": dict(arch=dict(channels=8, n_layers=2, kernel_size=3, head_channels=8), epochs=1,
                             batch_size=32, learning_rate=3e-3),
            "made": dict(arch=dict(hidden=(32,), n_masks=2), epochs=1, batch_size=32, learning_rate=3e-3),
            "nade": dict(arch=dict(hidden=16), epochs=1, batch_size=32, learning_rate=3e-3),
            "fvsbn": dict(arch={}, epochs=1, batch_size=32, learning_rate=3e-3),
        }
        for dataset in DATASETS
    },
    "default": {
        # Sized for 2 CPU cores (measured idle, 2 threads): the PixelCNN about 60 s an epoch, NADE 13 s, MADE 2 s,
        # FVSBN 1 s. The PixelCNN is the `mnist` model `genserve serve` trains on first run (about 7 minutes
        # with evaluation, sampling and ONNX export); on a GPU raise its epochs and channels. Learning rates
        # from short sweeps on the validation split (FVSBN 1e-3 / 1e-2 / 3e-2: 152 / 87 / 92 nats at 40 epochs).
        "mnist5k": {
            "pixelcnn": dict(arch=dict(channels=32, n_layers=5, kernel_size=5, head_channels=64), epochs=5,
                             batch_size=32, learning_rate=3e-3),
            "made": dict(arch=dict(hidden=(512, 512), n_masks=8), epochs=80, batch_size=64, learning_rate=3e-3),
            "nade": dict(arch=dict(hidden=500), epochs=20, batch_size=64, learning_rate=3e-3),
            "fvsbn": dict(arch={}, epochs=40, batch_size=64, learning_rate=1e-2),
        },
        "digits": {
            "pixelcnn": dict(arch=dict(channels=32, n_layers=4, kernel_size=3, head_channels=64), epochs=50,
                             batch_size=32, learning_rate=2e-3),
            "made": dict(arch=dict(hidden=(256, 256), n_masks=8), epochs=150, batch_size=32, learning_rate=3e-3),
            "nade": dict(arch=dict(hidden=128), epochs=150, batch_size=32, learning_rate=3e-3),
            "fvsbn": dict(arch={}, epochs=60, batch_size=32, learning_rate=1e-2),
        },
    },
    # For a GPU (not measured here: no GPU was at hand): wider and deeper PixelCNNs, longer runs.
    "gpu": {
        "mnist5k": {
            "pixelcnn": dict(arch=dict(channels=64, n_layers=8, kernel_size=5, head_channels=128), epochs=60,
                             batch_size=64, learning_rate=1e-3),
            "made": dict(arch=dict(hidden=(1024, 1024), n_masks=16), epochs=200, batch_size=128, learning_rate=1e-3),
            "nade": dict(arch=dict(hidden=500), epochs=100, batch_size=64, learning_rate=3e-3),
            "fvsbn": dict(arch={}, epochs=100, batch_size=64, learning_rate=1e-2),
        },
        "digits": {
            "pixelcnn": dict(arch=dict(channels=64, n_layers=6, kernel_size=3, head_channels=128), epochs=200,
                             batch_size=64, learning_rate=1e-3),
            "made": dict(arch=dict(hidden=(512, 512), n_masks=16), epochs=300, batch_size=64, learning_rate=1e-3),
            "nade": dict(arch=dict(hidden=256), epochs=300, batch_size=64, learning_rate=3e-3),
            "fvsbn": dict(arch={}, epochs=100, batch_size=32, learning_rate=1e-2),
        },
    },
}


@dataclass
class ImageTrainConfig:
    """Everything an image training run depends on; None fields come from the preset."""

    model: str  # pixelcnn | made | nade | fvsbn
    dataset: str  # mnist5k | digits
    name: str
    conditional: bool = False
    preset: str = "default"
    epochs: int | None = None
    schedule_epochs: int | None = None  # the cosine decay's length in epochs; None: `epochs` (set it to stop early
    # and --resume later on the same schedule)
    batch_size: int | None = None
    learning_rate: float | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    architecture: dict[str, Any] | None = None  # overrides of the preset's architecture fields
    max_train_images: int | None = None  # a subset of the training split (smoke runs)
    exclude_classes: list[int] | None = None  # leave these classes out of every split (anomaly detection)
    sample_every: int = 5  # epochs between sample grids written to STORE/.training/NAME/ (0: only at the end)
    grid_size: int = 8  # the sample grid is grid_size x grid_size images
    seed: int = 0
    device: str | None = None
    threads: int | None = None
    export_onnx: bool = True
    resume: bool = False  # continue from the checkpoint of an interrupted run with the same settings
    # 0: train in this process; N: data-parallel on N Ray Train workers (training/distributed.py)
    workers: int = 0

    def resolved(self) -> ImageTrainConfig:
        if self.model not in IMAGE_KINDS:
            raise ValueError(f"unknown image model {self.model!r}; use one of: {', '.join(sorted(IMAGE_KINDS))}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown image dataset {self.dataset!r}; use one of: {', '.join(DATASETS)}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; use one of: {', '.join(PRESETS)}")
        preset = PRESETS[self.preset][self.dataset][self.model]
        arch = {**preset["arch"], **(self.architecture or {})}
        config_cls, _ = image_classes(self.model)
        allowed = {f.name for f in fields(config_cls)} - {"height", "width", "levels", "n_classes"}
        unknown = sorted(set(arch) - allowed)
        if unknown:
            raise ValueError(f"{self.model} has no architecture fields {unknown}; it has: {', '.join(sorted(allowed))}")
        cfg = replace(
            self, architecture=arch,
            epochs=self.epochs if self.epochs is not None else preset["epochs"],
            batch_size=self.batch_size if self.batch_size is not None else preset["batch_size"],
            learning_rate=self.learning_rate if self.learning_rate is not None else preset["learning_rate"],
        )
        if cfg.schedule_epochs is None:
            cfg.schedule_epochs = cfg.epochs
        for field in ("epochs", "schedule_epochs", "batch_size"):
            if getattr(cfg, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(cfg, field)}")
        if not cfg.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {cfg.learning_rate}")
        if cfg.exclude_classes and cfg.conditional:
            raise ValueError("exclude_classes is for unconditional models: a class-conditional model's prior "
                             "would give the excluded classes probability 0")
        if cfg.workers < 0:
            raise ValueError(f"workers must be 0 (this process) or a positive number of Ray Train workers, "
                             f"got {cfg.workers}")
        if cfg.workers and cfg.batch_size % cfg.workers:
            raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of workers {cfg.workers}: each "
                             f"worker takes an equal share of every batch")
        artifact.validate_name(cfg.name)
        return cfg

    def model_config(self, data: ImageDataset) -> dict[str, Any]:
        return {"height": data.height, "width": data.width, "levels": data.levels,
                "n_classes": data.n_classes if self.conditional else 0, **(self.architecture or {})}


# ---- likelihoods --------------------------------------------------------------------------------------------------


class ImageNLL(nn.Module):
    """Mean -log p(x | y) over a batch, nats per image, as a module's forward: what DistributedDataParallel wraps
    (it synchronises gradients only for work done through forward)."""

    def __init__(self, model: ImageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, labels: Tensor | None, mask: int | None) -> Tensor:
        if mask is not None:
            log_prob, _ = self.model.score_with_mask(x, labels, mask)
        else:
            log_prob, _ = self.model.score_given(x, labels)
        return -log_prob.mean()


def draw_mask(model: ImageModel, generator: torch.Generator) -> int | None:
    """MADE: one of its orderings, drawn per batch (order-agnostic training); other models have one."""
    n_masks = getattr(model, "n_masks", None)
    return int(torch.randint(n_masks, (1,), generator=generator)) if n_masks else None


@torch.no_grad()
def split_log_probs(model: ImageModel, split: ImageSplit, device: torch.device, given_labels: bool) -> np.ndarray:
    """log p(x | y) (given_labels) or log p(x) for every image of a split, nats, in batches."""
    out = []
    for start in range(0, len(split.images), EVAL_BATCH):
        x = torch.from_numpy(split.images[start:start + EVAL_BATCH]).to(device)
        y = torch.from_numpy(split.labels[start:start + EVAL_BATCH]).to(device) if given_labels else None
        out.append(model.log_prob(x, y).double().cpu().numpy())
    return np.concatenate(out)


def nll_metrics(log_probs: np.ndarray, n_pixels: int, prefix: str) -> dict[str, float]:
    nll = float(-log_probs.mean())
    return {f"{prefix}_nll_nats": nll, f"{prefix}_bits_per_dim": nll / (n_pixels * math.log(2))}


# ---- training -----------------------------------------------------------------------------------------------------


def training_dir(store: Path, name: str) -> Path:
    return store / TRAINING_DIR / name


def train_image(cfg: ImageTrainConfig, store: Path, progress: bool = True, checkpoints: str | None = None) -> Path:
    """Train, evaluate, calibrate and export an image model; returns the new artifact's directory. With
    `cfg.workers`, Ray Train keeps its checkpoints under `checkpoints` (default STORE/.checkpoints/ray)."""
    cfg = cfg.resolved()
    device = pick_device(None if cfg.workers else cfg.device)  # distributed: `device` is the workers'
    checkpoints = checkpoints or str((store / CHECKPOINTS / "ray").resolve())
    with threads_for(device, cfg.threads):
        return _train_image(cfg, store, device, progress, checkpoints)


def _comparable(cfg: ImageTrainConfig) -> dict[str, Any]:
    return {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k not in RESUME_MAY_DIFFER}


def image_module(cfg: ImageTrainConfig, data: ImageDataset, train: ImageSplit, device: torch.device) -> ImageModel:
    """The untrained module of a run, initialised from the run's seed."""
    torch.manual_seed(cfg.seed)
    model = build_image_model(cfg.model, cfg.model_config(data)).to(device)
    if cfg.conditional:
        model.set_class_prior(torch.from_numpy(train.labels).to(device))
    return model


def _train_image(cfg: ImageTrainConfig, store: Path, device: torch.device, progress: bool, checkpoints: str) -> Path:
    started = time.perf_counter()
    data, train = training_data(cfg.dataset, cfg.exclude_classes, cfg.max_train_images)
    saved = saved_files = None
    if cfg.resume:
        if cfg.workers:
            from genserve.training.distributed import latest_checkpoint

            saved, saved_files = latest_checkpoint(checkpoints, cfg.name)
        else:
            saved, saved_files = read_checkpoint(store / CHECKPOINTS / cfg.name)
        differ = [f"{k} (checkpoint {saved['config'].get(k)!r}, now {v!r})"
                  for k, v in _comparable(cfg).items() if saved["config"].get(k) != v]
        if differ:
            raise ValueError(f"cannot resume {cfg.name!r}: the configuration differs from the checkpoint's in "
                             f"{'; '.join(differ)}. Run with the checkpoint's settings, or without --resume")
    model = image_module(cfg, data, train, device)
    n_parameters = sum(p.numel() for p in model.parameters())
    out_dir = training_dir(store, cfg.name)
    out_dir.mkdir(parents=True, exist_ok=True)

    if cfg.workers:
        from genserve.training.distributed import train_image_data_parallel

        model, history, train_seconds = train_image_data_parallel(cfg, data, train, device, checkpoints,
                                                                  resume=saved is not None)
    else:
        run = LocalRun(store / CHECKPOINTS / cfg.name)
        model, history, train_seconds = _fit(cfg, model, data, train, device, out_dir, progress, run, saved,
                                             saved_files)

    model.eval()
    evaluation_started = time.perf_counter()
    metrics: dict[str, Any] = {}
    test_lp = split_log_probs(model, data.test, device, given_labels=False)
    metrics.update(nll_metrics(test_lp, model.n_pixels, "test"))
    val_lp = split_log_probs(model, data.validation, device, given_labels=False)
    metrics.update(nll_metrics(val_lp, model.n_pixels, "validation"))
    if cfg.conditional:
        given = split_log_probs(model, data.test, device, given_labels=True)
        metrics.update(nll_metrics(given, model.n_pixels, "test_given_label"))
    metrics["evaluation_seconds"] = round(time.perf_counter() - evaluation_started, 2)
    reference = fit_local_pixels(train.images, data.levels)
    images = data.validation.images
    calibration = CalibrationSet.fit(compute_scores(
        "image", val_lp, model.n_pixels, reference_log_prob=reference.log_prob(torch.from_numpy(images)).numpy(),
        complexity_bits=png_bits(images, data.levels)))
    metrics["anomaly_thresholds"] = {k: c.threshold for k, c in calibration.scores.items()}

    model = model.cpu().float()
    grid = sample_grid(model, cfg, torch.Generator().manual_seed(cfg.seed))
    (out_dir / artifact.SAMPLES_PNG).write_bytes(grid)
    files = {
        artifact.WEIGHTS: artifact.module_weights(model),
        artifact.CALIBRATION: json.dumps(calibration.to_dict()).encode(),
        **reference_files(reference),
        artifact.SAMPLES_PNG: grid,
        LOSS_CURVE: loss_curve_png(history, cfg),
        TRAINING_LOG: json.dumps(history, indent=1).encode(),
    }
    if cfg.export_onnx:
        from genserve.training.onnx_export import check_image_onnx, export_image_onnx

        files[artifact.ONNX] = export_image_onnx(model)
        metrics["onnx_max_abs_error"] = check_image_onnx(model, files[artifact.ONNX])
    metrics.update({
        "parameters": n_parameters,
        "training_seconds": round(train_seconds, 2),
        "epochs": cfg.epochs,
        "best_epoch": history["best_epoch"],
        "train_images": len(train.images),
        "total_seconds": round(time.perf_counter() - started, 2),
    })
    return artifact.write_artifact(
        store, kind=cfg.model, name=cfg.name, config=asdict(model.config),
        input_spec=artifact.ImageInputSpec(height=data.height, width=data.width, levels=data.levels,
                                           n_classes=model.n_classes,
                                           class_names=data.class_names if cfg.conditional else None),
        training={"settings": asdict(cfg), "data": data.description,
                  "split": {"train": len(train.images), "validation": len(data.validation.images),
                            "test": len(data.test.images), "rule": "stratified 80/10/10, seed 0"},
                  "device": str(device), "torch_threads": torch.get_num_threads()},
        metrics=metrics, files=files,
    )


def _fit(cfg: ImageTrainConfig, model: ImageModel, data: ImageDataset, train: ImageSplit, device: torch.device,
         out_dir: Path | None, progress: bool, run: LocalRun, saved: dict[str, Any] | None = None,
         saved_files: dict[str, bytes] | None = None) -> tuple[ImageModel, dict[str, Any], float]:
    """Adam over the epochs, validation after each, a checkpoint after each; the best epoch's weights are kept.
    Distributed (`run` a Ray Train worker's), every process draws the same permutation and takes its share of each
    batch; a last batch is cut to a multiple of the number of processes."""
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train.images) / cfg.batch_size)
    total_steps = cfg.schedule_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    images = torch.from_numpy(train.images).to(device)
    labels = torch.from_numpy(train.labels).to(device) if cfg.conditional else None
    history: dict[str, Any] = {"n_pixels": model.n_pixels, "train": [], "epochs": [], "best_epoch": 0,
                               "training_seconds": 0.0}
    best_state, best_val, start = None, math.inf, 0
    generators = {"batches": generator}
    if saved is not None:
        restore_checkpoint(saved, saved_files, model, optimizer, generators, device)
        scheduler.load_state_dict(saved["scheduler"])
        start, history, best_val = saved["epoch"], saved["history"], saved["best_validation_nll"]
        if BEST in saved_files:
            best_state = {k: v.to(device) for k, v in load_safetensors(saved_files[BEST]).items()}
        history.setdefault("resumed_at", []).append(start)
    stepped = run.wrap(ImageNLL(model))
    seconds = history["training_seconds"]
    comparable = _comparable(cfg)
    shown = {"loss": ("bits/dim {}", ".4f"), "val": ("val {}", ".4f")}
    if start > cfg.epochs:
        raise ValueError(f"cannot resume {cfg.name!r}: the checkpoint is at epoch {start}, past epochs {cfg.epochs}")
    bar_ = progress_bar(progress, f"{cfg.model} {cfg.name}", cfg.epochs * steps_per_epoch, shown,
                        start * steps_per_epoch)
    with bar_ as bar:
        for epoch in range(start + 1, cfg.epochs + 1):
            epoch_started = time.perf_counter()
            model.train()
            order = torch.randperm(len(images), generator=generator).to(device)
            losses = []
            for i in range(steps_per_epoch):
                idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                idx = idx[: len(idx) - len(idx) % run.world]
                mask = draw_mask(model, generator)
                if len(idx):
                    x, y = run.shard(images[idx], None if labels is None else labels[idx])
                    loss = stepped(x, y, mask)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()  # distributed: the gradients are averaged over the processes here
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                    losses.append(float(run.mean(loss.detach())))
                    history["train"].append([(epoch - 1) * steps_per_epoch + i + 1, losses[-1]])
                scheduler.step()
                bar((epoch - 1) * steps_per_epoch + i + 1, {"loss": losses[-1] / model.n_pixels / math.log(2)})
            seconds += time.perf_counter() - epoch_started
            metrics: dict[str, Any] = {"epoch": epoch}
            if run.chief:
                model.eval()
                val = float(-split_log_probs(model, data.validation, device, given_labels=cfg.conditional).mean())
                history["epochs"].append({"epoch": epoch, "step": epoch * steps_per_epoch,
                                          "train_nll": float(np.mean(losses)), "validation_nll": val,
                                          "seconds": round(seconds, 2)})
                bar(epoch * steps_per_epoch, {"val": val / model.n_pixels / math.log(2)})
                if val < best_val:
                    best_val, history["best_epoch"] = val, epoch
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if out_dir is not None and cfg.sample_every and epoch % cfg.sample_every == 0 and epoch < cfg.epochs:
                    grid = sample_grid(model, cfg, torch.Generator(device=device).manual_seed(cfg.seed))
                    (out_dir / f"samples-epoch-{epoch:03d}.png").write_bytes(grid)
                metrics.update(train_nll=float(np.mean(losses)), validation_nll=val)
            history["training_seconds"] = seconds

            def write(directory: Path, epoch: int = epoch, best_state: dict | None = best_state,
                      best_val: float = best_val) -> None:
                best = {} if best_state is None else {
                    BEST: save_safetensors({k: v.contiguous().cpu() for k, v in best_state.items()})}
                write_checkpoint(directory, model, optimizer, generators, {
                    "epoch": epoch, "config": comparable, "history": history, "best_validation_nll": best_val,
                    "scheduler": scheduler.state_dict()}, best)

            run.checkpoint(write, metrics)
    if best_state is not None:  # only the process that evaluates has one
        model.load_state_dict(best_state)
    return model, history, seconds


def sample_grid(model: ImageModel, cfg: ImageTrainConfig, generator: torch.Generator) -> bytes:
    """A grid of samples as PNG: grid_size x grid_size images, or for a class-conditional model one
    column per class, grid_size rows."""
    columns = model.n_classes or cfg.grid_size
    n = columns * cfg.grid_size
    device = model.class_log_prior.device
    labels = torch.arange(n, device=device) % model.n_classes if model.n_classes else None
    samples, _ = model.eval().sample(n, labels=labels, generator=generator)
    return grid_png(samples.cpu().numpy(), model.levels, columns)


# ---- pictures -----------------------------------------------------------------------------------------------------


def grid_png(images: np.ndarray, levels: int, columns: int, scale: int | None = None, pad: int = 2) -> bytes:
    """(N, H, W) grey levels as one PNG: a grid `columns` wide, white ink on black, pixels enlarged."""
    from PIL import Image

    n, h, w = images.shape
    scale = scale or max(1, 84 // max(h, w))
    rows = math.ceil(n / columns)
    canvas = np.full((rows * (h * scale + pad) + pad, columns * (w * scale + pad) + pad), 96, dtype=np.uint8)
    grey = np.rint(images.astype(np.float64) * 255 / (levels - 1)).astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        top, left = pad + r * (h * scale + pad), pad + c * (w * scale + pad)
        canvas[top:top + h * scale, left:left + w * scale] = np.kron(grey[i], np.ones((scale, scale), np.uint8))
    buffer = io.BytesIO()
    Image.fromarray(canvas, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def loss_curve_png(history: dict[str, Any], cfg: ImageTrainConfig) -> bytes:
    """Training NLL per batch and validation NLL per epoch, in bits/dim, as PNG."""
    to_bpd = 1 / (history["n_pixels"] * math.log(2))

    def draw(ax) -> None:
        train = np.array(history["train"], dtype=float).reshape(-1, 2)
        if len(train):
            ax.plot(train[:, 0], train[:, 1] * to_bpd, lw=0.6, alpha=0.35, color="C0", label="train (batch)")
        epochs = history["epochs"]
        ax.plot([e["step"] for e in epochs], [e["train_nll"] * to_bpd for e in epochs], "o-", ms=3, color="C0",
                label="train (epoch mean)")
        ax.plot([e["step"] for e in epochs], [e["validation_nll"] * to_bpd for e in epochs], "o-", ms=3,
                color="C1", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("bits/dim")
        what = "class-conditional " if cfg.conditional else ""
        ax.set_title(f"{cfg.name}: {what}{cfg.model} on {cfg.dataset}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()

    return figure_png(draw)
