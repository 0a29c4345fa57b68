"""Train a DCGAN-style GAN (models/gan.py) on mnist5k or digits and write it as an artifact of kind "gan".

Data (training/image_data.py) -> for every minibatch of the training split (the last partial batch of an epoch
is dropped): `d_steps` discriminator updates, then one generator update, both Adam with betas (0.5, 0.999) as in
DCGAN -> a sample grid every `sample_every` epochs -> cheap quality signals (below) -> an artifact whose
weights are the generator's alone, with density "none": a GAN gives no log p(x).

The loss is the non-saturating GAN loss (Goodfellow et al. 2014):

- discriminator: BCE with logits, real images labelled 1 and generated ones 0, the two batch means summed;
- generator: BCE of D(G(z)) against 1, i.e. -log D(G(z)).

Real images reach the discriminator scaled to [0, 1] with `dequantise` grey-level steps of uniform noise
(models/gan.py `unit_images`). A class-conditional run gives each generated image of a batch the label of the
real image at the same position, so fakes follow the training set's class frequencies; its discriminator is a
projection discriminator.

Recorded per step (training_log.json, loss_curve.png): the two losses and the discriminator's mean
probability of "real", sigmoid(D), on the real and on the generated images of the batch (before its update).
At the equilibrium of the non-saturating game D outputs 1/2 on both, and its loss is 2 log 2 = 1.386.

Quality metrics (a GAN has no likelihood; these need no external network and are cheap, and they are weak:
they say the samples resemble the data at the level of a linear model and of pixel means and spreads, not that
they are sharp, or new rather than copies of training images):

- `sample_mean_image_l1`: the mean over pixels of |mean sample image - mean test image|, both in [0, 1]
  (grey level / (levels - 1)), from `quality_samples` samples. `train_mean_image_l1` is the same for the
  training split's mean image: what matching the data distribution would give, up to sampling noise;
- `sample_pixel_std`: the mean over pixels of the standard deviation across samples (in [0, 1]), against
  `test_pixel_std`, the same for the test split: far below it, the samples are too alike (mode collapse); for a
  class-conditional model also within each conditioning label, `sample_within_class_pixel_std`, against the
  test split's within each class, `test_within_class_pixel_std` (a generator that ignores z and draws one image
  per class scores well on every other metric here, and near 0 on this one);
- a multinomial logistic regression fitted on the training split (pixels in [0, 1], C = 0.1), its accuracy on
  the test split as `classifier_test_accuracy` (the ceiling), classifies the samples:
  `sample_class_fractions` and `sample_class_entropy_bits` (log2(10) = 3.32 when every class is equally
  frequent; much lower: the generator collapsed onto a few classes); for a class-conditional model, with
  samples drawn equally from every class, `label_agreement` is the fraction classified as their conditioning
  label (chance: 1 / n_classes).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from genserve.artifacts import artifact
from genserve.models.gan import GAN, GANConfig, Generator, unit_images
from genserve.training.image_data import DATASETS, ImageDataset, ImageSplit, split_sizes, training_data
from genserve.training.loop import FamilyRun, Fitted, pick_device, run_family, threads_for
from genserve.training.reporting import (
    class_grid_png,
    gan_loss_curve,
    log_files,
    progress_bar,
    training_dir,
    write_epoch_samples,
)

DISCRIMINATOR_WEIGHTS = "discriminator.safetensors"
CLASSIFIER_C = 0.1  # inverse L2 strength of the quality metrics' logistic regression
GENERATED_BATCH = 500

# Presets per dataset: the architecture (GANConfig fields) and the optimisation. "tiny" is for tests (seconds);
# "default" is sized for 2 CPU cores (minutes; timings in docs of this module's functions' callers and below);
# "gpu" is wider and longer (not measured: no GPU was at hand).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        dataset: dict(arch=dict(latent_dim=16, channels=8), epochs=1, batch_size=32, learning_rate=2e-4)
        for dataset in DATASETS
    },
    "default": {
        # Measured on 2 CPU cores (2 threads): mnist5k about 12 s an epoch (62 steps of 64), digits about
        # 1 s an epoch (22 steps of 64).
        "mnist5k": dict(arch=dict(latent_dim=64, channels=32), epochs=20, batch_size=64, learning_rate=2e-4),
        "digits": dict(arch=dict(latent_dim=32, channels=32), epochs=150, batch_size=64, learning_rate=2e-4),
    },
    "gpu": {
        "mnist5k": dict(arch=dict(latent_dim=100, channels=64), epochs=200, batch_size=64, learning_rate=2e-4),
        "digits": dict(arch=dict(latent_dim=64, channels=64), epochs=500, batch_size=64, learning_rate=2e-4),
    },
}


@dataclass
class GANTrainConfig:
    """Everything a GAN training run depends on; None fields come from the preset."""

    dataset: str  # mnist5k | digits
    name: str
    conditional: bool = False
    preset: str = "default"  # tiny | default | gpu
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None  # the generator's and, unless d_learning_rate says otherwise, D's
    d_learning_rate: float | None = None
    betas: tuple[float, float] = (0.5, 0.999)
    d_steps: int = 1  # discriminator updates per generator update (each on the same real batch, fresh z)
    dequantise: float = 0.25  # uniform noise on real images, in grey-level steps (0: none; at most 1)
    architecture: dict[str, Any] | None = None  # overrides of the preset's GANConfig fields
    max_train_images: int | None = None  # a subset of the training split (smoke runs)
    exclude_classes: list[int] | None = None  # leave these classes out of every split
    sample_every: int = 5  # epochs between sample grids written to STORE/.training/NAME/ (0: only at the end)
    grid_size: int = 8  # grid_size x grid_size samples, or one column per class and grid_size rows
    quality_samples: int = 1000  # samples drawn for the quality metrics
    seed: int = 0
    device: str | None = None
    threads: int | None = None

    def resolved(self) -> GANTrainConfig:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown image dataset {self.dataset!r}; use one of: {', '.join(DATASETS)}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; use one of: {', '.join(PRESETS)}")
        preset = PRESETS[self.preset][self.dataset]
        arch = {**preset["arch"], **(self.architecture or {})}
        allowed = {f.name for f in fields(GANConfig)} - {"height", "width", "levels", "n_classes"}
        unknown = sorted(set(arch) - allowed)
        if unknown:
            raise ValueError(f"gan has no architecture fields {unknown}; it has: {', '.join(sorted(allowed))}")
        cfg = replace(
            self, architecture=arch, betas=tuple(self.betas),
            epochs=self.epochs if self.epochs is not None else preset["epochs"],
            batch_size=self.batch_size if self.batch_size is not None else preset["batch_size"],
            learning_rate=self.learning_rate if self.learning_rate is not None else preset["learning_rate"],
        )
        if cfg.d_learning_rate is None:
            cfg.d_learning_rate = cfg.learning_rate
        for field in ("epochs", "d_steps", "quality_samples", "grid_size"):
            if getattr(cfg, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(cfg, field)}")
        if cfg.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (the generator's BatchNorm), got {cfg.batch_size}")
        if not (cfg.learning_rate > 0 and cfg.d_learning_rate > 0):
            raise ValueError(f"learning rates must be positive, got {cfg.learning_rate} and {cfg.d_learning_rate}")
        if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {cfg.betas}")
        if not 0 <= cfg.dequantise <= 1:
            raise ValueError(f"dequantise must be within [0, 1] grey-level steps, got {cfg.dequantise}")
        if cfg.sample_every < 0:
            raise ValueError(f"sample_every must be 0 or more, got {cfg.sample_every}")
        if cfg.exclude_classes and cfg.conditional:
            raise ValueError("exclude_classes is for unconditional models: a class-conditional model's prior "
                             "would give the excluded classes probability 0")
        artifact.validate_name(cfg.name)
        return cfg

    def model_config(self, data: ImageDataset) -> GANConfig:
        return GANConfig(height=data.height, width=data.width, levels=data.levels,
                         n_classes=data.n_classes if self.conditional else 0, **(self.architecture or {}))


# ---- training -----------------------------------------------------------------------------------------------------


def train_gan(cfg: GANTrainConfig, store: Path, progress: bool = True) -> Path:
    """Train a GAN and write it as a new artifact version of `cfg.name`; returns the version's directory."""
    cfg = cfg.resolved()
    device = pick_device(cfg.device)
    with threads_for(device, cfg.threads):
        return run_family(GANRun(cfg, Path(store), device, progress))


def gan_module(cfg: GANTrainConfig, data: ImageDataset, train: ImageSplit, device: torch.device) -> GAN:
    """The untrained generator and discriminator of a run, initialised from the run's seed."""
    torch.manual_seed(cfg.seed)
    gan = GAN(cfg.model_config(data)).to(device)
    if cfg.conditional:
        gan.set_class_prior(torch.from_numpy(train.labels).to(device))
    return gan


class GANRun(FamilyRun):
    """The GAN's pieces of the shared run (training/loop.py). Evaluation is the quality signals of the module's
    docstring; there is nothing to calibrate, as a GAN gives no log p(x)."""

    kind = "gan"

    def prepare(self) -> None:
        cfg = self.cfg
        self.data, self.train = training_data(cfg.dataset, cfg.exclude_classes, cfg.max_train_images)
        if len(self.train.images) < cfg.batch_size:
            raise ValueError(f"the training split has {len(self.train.images)} images, fewer than one batch of "
                             f"{cfg.batch_size}")

    def fit(self) -> Fitted:
        gan = gan_module(self.cfg, self.data, self.train, self.device)
        self.parameters = {part: sum(p.numel() for p in getattr(gan, part).parameters())
                           for part in ("generator", "discriminator")}
        self.out_dir = training_dir(self.store, self.cfg.name)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        history = _GANFit(self.cfg, gan, self.train, self.device).train(self.out_dir, self.progress)
        return Fitted(gan, history, history["training_seconds"])

    def evaluate(self, fitted: Fitted) -> dict[str, Any]:
        cfg, history = self.cfg, fitted.history
        generator = fitted.module.cpu().generator
        quality_started = time.perf_counter()
        metrics = quality_metrics(generator, self.data, self.train, cfg.quality_samples,
                                  torch.Generator().manual_seed(cfg.seed + 2))
        metrics["quality_seconds"] = round(time.perf_counter() - quality_started, 2)
        last = history["epochs"][-1]
        return {
            **metrics,
            "parameters_generator": self.parameters["generator"],
            "parameters_discriminator": self.parameters["discriminator"],
            # the last epoch's means over its steps
            "final_generator_loss": last["generator_loss"],
            "final_discriminator_loss": last["discriminator_loss"],
            "final_d_real": last["d_real"],
            "final_d_fake": last["d_fake"],
            "epochs": cfg.epochs,
            "steps": history["steps"]["step"][-1],
            "train_images": len(self.train.images),
            "training_seconds": round(fitted.seconds, 2),
        }

    def calibrate(self, fitted: Fitted, metrics: dict[str, Any]) -> dict[str, bytes]:
        return {}

    def export(self, fitted: Fitted, metrics: dict[str, Any], files: dict[str, bytes]) -> Path:
        cfg, data, gan, history = self.cfg, self.data, fitted.module, fitted.history
        grid = sample_grid(gan.generator, cfg)
        (self.out_dir / artifact.SAMPLES_PNG).write_bytes(grid)
        metrics["total_seconds"] = round(time.perf_counter() - self.started, 2)
        what = "class-conditional " if cfg.conditional else ""
        files = {artifact.WEIGHTS: artifact.module_weights(gan.generator),
                 DISCRIMINATOR_WEIGHTS: artifact.module_weights(gan.discriminator), artifact.SAMPLES_PNG: grid,
                 **log_files(history, gan_loss_curve(history, f"{cfg.name}: {what}GAN on {cfg.dataset}")), **files}
        return artifact.write_artifact(
            self.store, kind=self.kind, name=cfg.name, config=gan.config.to_dict(),
            input_spec=artifact.ImageInputSpec(height=data.height, width=data.width, levels=data.levels,
                                               n_classes=gan.n_classes,
                                               class_names=data.class_names if cfg.conditional else None),
            training={"settings": asdict(cfg), "data": data.description, "split": split_sizes(data, self.train),
                      "loss": "non-saturating GAN loss (D: BCE real=1 fake=0; G: BCE of D(G(z)) against 1)",
                      "served_weights": "generator only; the discriminator's in " + DISCRIMINATOR_WEIGHTS,
                      "device": str(self.device), "torch_threads": torch.get_num_threads()},
            metrics=metrics, files=files, density="none",
        )


class _GANFit:
    """The adversarial updates over the epochs, and what they carry: both optimisers, the batch order's and the
    noise's generators, and the history (per step and per epoch)."""

    def __init__(self, cfg: GANTrainConfig, gan: GAN, train: ImageSplit, device: torch.device) -> None:
        self.cfg, self.gan = cfg, gan
        g, d = gan.generator, gan.discriminator
        self.batches = torch.Generator().manual_seed(cfg.seed)  # the order of the training images
        self.noise = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # z and the dequantisation noise
        self.opt_g = torch.optim.Adam(g.parameters(), lr=cfg.learning_rate, betas=cfg.betas)
        self.opt_d = torch.optim.Adam(d.parameters(), lr=cfg.d_learning_rate, betas=cfg.betas)
        self.images = torch.from_numpy(train.images).to(device)
        self.labels = torch.from_numpy(train.labels).to(device) if cfg.conditional else None
        self.steps_per_epoch = len(self.images) // cfg.batch_size
        self.ones, self.zeros = torch.ones(cfg.batch_size, device=device), torch.zeros(cfg.batch_size, device=device)
        self.device = device
        self.steps: dict[str, list[float]] = {"step": [], "generator_loss": [], "discriminator_loss": [],
                                              "d_real": [], "d_fake": []}
        self.history: dict[str, Any] = {"steps": self.steps, "epochs": [], "training_seconds": 0.0}

    def train(self, out_dir: Path | None, progress: bool) -> dict[str, Any]:
        cfg, steps = self.cfg, self.steps
        seconds = 0.0
        shown = {"g": ("G {}", ".3f"), "d": ("D {}", ".3f"), "real": ("D(real) {}", ".2f"),
                 "fake": ("D(fake) {}", ".2f")}
        kind = "conditional GAN" if cfg.conditional else "GAN"
        with progress_bar(progress, f"{kind} {cfg.name}", cfg.epochs * self.steps_per_epoch, shown) as bar:
            for epoch in range(1, cfg.epochs + 1):
                epoch_started = time.perf_counter()
                self.gan.train()
                order = torch.randperm(len(self.images), generator=self.batches).to(self.device)
                first = len(steps["step"])
                for i in range(self.steps_per_epoch):
                    values = {"step": (epoch - 1) * self.steps_per_epoch + i + 1,
                              **self._step(order[i * cfg.batch_size:(i + 1) * cfg.batch_size])}
                    for key, value in values.items():
                        steps[key].append(value)
                    bar(values["step"], {"g": values["generator_loss"], "d": values["discriminator_loss"],
                                         "real": values["d_real"], "fake": values["d_fake"]})
                seconds += time.perf_counter() - epoch_started
                self.history["epochs"].append({
                    "epoch": epoch, "step": epoch * self.steps_per_epoch,
                    **{key: float(np.mean(steps[key][first:])) for key in steps if key != "step"},
                    "seconds": round(seconds, 2)})
                self.history["training_seconds"] = seconds
                write_epoch_samples(out_dir, epoch, cfg.epochs, cfg.sample_every,
                                    lambda: sample_grid(self.gan.generator, cfg))
        return self.history

    def _step(self, idx: Tensor) -> dict[str, float]:
        """`d_steps` discriminator updates on the batch `idx` (fresh z each), then one generator update; the losses
        and D's mean probability of "real" on the real and generated images (before its last update)."""
        g, d, b, noise = self.gan.generator, self.gan.discriminator, self.cfg.batch_size, self.noise
        real = unit_images(self.images[idx], self.gan.levels, self.cfg.dequantise, noise)
        y = None if self.labels is None else self.labels[idx]
        y2 = None if y is None else torch.cat([y, y])
        for _ in range(self.cfg.d_steps):
            with torch.no_grad():
                fake = g(g.noise(b, noise), y)
            logits = d(torch.cat([real, fake]), y2)
            d_loss = (F.binary_cross_entropy_with_logits(logits[:b], self.ones)
                      + F.binary_cross_entropy_with_logits(logits[b:], self.zeros))
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
        d.requires_grad_(False)  # the generator's step needs gradients through D, not of D's weights
        g_loss = F.binary_cross_entropy_with_logits(d(g(g.noise(b, noise), y), y), self.ones)
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        d.requires_grad_(True)
        with torch.no_grad():
            p = torch.sigmoid(logits.detach())
        return {"generator_loss": g_loss.item(), "discriminator_loss": d_loss.item(),
                "d_real": float(p[:b].mean()), "d_fake": float(p[b:].mean())}


def sample_grid(generator: Generator, cfg: GANTrainConfig) -> bytes:
    """A grid of samples as PNG, from the run's seed (the same z at every epoch): grid_size x grid_size images,
    or for a class-conditional model one column per class, grid_size rows."""
    device = generator.class_log_prior.device
    return class_grid_png(
        lambda n, labels: generator.sample(n, labels, torch.Generator(device=device).manual_seed(cfg.seed)),
        generator.n_classes, generator.levels, cfg.grid_size, device)


# ---- quality ------------------------------------------------------------------------------------------------------


def _unit(images: np.ndarray, levels: int) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64) / (levels - 1)


def generate(generator: Generator, n: int, labels: Tensor | None, seed_generator: torch.Generator) -> np.ndarray:
    """n samples as grey levels, in batches."""
    out = []
    for start in range(0, n, GENERATED_BATCH):
        y = None if labels is None else labels[start:start + GENERATED_BATCH]
        out.append(generator.sample(min(GENERATED_BATCH, n - start), y, seed_generator).cpu().numpy())
    return np.concatenate(out)


def quality_metrics(generator: Generator, data: ImageDataset, train: ImageSplit, n: int,
                    seed_generator: torch.Generator) -> dict[str, Any]:
    """The cheap quality signals described in the module's docstring."""
    from sklearn.linear_model import LogisticRegression

    levels = data.levels
    conditional = bool(generator.n_classes)
    labels = torch.arange(n) % generator.n_classes if conditional else None
    samples = generate(generator, n, labels, seed_generator)
    unit, test = _unit(samples, levels), _unit(data.test.images, levels)
    test_mean = test.mean(0)
    metrics: dict[str, Any] = {
        "quality_samples": n,
        "sample_mean_image_l1": float(np.abs(unit.mean(0) - test_mean).mean()),
        "train_mean_image_l1": float(np.abs(_unit(train.images, levels).mean(0) - test_mean).mean()),
        "sample_pixel_std": float(unit.std(0).mean()),
        "test_pixel_std": float(test.std(0).mean()),
    }
    if conditional:
        given = labels.numpy()
        metrics["sample_within_class_pixel_std"] = float(np.mean(
            [unit[given == y].std(0).mean() for y in np.unique(given)]))
        metrics["test_within_class_pixel_std"] = float(np.mean(
            [test[data.test.labels == y].std(0).mean() for y in np.unique(data.test.labels)]))
    classifier = LogisticRegression(C=CLASSIFIER_C, max_iter=500).fit(_unit(train.images, levels), train.labels)
    metrics["classifier_test_accuracy"] = float(
        (classifier.predict(_unit(data.test.images, levels)) == data.test.labels).mean())
    predicted = classifier.predict(_unit(samples, levels))
    fractions = np.bincount(predicted, minlength=data.n_classes) / len(predicted)
    metrics["sample_class_fractions"] = [round(float(f), 4) for f in fractions]
    nonzero = fractions[fractions > 0]
    metrics["sample_class_entropy_bits"] = float(-(nonzero * np.log2(nonzero)).sum())
    if conditional:
        metrics["label_agreement"] = float((predicted == labels.numpy()).mean())
    return metrics
