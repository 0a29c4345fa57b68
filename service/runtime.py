"""Runtimes that evaluate a loaded artifact: torch eager or ONNX Runtime, on CPU or CUDA.

The device is chosen at load time: CUDA when this process was given a GPU and the runtime can use
it, the CPU otherwise. One code path for both.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from models.gmm import GaussianMixture, GMMConfig
from training import artifact as art
from training.calibration import CalibrationSet, read_calibration
from training.reference import load_reference

RuntimeName = Literal["torch", "onnx", "auto"]


class DensityRuntime(Protocol):
    name: str
    device: str

    def log_prob(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) raw records -> log p(x) (N,), responsibilities (N, K)."""
        ...


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_runtime(runtime: RuntimeName, has_onnx: bool) -> str:
    """'auto' means ONNX Runtime when the artifact has a graph, torch otherwise."""
    if runtime == "auto":
        return "onnx" if has_onnx else "torch"
    return runtime


def build_gmm(loaded: art.Artifact) -> GaussianMixture:
    if loaded.manifest.kind != "gmm":
        raise art.ArtifactError(f"{loaded.path}: kind {loaded.manifest.kind!r} is not a GMM")
    try:
        config = GMMConfig(**loaded.manifest.config)
        model = GaussianMixture(config)
        model.load_state_dict(load_safetensors(loaded.contents[art.WEIGHTS]))
    except (TypeError, RuntimeError, ValueError, SafetensorError) as e:
        raise art.ArtifactError(f"{loaded.path / art.WEIGHTS}: does not fit the manifest's config ({e})") from None
    return model.eval()


class TorchDensityRuntime:
    name = "torch"

    def __init__(self, model: GaussianMixture, device: str):
        self.device = device
        # A copy: the caller's module stays on the CPU, where seeded sampling is reproducible.
        self.model = copy.deepcopy(model).to(device)
        self.dtype = model.means.dtype

    @torch.inference_mode()
    def log_prob(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.as_tensor(records, dtype=self.dtype, device=self.device)
        log_prob, resp = self.model(x)
        return log_prob.cpu().numpy(), resp.cpu().numpy()


class OnnxDensityRuntime:
    name = "onnx"

    def __init__(self, onnx_bytes: bytes, device: str):
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(onnx_bytes, sess_options=options, providers=providers)
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.input_name = self.session.get_inputs()[0].name

    def log_prob(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        log_prob, resp = self.session.run(None, {self.input_name: np.ascontiguousarray(records, np.float64)})
        return log_prob, resp


@dataclass
class LoadedModel:
    artifact: art.Artifact
    module: GaussianMixture  # always loaded: sampling runs in torch
    runtime: DensityRuntime
    calibration: CalibrationSet | None
    reference: torch.nn.Module | None = None  # likelihood-ratio reference model (one Gaussian)

    @property
    def n_features(self) -> int:
        return self.artifact.manifest.input.n_features


def load_model(path: str, runtime: RuntimeName = "auto", device: str | None = None) -> LoadedModel:
    """Verify and load an artifact directory into the requested runtime."""
    loaded = art.load_artifact(Path(path))
    device = device or pick_device()
    module = build_gmm(loaded)
    runtime = resolve_runtime(runtime, art.ONNX in loaded.contents)
    if runtime == "onnx":
        if art.ONNX not in loaded.contents:
            raise art.ArtifactError(f"{loaded.path}: runtime 'onnx' asked for, but the artifact has no {art.ONNX}")
        rt: DensityRuntime = OnnxDensityRuntime(loaded.contents[art.ONNX], device)
    elif runtime == "torch":
        rt = TorchDensityRuntime(module, device)
    else:
        raise ValueError(f"unknown runtime {runtime!r}; use 'torch' or 'onnx'")
    return LoadedModel(artifact=loaded, module=module, runtime=rt, calibration=read_calibration(loaded),
                       reference=load_reference(loaded))
