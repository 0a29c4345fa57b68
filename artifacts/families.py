"""Model families: the one table of which artifact kinds exist and the family each belongs to.

A family is what serving and training do with a model, whatever its architecture: `text` (autoregressive over
tokens: generate, score), `image` (autoregressive over pixels: exact log p(x), sampling, completion), `latent`
(image models without a per-pixel factorisation: a VAE's bound, a GAN's samples, a flow on dequantised images) and
`records` (densities of continuous tabular data: GMM, RealNVP, MADE-MoG). An artifact's `kind` and its input type
name its family: `realnvp` is a records model or a latent image model depending on its input. The modules behind
each kind are models/registry.py's; what serves each family is service/families.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

from genserve.models.registry import IMAGE_MODELS, LATENT_MODELS, RECORDS_MODELS, TEXT_MODELS

TEXT_KINDS: tuple[str, ...] = tuple(TEXT_MODELS)
IMAGE_KINDS: tuple[str, ...] = tuple(IMAGE_MODELS)
LATENT_KINDS: tuple[str, ...] = tuple(LATENT_MODELS)
RECORDS_KINDS: tuple[str, ...] = tuple(RECORDS_MODELS)
GMM_KIND = "gmm"  # the one records kind with mixture components (responsibilities)


@dataclass(frozen=True)
class Family:
    name: str  # text | image | latent | records
    input_type: str  # the manifest's input.type these kinds take
    kinds: tuple[str, ...]


TEXT = Family("text", "text", TEXT_KINDS)
IMAGE = Family("image", "image", IMAGE_KINDS)
LATENT = Family("latent", "image", LATENT_KINDS)
RECORDS = Family("records", "records", RECORDS_KINDS)
# Order matters where a kind is in two families: an image input picks the first family that has the kind.
FAMILIES: tuple[Family, ...] = (TEXT, IMAGE, LATENT, RECORDS)


def family_of(kind: str, input_type: str) -> Family:
    """The family of an artifact of `kind` whose input is of `input_type`; ValueError naming what is known."""
    for family in FAMILIES:
        if kind in family.kinds and family.input_type == input_type:
            return family
    known = ", ".join(f"{f.name} ({f.input_type} input): {', '.join(f.kinds)}" for f in FAMILIES)
    raise ValueError(f"no model family has kind {kind!r} with {input_type!r} input; known: {known}")
