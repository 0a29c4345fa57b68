"""Loading a text artifact into a `LanguageModel` (torch, or ONNX Runtime for the transformer)
and its tokenizer. The device is chosen at load time: CUDA when this process has a GPU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genserve.artifacts import artifact as art
from genserve.artifacts.families import TEXT
from genserve.artifacts.neighbours import NeighbourIndex, load_neighbours
from genserve.artifacts.reference import load_reference
from genserve.artifacts.store import load_artifact_at
from genserve.artifacts.tokenizer import TextTokenizer
from genserve.models.gpt import GPTConfig
from genserve.models.lm import LanguageModel, mean_hidden_states
from genserve.models.registry import build_text_model
from genserve.service.devices import pick_device
from genserve.service.families import require_family
from genserve.service.runtime_choice import RuntimeName, check_runtime_name


@dataclass
class LoadedTextModel:
    artifact: art.Artifact
    model: LanguageModel  # for decoding: torch or ONNX Runtime
    scorer: LanguageModel  # for scoring whole texts: always torch
    tokenizer: TextTokenizer
    runtime_name: str  # the decoding runtime: torch or onnx (the others hold a runtime object; this one, its model)
    device: str
    reference: torch.nn.Module | None = None  # likelihood-ratio reference (artifacts/reference.py), on CPU
    neighbours: NeighbourIndex | None = None  # the knn score's index of training lines' hidden states, on CPU

    @property
    def spec(self) -> art.TextInputSpec:
        return self.artifact.manifest.input  # type: ignore[return-value]


def build_text_module(loaded: art.Artifact) -> torch.nn.Module:
    """The torch module of a text artifact, weights loaded and verified against the config."""
    require_family(loaded, TEXT)
    kind, config = loaded.manifest.kind, loaded.manifest.config
    try:
        if kind == "ngram":  # tables sized by what was counted: rebuilt from the weights themselves
            from safetensors.torch import load

            from genserve.models.ngram import NGramConfig, NGramLM

            return NGramLM.from_state_dict(NGramConfig(**config), load(loaded.contents[art.WEIGHTS])).eval()
        module: torch.nn.Module = build_text_model(kind, config)
    except (TypeError, ValueError) as e:
        raise art.ArtifactError(f"{loaded.path / art.MANIFEST}: invalid {kind} config ({e})") from None
    art.load_module_weights(module, loaded.contents[art.WEIGHTS], loaded.path / art.WEIGHTS)
    return module.eval()


def load_tokenizer(loaded: art.Artifact) -> TextTokenizer:
    spec = loaded.manifest.input
    if not isinstance(spec, art.TextInputSpec):
        raise art.ArtifactError(f"{loaded.path}: not a text model (input type {spec.type!r})")
    if art.TOKENIZER not in loaded.contents:
        raise art.ArtifactError(f"{loaded.path}: the manifest lists no {art.TOKENIZER}")
    try:
        tokenizer = TextTokenizer.from_json(loaded.contents[art.TOKENIZER], spec.tokenizer, spec.bos_token_id,
                                            spec.eos_token_id)
    except Exception as e:  # the tokenizers library raises its own exception types
        raise art.ArtifactError(f"{loaded.path / art.TOKENIZER}: not a valid tokenizer ({e})") from None
    if tokenizer.vocab_size > spec.vocab_size:
        raise art.ArtifactError(f"{loaded.path / art.TOKENIZER}: {tokenizer.vocab_size} tokens, more than the "
                                f"model's vocabulary of {spec.vocab_size}")
    return tokenizer


def resolve_text_runtime(runtime: RuntimeName) -> str:
    """auto is torch for text models: decoding on torch's in-place KV cache measured about twice as fast
    as ONNX Runtime with the cache passed in and out (4x128 char GPT, CPU); ONNX Runtime on request."""
    return "torch" if runtime == "auto" else runtime


def load_text_model(path: str | Path, runtime: RuntimeName = "auto", device: str | None = None) -> LoadedTextModel:
    loaded = load_artifact_at(str(path))
    tokenizer = load_tokenizer(loaded)
    device = device or pick_device()
    module = build_text_module(loaded).to(device)
    has_onnx = art.ONNX_DECODE in loaded.contents and art.ONNX_PREFILL in loaded.contents
    chosen = resolve_text_runtime(runtime)
    model: Any = module
    if chosen == "onnx":
        if not has_onnx:
            raise art.ArtifactError(f"{loaded.path}: runtime 'onnx' asked for, but the artifact has no "
                                    f"{art.ONNX_PREFILL} and {art.ONNX_DECODE}")
        from genserve.service.onnx_text import OnnxGPT

        model = OnnxGPT(loaded.contents[art.ONNX_PREFILL], loaded.contents[art.ONNX_DECODE],
                        GPTConfig(**loaded.manifest.config), device)
        device = model.device
    elif chosen != "torch":
        raise ValueError(f"unknown runtime {runtime!r}; use 'torch', 'onnx' or 'auto'")
    return LoadedTextModel(artifact=loaded, model=model, scorer=module, tokenizer=tokenizer, runtime_name=chosen,
                           device=str(device), reference=load_reference(loaded), neighbours=load_neighbours(loaded))


@torch.inference_mode()
def text_knn_distances(loaded: LoadedTextModel, token_lists: list[list[int]]) -> np.ndarray | None:
    """The knn score's raw distances of token lists (each from its context token): the scorer's mean final hidden
    state against the artifact's index of training lines; None when the artifact has no index."""
    if loaded.neighbours is None:
        return None
    return loaded.neighbours.distance(mean_hidden_states(loaded.scorer, token_lists).numpy())


def load_text_scorer(path: str | Path, runtime: RuntimeName = "auto", device: str | None = None) -> LoadedTextModel:
    """A text artifact loaded for scoring in this process (LocalScorer): scoring always runs in torch
    (`LoadedTextModel.scorer`), so `runtime`, which picks the decoding runtime, loads nothing more."""
    check_runtime_name(runtime)
    return load_text_model(path, "torch", device)
