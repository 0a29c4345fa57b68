"""Loading an image artifact (a kind of the image family, artifacts.families.IMAGE) and scoring images with it, in torch
or ONNX Runtime, on CUDA when this process has a GPU, else the CPU (one code path for both).

Both runtimes answer `score(images, labels)` with log p(x [| y]) (N,) and each pixel's log p(x_i | x_<i [, y])
(N, H, W), float64 numpy. A class-conditional model given no labels answers for the exact marginal over
classes: torch through `ImageModel.score`, ONNX Runtime by running the graph (which computes log p(x | y)) once
per class and combining the runs with `marginalise_labels` and the model's class prior. Sampling and
completion always run in torch, on `LoadedImageModel.module`. 'auto' times both runtimes at load and keeps
the faster (service.runtime_choice.load_runtime), on images with labels when the model is class-conditional.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from genserve.artifacts import artifact as art
from genserve.artifacts.calibration import CalibrationSet, read_calibration
from genserve.artifacts.class_gaussians import ClassGaussians, load_class_gaussians
from genserve.artifacts.families import IMAGE
from genserve.artifacts.neighbours import NeighbourIndex, load_neighbours
from genserve.artifacts.reference import load_reference
from genserve.artifacts.scores import class_evidence_scores
from genserve.artifacts.store import load_artifact_at
from genserve.models.image import ImageModel, marginalise_labels
from genserve.models.registry import build_image_model
from genserve.service.devices import pick_device
from genserve.service.families import require_family
from genserve.service.isolation import finite_log_probs
from genserve.service.onnx_session import open_session, session_device
from genserve.service.runtime_choice import PROBE_BATCHES, RuntimeChoice, RuntimeName, load_runtime

ImageScore = tuple[np.ndarray, np.ndarray]  # log p (N,), per-pixel conditionals (N, H, W), float64


class ImageRuntime(Protocol):
    name: str
    device: str

    def score(self, images: np.ndarray, labels: np.ndarray | None) -> ImageScore:
        """images int64 (N, H, W), labels int64 (N,) or None -> log p (N,), pixel log-probs (N, H, W)."""
        ...

    def class_log_probs(self, images: np.ndarray) -> np.ndarray:
        """A class-conditional model's log p(x | y) (N, n_classes), float64, one pass per class."""
        ...


class TorchImageRuntime:
    name = "torch"

    def __init__(self, module: ImageModel):
        self.module = module
        self.device = str(module.class_log_prior.device.type)

    @torch.inference_mode()
    def score(self, images: np.ndarray, labels: np.ndarray | None) -> ImageScore:
        device = self.module.class_log_prior.device
        x = torch.as_tensor(np.asarray(images, dtype=np.int64), device=device)
        y = None if labels is None else torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
        log_prob, pixels = self.module.score(x, y)
        return log_prob.double().cpu().numpy(), pixels.double().cpu().numpy()

    @torch.inference_mode()
    def class_log_probs(self, images: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(images, dtype=np.int64), device=self.module.class_log_prior.device)
        return self.module.class_log_probs(x).double().cpu().numpy()


class OnnxImageRuntime:
    name = "onnx"

    def __init__(self, onnx_bytes: bytes, device: str, height: int, width: int, n_classes: int,
                 class_log_prior: torch.Tensor):
        # As many threads as torch has (one per core unless this process was given fewer): the two runtimes
        # share a replica's CPU budget alike, and 'auto' compares them on equal terms.
        self.session = open_session(onnx_bytes, device, threads=torch.get_num_threads())
        self.device = session_device(self.session)
        self.height, self.width, self.n_classes = height, width, n_classes
        self.class_log_prior = class_log_prior.detach().to("cpu", torch.float64)
        self.input_names = [i.name for i in self.session.get_inputs()]
        expected = 2 if n_classes else 1
        if len(self.input_names) != expected:
            which = "conditional" if n_classes else "unconditional"
            raise art.ArtifactError(f"{art.ONNX}: the graph takes {len(self.input_names)} inputs "
                                    f"({', '.join(self.input_names)}); a {which} image model's graph takes {expected}")

    def _run(self, images: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        feeds = {self.input_names[0]: np.ascontiguousarray(images, dtype=np.int64)}
        if labels is not None:
            feeds[self.input_names[1]] = np.ascontiguousarray(labels, dtype=np.int64)
        log_prob, pixels = self.session.run(None, feeds)
        return log_prob.astype(np.float64), pixels.astype(np.float64).reshape(len(images), -1)

    def class_log_probs(self, images: np.ndarray) -> np.ndarray:
        if not self.n_classes:
            raise ValueError("this model is not class-conditional: it has no classes to compare")
        n = len(images)
        return np.stack([self._run(images, np.full(n, y, dtype=np.int64))[0] for y in range(self.n_classes)], axis=1)

    def score(self, images: np.ndarray, labels: np.ndarray | None) -> ImageScore:
        n = len(images)
        if self.n_classes and labels is None:
            runs = [self._run(images, np.full(n, y, dtype=np.int64)) for y in range(self.n_classes)]
            log_prob, pixels = marginalise_labels(torch.from_numpy(np.stack([lp for lp, _ in runs])),
                                                  torch.from_numpy(np.stack([px for _, px in runs])),
                                                  self.class_log_prior)
            log_prob, pixels = log_prob.numpy(), pixels.numpy()
        else:
            if not self.n_classes and labels is not None:
                raise ValueError("this model is not class-conditional: give no labels")
            log_prob, pixels = self._run(images, labels)
        return log_prob, pixels.reshape(n, self.height, self.width)


@dataclass
class LoadedImageModel:
    artifact: art.Artifact
    module: ImageModel  # always loaded, on `device`: sampling and completion run in torch
    runtime: ImageRuntime
    calibration: CalibrationSet | None  # None when the artifact has no calibration.json
    device: str
    reference: torch.nn.Module | None = None  # likelihood-ratio reference model, on the CPU
    neighbours: NeighbourIndex | None = None  # the knn score's index of training images, on the CPU
    gaussians: ClassGaussians | None = None  # the mahalanobis score's class Gaussians, on the CPU
    choice: RuntimeChoice | None = None  # how the runtime was chosen (timings, for 'auto')

    @property
    def spec(self) -> art.ImageInputSpec:
        return self.artifact.manifest.input  # type: ignore[return-value]


def image_class_scores(loaded: LoadedImageModel, images: np.ndarray) -> dict[str, np.ndarray] | None:
    """The class-conditional evidence scores (artifacts.scores.class_evidence_scores) of int64 images (N, H, W),
    from the scoring runtime; None for a model that is not class-conditional."""
    module = loaded.module
    if not module.n_classes:
        return None
    class_log_prob = finite_log_probs(loaded.runtime.class_log_probs(images))
    return class_evidence_scores(class_log_prob, module.class_log_prior.detach().double().cpu().numpy())


def build_image_module(loaded: art.Artifact) -> ImageModel:
    """The artifact's module, built from its kind and config, weights loaded and checked, in eval mode."""
    require_family(loaded, IMAGE)
    manifest, spec = loaded.manifest, loaded.manifest.input  # an ImageInputSpec: the image family's input
    try:
        module = build_image_model(manifest.kind, manifest.config)
    except (TypeError, ValueError) as e:
        raise art.ArtifactError(f"{loaded.path / art.MANIFEST}: invalid {manifest.kind} config ({e})") from None
    shape = (module.height, module.width, module.levels, module.n_classes)
    if shape != (spec.height, spec.width, spec.levels, spec.n_classes):
        raise art.ArtifactError(f"{loaded.path / art.MANIFEST}: the config's images (height, width, levels, "
                                f"n_classes) = {shape} differ from the input spec's "
                                f"{(spec.height, spec.width, spec.levels, spec.n_classes)}")
    art.load_module_weights(module, loaded.contents[art.WEIGHTS], loaded.path / art.WEIGHTS)
    return module.eval()


def load_image_model(path: str | Path, runtime: RuntimeName = "auto", device: str | None = None) -> LoadedImageModel:
    """Verify an image artifact and load it: the torch module on `device` (default CUDA when available, else
    the CPU) and the scoring runtime; 'auto' is the faster of torch and ONNX Runtime on this machine, measured
    at load, when the artifact has model.onnx, else torch."""
    loaded = load_artifact_at(str(path))
    device = device or pick_device()
    module = build_image_module(loaded).to(device)
    build: dict[str, Callable[[], ImageRuntime]] = {
        "torch": lambda: TorchImageRuntime(module),
        "onnx": lambda: OnnxImageRuntime(loaded.contents[art.ONNX], device, module.height, module.width,
                                         module.n_classes, module.class_log_prior),
    }
    rt, choice = load_runtime(runtime, art.ONNX in loaded.contents, build, image_probe(module), loaded.path)
    return LoadedImageModel(artifact=loaded, module=module, runtime=rt, calibration=read_calibration(loaded),
                            device=device, reference=load_reference(loaded),
                            neighbours=load_neighbours(loaded), gaussians=load_class_gaussians(loaded),
                            choice=choice)


def image_probe(module: ImageModel) -> Callable[[ImageRuntime, int], ImageScore]:
    """Scores `batch` random images (with labels for a conditional model: what most requests carry, and one
    pass rather than one per class)."""
    rng = np.random.default_rng(0)
    n = max(PROBE_BATCHES)
    images = rng.integers(0, module.levels, (n, module.height, module.width))
    labels = rng.integers(0, module.n_classes, n) if module.n_classes else None
    return lambda rt, batch: rt.score(images[:batch], None if labels is None else labels[:batch])
