"""`genserve train pixelcnn|made|nade|fvsbn`: fit an autoregressive image model by maximum likelihood.

Data (training/image_data.py) -> Adam with cosine decay over the epochs, one pass over the training split
per epoch -> validation NLL after every epoch, the best epoch's weights kept -> test NLL in nats and bits/dim
(exact; for a class-conditional model both log p(x | y) and the marginal log p(x)) -> anomaly calibration on
the validation split -> ONNX graph checked against torch -> artifact with a sample grid and the loss curve.

MADE is trained order-agnostically: each minibatch uses one of its fixed orderings, drawn at random; its
reported likelihood is the ensemble over all of them.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from genserve.artifacts import artifact
from genserve.artifacts.families import IMAGE_KINDS
from genserve.artifacts.scores import class_evidence_scores
from genserve.models.image import ImageModel
from genserve.models.registry import build_image_model, image_classes
from genserve.training.checkpoints import (
    LocalRun,
    checkpoint_dir,
    ray_storage,
    restore_checkpoint,
    write_checkpoint,
)
from genserve.training.distributed import CheckpointedRun, RayTrainRun, fit_data_parallel
from genserve.training.image_data import (
    DATASETS,
    ImageDataset,
    ImageSplit,
    calibrate_images,
    split_sizes,
    training_data,
)
from genserve.training.loop import (
    BestEpoch,
    Fitted,
    calibration_files,
    comparable_settings,
    cosine_decay,
    pick_device,
    refuse_other_settings,
    run_family,
    threads_for,
)
from genserve.training.reporting import (
    class_grid_png,
    image_loss_curve,
    log_files,
    progress_bar,
    training_dir,
    write_epoch_samples,
)

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


@torch.no_grad()
def split_class_scores(model: ImageModel, split: ImageSplit, device: torch.device) -> dict[str, np.ndarray] | None:
    """The class-conditional evidence scores of every image of a split (None for an unconditional model)."""
    if not model.n_classes:
        return None
    out = [model.class_log_probs(torch.from_numpy(split.images[start:start + EVAL_BATCH]).to(device))
           .double().cpu().numpy() for start in range(0, len(split.images), EVAL_BATCH)]
    return class_evidence_scores(np.concatenate(out), model.class_log_prior.double().cpu().numpy())


def nll_metrics(log_probs: np.ndarray, n_pixels: int, prefix: str) -> dict[str, float]:
    nll = float(-log_probs.mean())
    return {f"{prefix}_nll_nats": nll, f"{prefix}_bits_per_dim": nll / (n_pixels * math.log(2))}


# ---- the run ------------------------------------------------------------------------------------------------------


def train_image(cfg: ImageTrainConfig, store: Path, progress: bool = True, checkpoints: str | None = None) -> Path:
    """Train, evaluate, calibrate and export an image model; returns the new artifact's directory. With
    `cfg.workers`, Ray Train keeps its checkpoints under `checkpoints` (default STORE/.checkpoints/ray)."""
    cfg = cfg.resolved()
    device = pick_device(None if cfg.workers else cfg.device)  # distributed: `device` is the workers'
    with threads_for(device, cfg.threads):
        return run_family(ImageRun(cfg, store, device, progress, checkpoints or ray_storage(store)))


def image_module(cfg: ImageTrainConfig, data: ImageDataset, train: ImageSplit, device: torch.device) -> ImageModel:
    """The untrained module of a run, initialised from the run's seed."""
    torch.manual_seed(cfg.seed)
    model = build_image_model(cfg.model, cfg.model_config(data)).to(device)
    if cfg.conditional:
        model.set_class_prior(torch.from_numpy(train.labels).to(device))
    return model


class ImageRun(CheckpointedRun):
    """The autoregressive image family's pieces of the shared run (training/loop.py)."""

    def prepare(self) -> None:
        cfg = self.cfg
        self.data, self.train = training_data(cfg.dataset, cfg.exclude_classes, cfg.max_train_images)
        if cfg.resume:
            self.read_saved()
            refuse_other_settings(cfg.name, self.saved["config"], comparable_settings(cfg, RESUME_MAY_DIFFER))
        self.out_dir = training_dir(self.store, cfg.name)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def fit(self) -> Fitted:
        cfg, data, train, device = self.cfg, self.data, self.train, self.device
        model = image_module(cfg, data, train, device)
        self.parameters = sum(p.numel() for p in model.parameters())
        if not cfg.workers:
            run_here = LocalRun(checkpoint_dir(self.store, cfg.name))
            return fit_image_model(cfg, model, data, train, device, self.out_dir, self.progress, run_here, self.saved,
                                   self.saved_files)
        worker = functools.partial(fit_on_worker, cfg, data, train)
        history, files = fit_data_parallel(worker, cfg, self.checkpoints, resume=self.saved is not None)
        model = image_module(cfg, data, train, device)
        artifact.load_module_weights(model, files[BEST], f"checkpoint {BEST}")
        return Fitted(model, history, history["training_seconds"])

    def evaluate(self, fitted: Fitted) -> dict[str, Any]:
        """Test and validation NLL (nats, bits/dim), exact; a conditional model's also given the labels."""
        model, data, device = fitted.module, self.data, self.device
        evaluation_started = time.perf_counter()
        metrics: dict[str, Any] = {}
        test_lp = split_log_probs(model, data.test, device, given_labels=False)
        metrics.update(nll_metrics(test_lp, model.n_pixels, "test"))
        self.validation_log_probs = split_log_probs(model, data.validation, device, given_labels=False)
        metrics.update(nll_metrics(self.validation_log_probs, model.n_pixels, "validation"))
        if self.cfg.conditional:
            given = split_log_probs(model, data.test, device, given_labels=True)
            metrics.update(nll_metrics(given, model.n_pixels, "test_given_label"))
        metrics["evaluation_seconds"] = round(time.perf_counter() - evaluation_started, 2)
        return metrics

    def calibrate(self, fitted: Fitted, metrics: dict[str, Any]) -> dict[str, bytes]:
        calibration, reference, neighbours, gaussians = calibrate_images(
            self.validation_log_probs, fitted.module.n_pixels, self.data, self.train,
            split_class_scores(fitted.module, self.data.validation, self.device))
        return calibration_files(calibration, reference, metrics, neighbours, gaussians)

    def export(self, fitted: Fitted, metrics: dict[str, Any], files: dict[str, bytes]) -> Path:
        cfg, data, history = self.cfg, self.data, fitted.history
        model = fitted.module.cpu().float()
        grid = sample_grid(model, cfg, torch.Generator().manual_seed(cfg.seed))
        (self.out_dir / artifact.SAMPLES_PNG).write_bytes(grid)
        what = "class-conditional " if cfg.conditional else ""
        files = {artifact.WEIGHTS: artifact.module_weights(model), **files, artifact.SAMPLES_PNG: grid,
                 **log_files(history, image_loss_curve(history, f"{cfg.name}: {what}{cfg.model} on {cfg.dataset}"))}
        if cfg.export_onnx:
            from genserve.training.onnx_export import check_image_onnx, export_image_onnx

            files[artifact.ONNX] = export_image_onnx(model)
            metrics["onnx_max_abs_error"] = check_image_onnx(model, files[artifact.ONNX])
        metrics.update({
            "parameters": self.parameters,
            "training_seconds": round(fitted.seconds, 2),
            "epochs": cfg.epochs,
            "best_epoch": history["best_epoch"],
            "train_images": len(self.train.images),
            "total_seconds": round(time.perf_counter() - self.started, 2),
        })
        return artifact.write_artifact(
            self.store, kind=cfg.model, name=cfg.name, config=asdict(model.config),
            input_spec=artifact.ImageInputSpec(height=data.height, width=data.width, levels=data.levels,
                                               n_classes=model.n_classes,
                                               class_names=data.class_names if cfg.conditional else None),
            training={"settings": asdict(cfg), "data": data.description, "split": split_sizes(data, self.train),
                      "device": str(self.device), "torch_threads": torch.get_num_threads()},
            metrics=metrics, files=files,
        )


# ---- fitting ------------------------------------------------------------------------------------------------------


def fit_image_model(cfg: ImageTrainConfig, model: ImageModel, data: ImageDataset, train: ImageSplit,
                    device: torch.device, out_dir: Path | None, progress: bool, run: LocalRun | RayTrainRun,
                    saved: dict[str, Any] | None = None, saved_files: dict[str, bytes] | None = None) -> Fitted:
    """Adam over the epochs, validation after each, a checkpoint after each; the best epoch's weights are kept.
    Distributed (`run` a Ray Train worker's), every process draws the same permutation and takes its share of each
    batch; a last batch is cut to a multiple of the number of processes."""
    return _ImageFit(cfg, model, data, train, device, run, saved, saved_files).train(out_dir, progress)


def fit_on_worker(cfg: ImageTrainConfig, data: ImageDataset, train: ImageSplit, device: torch.device,
                  run: RayTrainRun, saved: dict[str, Any] | None, saved_files: dict[str, bytes] | None) -> None:
    """One Ray Train worker's share of a run (the worker function `fit_data_parallel` is given): no sample grids
    on the way, as worker 0 may be on another machine."""
    model = image_module(cfg, data, train, device)
    fit_image_model(cfg, model, data, train, device, None, False, run, saved, saved_files)


class _ImageFit:
    """One image model's training loop and what a checkpoint saves of it: the module, Adam and its schedule, the
    batch generator, the history and the best epoch's weights."""

    def __init__(self, cfg: ImageTrainConfig, model: ImageModel, data: ImageDataset, train: ImageSplit,
                 device: torch.device, run: LocalRun | RayTrainRun, saved: dict[str, Any] | None,
                 saved_files: dict[str, bytes] | None) -> None:
        self.cfg, self.model, self.validation, self.device, self.run = cfg, model, data.validation, device, run
        self.generators = {"batches": torch.Generator().manual_seed(cfg.seed)}  # epoch orders, MADE's orderings
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = math.ceil(len(train.images) / cfg.batch_size)
        self.scheduler = cosine_decay(self.optimizer, cfg.schedule_epochs * self.steps_per_epoch, floor=0.1)
        self.images = torch.from_numpy(train.images).to(device)
        self.labels = torch.from_numpy(train.labels).to(device) if cfg.conditional else None
        self.history: dict[str, Any] = {"n_pixels": model.n_pixels, "train": [], "epochs": [], "best_epoch": 0,
                                        "training_seconds": 0.0}
        self.best, self.start = BestEpoch(self.history), 0
        if saved is not None:
            self._restore(saved, saved_files)
        self.stepped = run.wrap(ImageNLL(model))
        self.comparable = comparable_settings(cfg, RESUME_MAY_DIFFER)
        if self.start > cfg.epochs:
            raise ValueError(f"cannot resume {cfg.name!r}: the checkpoint is at epoch {self.start}, "
                             f"past epochs {cfg.epochs}")

    def train(self, out_dir: Path | None, progress: bool) -> Fitted:
        cfg, steps = self.cfg, self.steps_per_epoch
        seconds = self.history["training_seconds"]
        shown = {"loss": ("bits/dim {}", ".4f"), "val": ("val {}", ".4f")}
        with progress_bar(progress, f"{cfg.model} {cfg.name}", cfg.epochs * steps, shown, self.start * steps) as bar:
            for epoch in range(self.start + 1, cfg.epochs + 1):
                epoch_started = time.perf_counter()
                losses = self._epoch(epoch, bar)
                seconds += time.perf_counter() - epoch_started
                metrics: dict[str, Any] = {"epoch": epoch}
                if self.run.chief:
                    metrics.update(self._validate(epoch, losses, seconds, bar))
                    write_epoch_samples(out_dir, epoch, cfg.epochs, cfg.sample_every, lambda: sample_grid(
                        self.model, cfg, torch.Generator(device=self.device).manual_seed(cfg.seed)))
                self.history["training_seconds"] = seconds
                self.run.checkpoint(lambda directory, epoch=epoch: self._write(directory, epoch), metrics)
        self.best.restore(self.model)
        return Fitted(self.model, self.history, seconds)

    def _epoch(self, epoch: int, bar: Callable[[int, dict[str, float | None]], None]) -> list[float]:
        """One pass over the training split in a fresh order; each batch's loss (nats per image)."""
        cfg, model, world = self.cfg, self.model, self.run.world
        model.train()
        order = torch.randperm(len(self.images), generator=self.generators["batches"]).to(self.device)
        losses: list[float] = []
        for i in range(self.steps_per_epoch):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            idx = idx[: len(idx) - len(idx) % world]
            mask = draw_mask(model, self.generators["batches"])
            step = (epoch - 1) * self.steps_per_epoch + i + 1
            if len(idx):
                losses.append(self._step(idx, mask))
                self.history["train"].append([step, losses[-1]])
            self.scheduler.step()
            bar(step, {"loss": losses[-1] / model.n_pixels / math.log(2)})
        return losses

    def _step(self, idx: Tensor, mask: int | None) -> float:
        """One Adam step on the batch `idx` (this process's share of it); its loss averaged over the processes."""
        x, y = self.run.shard(self.images[idx], None if self.labels is None else self.labels[idx])
        loss = self.stepped(x, y, mask)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # distributed: the gradients are averaged over the processes here
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        return float(self.run.mean(loss.detach()))

    def _validate(self, epoch: int, losses: list[float], seconds: float,
                  bar: Callable[[int, dict[str, float | None]], None]) -> dict[str, float]:
        """The validation NLL after an epoch, into the history and the best epoch's running."""
        model, step = self.model, epoch * self.steps_per_epoch
        model.eval()
        val = float(-split_log_probs(model, self.validation, self.device, given_labels=self.cfg.conditional).mean())
        train_nll = float(np.mean(losses))
        self.history["epochs"].append({"epoch": epoch, "step": step, "train_nll": train_nll, "validation_nll": val,
                                       "seconds": round(seconds, 2)})
        bar(step, {"val": val / model.n_pixels / math.log(2)})
        self.best.offer(model, epoch, val)
        return {"train_nll": train_nll, "validation_nll": val}

    def _restore(self, saved: dict[str, Any], files: dict[str, bytes]) -> None:
        restore_checkpoint(saved, files, self.model, self.optimizer, self.generators, self.device)
        self.scheduler.load_state_dict(saved["scheduler"])
        self.start, self.history = saved["epoch"], saved["history"]
        self.best = BestEpoch(self.history)
        self.best.value = saved["best_validation_nll"]
        if BEST in files:
            self.best.state = {k: v.to(self.device) for k, v in load_safetensors(files[BEST]).items()}
        self.history.setdefault("resumed_at", []).append(self.start)

    def _write(self, directory: Path, epoch: int) -> None:
        state = self.best.state
        best = {} if state is None else {BEST: save_safetensors({k: v.contiguous().cpu() for k, v in state.items()})}
        write_checkpoint(directory, self.model, self.optimizer, self.generators, {
            "epoch": epoch, "config": self.comparable, "history": self.history,
            "best_validation_nll": self.best.value, "scheduler": self.scheduler.state_dict()}, best)


def sample_grid(model: ImageModel, cfg: ImageTrainConfig, generator: torch.Generator) -> bytes:
    """A grid of samples as PNG: grid_size x grid_size images, or for a class-conditional model one
    column per class, grid_size rows."""
    return class_grid_png(lambda n, labels: model.eval().sample(n, labels=labels, generator=generator)[0],
                          model.n_classes, model.levels, cfg.grid_size, model.class_log_prior.device)
