"""Models of records (GMM, RealNVP, MADE-MoG) loaded for scoring, in torch or ONNX Runtime, on CPU or CUDA: the
runtimes of the records family (the image and text families' are image_runtime.py and text_runtime.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from genserve.artifacts import artifact as art
from genserve.artifacts.calibration import CalibrationSet, read_calibration
from genserve.artifacts.families import RECORDS
from genserve.artifacts.neighbours import NeighbourIndex, load_neighbours
from genserve.artifacts.reference import load_reference
from genserve.artifacts.store import load_artifact_at
from genserve.models.registry import build_records_model as build_records_model_of_kind
from genserve.service.devices import pick_device
from genserve.service.families import require_family
from genserve.service.onnx_session import open_session, session_device
from genserve.service.runtime_choice import PROBE_BATCHES, RuntimeChoice, RuntimeName, load_runtime

RecordsModel = Any  # models.gmm.GaussianMixture, models.flow.RealNVP, models.made_mog.MADEMoG


class RecordsRuntime(Protocol):
    name: str
    device: str

    def log_prob(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) raw records -> log p(x) (N,), responsibilities (N, K)."""
        ...


def build_records_model(loaded: art.Artifact) -> RecordsModel:
    """The artifact's model of records (a GMM, RealNVP or MADE-MoG), weights loaded, in eval mode."""
    require_family(loaded, RECORDS)
    try:
        model = build_records_model_of_kind(loaded.manifest.kind, loaded.manifest.config)
        model.load_state_dict(load_safetensors(loaded.contents[art.WEIGHTS]))
    except (TypeError, RuntimeError, ValueError, SafetensorError) as e:
        raise art.ArtifactError(f"{loaded.path / art.WEIGHTS}: does not fit the manifest's config ({e})") from None
    return model.eval()


class TorchRecordsRuntime:
    name = "torch"

    def __init__(self, model: RecordsModel, device: str):
        self.device = device
        # A copy: the caller's module stays on the CPU, where seeded sampling is reproducible.
        self.model = copy.deepcopy(model).to(device)
        self.dtype = model.feature_mean.dtype

    @torch.inference_mode()
    def log_prob(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.as_tensor(records, dtype=self.dtype, device=self.device)
        log_prob, resp = self.model(x)
        return log_prob.cpu().numpy(), resp.cpu().numpy()


class OnnxRecordsRuntime:
    name = "onnx"

    def __init__(self, onnx_bytes: bytes, device: str):
        # As many threads as torch has (one per core unless this process was given fewer): the two runtimes
        # share a replica's CPU budget alike, and 'auto' compares them on equal terms.
        self.session = open_session(onnx_bytes, device, threads=torch.get_num_threads())
        self.device = session_device(self.session)
        self.input_name = self.session.get_inputs()[0].name

    def log_prob(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(records, np.float64)})
        log_prob = outputs[0]
        # A mixture's graph also gives responsibilities; others have none, (N, 0) as in torch.
        resp = outputs[1] if len(outputs) > 1 else np.zeros((len(log_prob), 0))
        return log_prob, resp


@dataclass
class LoadedRecordsModel:
    artifact: art.Artifact
    module: RecordsModel  # always loaded: sampling runs in torch
    runtime: RecordsRuntime
    calibration: CalibrationSet | None
    reference: torch.nn.Module | None = None  # likelihood-ratio reference model (one Gaussian)
    neighbours: NeighbourIndex | None = None  # the knn score's index of training records
    choice: RuntimeChoice | None = None  # how the runtime was chosen (timings, for 'auto')

    @property
    def n_features(self) -> int:
        return self.artifact.manifest.input.n_features


def load_model(path: str, runtime: RuntimeName = "auto", device: str | None = None) -> LoadedRecordsModel:
    """Verify and load an artifact directory into the requested runtime."""
    loaded = load_artifact_at(str(path))
    device = device or pick_device()
    module = build_records_model(loaded)
    build: dict[str, Callable[[], RecordsRuntime]] = {
        "torch": lambda: TorchRecordsRuntime(module, device),
        "onnx": lambda: OnnxRecordsRuntime(loaded.contents[art.ONNX], device),
    }
    rt, choice = load_runtime(runtime, art.ONNX in loaded.contents, build, records_probe(module), loaded.path)
    return LoadedRecordsModel(artifact=loaded, module=module, runtime=rt, calibration=read_calibration(loaded),
                       reference=load_reference(loaded), neighbours=load_neighbours(loaded), choice=choice)


def probe_records(module: RecordsModel, n: int = max(PROBE_BATCHES)) -> np.ndarray:
    """`n` records drawn from the model itself (seeded): valid inputs of the right shape and scale."""
    return module.sample(n, torch.Generator().manual_seed(0)).numpy()


def records_probe(module: RecordsModel) -> Callable[[RecordsRuntime, int], tuple[np.ndarray, np.ndarray]]:
    """Scores `batch` records drawn from the model itself."""
    records = probe_records(module)
    return lambda rt, batch: rt.log_prob(np.resize(records, (batch, records.shape[1])))

