"""Model kinds by name (image models, density models of records): the artifact's `kind` and config rebuild the
module from these."""

from __future__ import annotations

import importlib
from dataclasses import fields
from typing import Any

from genserve.models.image import ImageModel

# kind -> (module, config class, model class); imported on first use.
IMAGE_MODELS: dict[str, tuple[str, str, str]] = {
    "pixelcnn": ("genserve.models.pixelcnn", "PixelCNNConfig", "GatedPixelCNN"),
    "made": ("genserve.models.made", "MADEConfig", "MADE"),
    "nade": ("genserve.models.nade", "NADEConfig", "NADE"),
    "fvsbn": ("genserve.models.fvsbn", "FVSBNConfig", "FVSBN"),
}


def image_classes(kind: str) -> tuple[type, type[ImageModel]]:
    if kind not in IMAGE_MODELS:
        raise ValueError(f"unknown image model kind {kind!r}; known: {', '.join(sorted(IMAGE_MODELS))}")
    module_name, config_name, model_name = IMAGE_MODELS[kind]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, model_name)


def build_image_model(kind: str, config: dict[str, Any]) -> ImageModel:
    """A fresh module of `kind` from its config's fields (lists become tuples, as JSON loses them)."""
    return _build(IMAGE_MODELS, "image model", kind, config)


def _build(registry: dict[str, tuple[str, str, str]], family: str, kind: str, config: dict[str, Any]) -> Any:
    """A fresh module of `kind` in `registry` from its config's fields; unknown kinds and fields are named."""
    if kind not in registry:
        raise ValueError(f"unknown {family} kind {kind!r}; known: {', '.join(sorted(registry))}")
    module_name, config_name, model_name = registry[kind]
    module = importlib.import_module(module_name)
    config_cls, model_cls = getattr(module, config_name), getattr(module, model_name)
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{kind} config has unknown fields {unknown}; known: {sorted(known)}")
    return model_cls(config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}))


# Density models of records (continuous tabular data): kind -> (module, config class, model class). Each takes
# raw float64 records, stores its standardisation, and returns (log p(x), responsibilities) from forward, the
# responsibilities (N, K) for a mixture and (N, 0) otherwise.
RECORDS_MODELS: dict[str, tuple[str, str, str]] = {
    "gmm": ("genserve.models.gmm", "GMMConfig", "GaussianMixture"),
    "realnvp": ("genserve.models.flow", "RealNVPConfig", "RealNVP"),
    "made-mog": ("genserve.models.made_mog", "MADEMoGConfig", "MADEMoG"),
}


def build_records_model(kind: str, config: dict[str, Any]) -> Any:
    """A fresh records model of `kind` from its config's fields."""
    return _build(RECORDS_MODELS, "records model", kind, config)


# Latent-variable image models: no per-pixel factorisation, so no completion; a VAE bounds log p(x) (density
# `bound`), a GAN only samples (`none`). kind -> (module, config class, the served module's class).
LATENT_MODELS: dict[str, tuple[str, str, str]] = {
    "vae": ("genserve.models.vae", "VAEConfig", "ConvVAE"),
    "gan": ("genserve.models.gan", "GANConfig", "Generator"),  # the artifact's weights are the generator's
    # RealNVP on dequantised images: an image artifact of kind realnvp (a records one is in RECORDS_MODELS; the
    # artifact's input type tells them apart). Exact for the continuous variable, a bound for discrete images.
    "realnvp": ("genserve.models.image_flow", "ImageFlowConfig", "ImageRealNVP"),
}


def build_latent_model(kind: str, config: dict[str, Any]) -> Any:
    """The served module of a latent-variable image model (a GAN's generator) from its config's fields."""
    return _build(LATENT_MODELS, "latent-variable model", kind, config)


# Language models over tokens: kind -> (module, config class, model class). An n-gram model's tables are sized by
# what it counted, so it is rebuilt with NGramLM.from_state_dict rather than from its config alone.
TEXT_MODELS: dict[str, tuple[str, str, str]] = {
    "gpt": ("genserve.models.gpt", "GPTConfig", "GPT"),
    "lstm": ("genserve.models.lstm", "LSTMConfig", "CharLSTM"),
    "ngram": ("genserve.models.ngram", "NGramConfig", "NGramLM"),
}


def build_text_model(kind: str, config: dict[str, Any]) -> Any:
    """A fresh language model of `kind` from its config's fields (untrained: load its weights next)."""
    return _build(TEXT_MODELS, "text model", kind, config)
