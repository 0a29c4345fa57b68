"""What serves each model family (genserve.artifacts.families: text, image, latent, records): the Ray Serve
deployment that hosts one of its models, the loader that loads one in this process (LocalScorer, `genserve score
--local`), and the replica contract its deployment keeps (service/replicas.py).

    family = serving_family(manifest)           # ArtifactError for a kind no family has with this input
    family.deployment().options(name=...).bind(artifact_path)
    family.load(artifact_path, runtime, device)  # in process

The deployments and loaders are named by import path and imported on first use: in-process scoring never loads
Ray Serve, and the modules behind them may use this table without an import circle.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genserve.artifacts import artifact as art
from genserve.artifacts.families import IMAGE, LATENT, RECORDS, TEXT, Family, family_of
from genserve.service.replicas import ImageReplica, RecordsReplica, Replica, TextReplica


@dataclass(frozen=True)
class ServingFamily:
    family: Family
    deployment_path: str  # "module:name" of its Ray Serve deployment
    loader_path: str  # "module:name" of (artifact_path, runtime, device) -> the model loaded in this process
    contract: type[Replica]  # the Protocol its deployment's class keeps

    @property
    def name(self) -> str:
        return self.family.name

    def deployment(self) -> Any:
        """The Ray Serve deployment (`serve.Deployment`) that hosts one model of this family."""
        return _resolve(self.deployment_path)

    def loader(self) -> Callable[[str, str, str | None], Any]:
        """The in-process loader: (artifact_path, runtime, device) -> the loaded model."""
        return _resolve(self.loader_path)

    def load(self, path: str | Path, runtime: str = "auto", device: str | None = None) -> Any:
        """The artifact at `path` loaded in this process on `device` (default: CUDA when there is one), scoring
        in `runtime` (torch, onnx, auto): what its replicas load, without Ray."""
        return self.loader()(str(path), runtime, device)


SERVING: dict[str, ServingFamily] = {s.name: s for s in (
    ServingFamily(TEXT, "genserve.service.text:TextDeployment", "genserve.service.text_runtime:load_text_scorer",
                  TextReplica),
    ServingFamily(IMAGE, "genserve.service.image:ImageDeployment", "genserve.service.image_runtime:load_image_model",
                  ImageReplica),
    ServingFamily(LATENT, "genserve.service.latent:LatentImageDeployment",
                  "genserve.service.latent:load_latent_model", ImageReplica),
    ServingFamily(RECORDS, "genserve.service.records:RecordsDeployment", "genserve.service.records_runtime:load_model",
                  RecordsReplica),
)}


def serving_family(manifest: art.Manifest) -> ServingFamily:
    """What serves the artifact of `manifest`: by its kind and input type (ArtifactError when no family has both)."""
    try:
        return SERVING[family_of(manifest.kind, manifest.input.type).name]
    except ValueError as e:
        raise art.ArtifactError(f"model {manifest.name!r}: {e}") from None


def require_family(loaded: art.Artifact, family: Family) -> None:
    """ArtifactError naming the manifest unless the artifact's kind and input type are `family`'s."""
    kind, input_type = loaded.manifest.kind, loaded.manifest.input.type
    if kind not in family.kinds or input_type != family.input_type:
        raise art.ArtifactError(f"{loaded.path / art.MANIFEST}: kind {kind!r} with {input_type!r} input is not of the "
                                f"{family.name} family ({', '.join(family.kinds)} with {family.input_type!r} input)")


def _resolve(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)
