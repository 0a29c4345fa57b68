"""Request and response bodies of genserve's own REST API (/v1, but for OpenAI's completions); the OpenAPI schema
at /docs is generated from these. service/client.py uses the same models, so the client and the server cannot
drift apart.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, WithJsonSchema, model_validator

from genserve.artifacts.artifact import DensityCapability
from genserve.service.api.common import DecodingOptions, StopStrings, Usage
from genserve.service.limits import Limits
from genserve.service.services.anomaly import SCORE_DESCRIPTION, ScoreType

# The anomaly results are the anomaly service's own (the in-process scorer returns them too); /v1 sends them as is.
from genserve.service.services.anomaly import AnomalyResponse as AnomalyResponse
from genserve.service.services.anomaly import AnomalyResult as AnomalyResult

# JSON numbers only: strict mode refuses strings and booleans, allow_inf_nan=False refuses the
# NaN/Infinity literals that Python's JSON parser would otherwise accept.
FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Record = Annotated[list[FiniteNumber], Field(min_length=1)]

# An image: H lists of W integer grey levels in [0, levels), or a base64 PNG string. Checked by the gateway
# (service/image_codec.py) against the model's size and levels, so errors name the image, row and column.
ImageInput = Annotated[
    Any,
    WithJsonSchema({
        "oneOf": [
            {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}},
             "description": "height lists (rows, top first) of width integer grey levels in [0, levels)"},
            {"type": "string", "description": "base64 PNG, optionally prefixed data:image/png;base64, - one "
             "channel (mode L, 8-bit grey, or mode 1), exactly the model's width x height; 8-bit value v is "
             "read as level round(v * (levels - 1) / 255); needs levels <= 256"},
        ],
    }),
]
Label = Annotated[StrictInt, Field(description="class label in [0, n_classes)")]
ImageFormat = Literal["array", "png"]
IMAGES_DESCRIPTION = (
    "images of the model's height x width: each a list of rows of integer levels in [0, levels), or a base64 "
    "PNG (mode L or 1). At most limits.max_images_per_request. Image models only; give records or images"
)
LABELS_DESCRIPTION = (
    "class-conditional image models: one label in [0, n_classes) per image, to score log p(x | label); "
    "omitted: the exact marginal log p(x) = log sum_y p(y) p(x | y). Unconditional models take none"
)


class ErrorDetail(BaseModel):
    type: str = Field(description="machine-readable category, e.g. invalid_request, not_found")
    message: str = Field(description="what was wrong and what is allowed")
    param: str | None = Field(None, description="text routes (generate, score): the request field at fault")
    request_id: str | None = Field(None, description="the request's X-Request-ID, to find it in the server's logs")


class ErrorResponse(BaseModel):
    """genserve's error body: the /v1 routes (OpenAI's completions has OpenAI's, /v2 the protocol's)."""

    error: ErrorDetail


class InputInfo(BaseModel):
    type: Literal["records", "text", "image"]
    n_features: int | None = Field(None, description="records: features per record")
    feature_names: list[str] | None = Field(None, description="records: feature names, in order")
    tokenizer: Literal["char", "bpe"] | None = Field(None, description="text: the tokenizer's kind")
    vocab_size: int | None = Field(None, description="text: tokens in the vocabulary")
    context_length: int | None = Field(None, description="text: longest sequence (prompt + generated), tokens")
    height: int | None = Field(None, description="image: rows per image")
    width: int | None = Field(None, description="image: pixels per row")
    levels: int | None = Field(None, description="image: grey levels per pixel, integers 0..levels-1 (2: binary)")
    n_classes: int | None = Field(None, description="image: class labels 0..n_classes-1 (0: not class-conditional)")
    class_names: list[str] | None = Field(None, description="image: what each label means, by index")


class CalibrationInfo(BaseModel):
    score: str = Field(description="the default score type: the artifact's own (its calibration names it and why), "
                       "else its kind's")
    why: str | None = Field(None, description="how the artifact's default score type was chosen (on held-out normal "
                            "data only); null for artifacts calibrated before the ensemble, which use their kind's")
    ensemble_members: list[str] = Field([], description="the score types the ensemble score combines")
    ensemble_primary: list[str] = Field([], description="the members whose calibrated tails the ensemble averages "
                                        "to rank items; each other member adds only its tail beyond its held-out "
                                        "99th percentile")
    n_heldout: int = Field(description="held-out in-distribution items the default score was calibrated on")
    false_positive_rate: float = Field(description="the default false-positive rate of the thresholds")
    threshold: float = Field(description="the default score's threshold at that rate")
    thresholds: dict[str, float] = Field(
        {}, description="every calibrated score type's threshold at that rate (text per-line scores: line:NAME)"
    )
    quantiles: dict[str, list[float]] = Field(
        {}, description="every calibrated score type's held-out score quantiles at levels 0, 0.01, ..., 1 (101 "
        "values, non-decreasing): the held-out distribution, e.g. for a histogram (the playground draws one)"
    )


class RuntimeChoiceInfo(BaseModel):
    requested: str = Field(description="the runtime asked for: torch, onnx, or auto (the faster, timed at load)")
    seconds: dict[str, dict[str, float]] = Field(
        {}, description="auto, when the artifact has a graph: median seconds per call of each runtime (torch, "
        "onnx) at each probe batch size, measured when the replica loaded the model"
    )
    rule: str = Field("", description="why this runtime serves")


class ModelInfo(BaseModel):
    name: str
    version: str
    kind: str
    created: str
    runtime: str = Field(description="torch or onnx")
    density: DensityCapability = Field(description="what log_prob and anomaly give: exact (autoregressive models, "
                                       "mixtures, flows), bound (a lower bound on log p(x)) or none (sampling only)")
    runtime_choice: RuntimeChoiceInfo | None = Field(
        None, description="how the runtime was chosen (density and image models; a replica's, when replicated)"
    )
    scored_in: Literal["replica", "gateway"] = Field(
        "replica", description="where this version's requests are scored: its model replicas, or (a small model "
        "of records on the CPU: its score_in_gateway_below_ms option) the Gateway replica that answered, one "
        "Ray Serve hop fewer")
    input: InputInfo
    config: dict[str, Any]
    metrics: dict[str, Any]
    training: dict[str, Any]
    calibration: CalibrationInfo | None = Field(None, description="anomaly calibration, for density models")
    limits: Limits
    pictures: list[str] = Field([], description="the artifact's pictures (loss_curve.png, samples.png), served at "
                                "/v1/models/{name}/files/{filename}")


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "genserve"


class ModelList(BaseModel):
    models: list[ModelInfo]
    # The same list in OpenAI's shape, so OpenAI clients' models.list() works too.
    object: Literal["list"] = "list"
    data: list[OpenAIModel] = []


def _records_or_images(body: Any) -> None:
    if (body.records is None) == (body.images is None):
        raise ValueError("give exactly one of records (models of records) or images (image models)")


class LogProbRequest(BaseModel):
    records: list[Record] | None = Field(
        None, min_length=1, description="models of records: raw (unstandardised) records, one list of numbers per "
        "record. Give records or images"
    )
    images: list[ImageInput] | None = Field(None, min_length=1, description=IMAGES_DESCRIPTION)
    labels: list[Label] | None = Field(None, description=LABELS_DESCRIPTION)
    responsibilities: bool = Field(False, description="GMMs: also return each mixture component's posterior")
    per_pixel: bool = Field(False, description="image models: also return each pixel's log p(x_i | x_<i [, y]) in "
                            "nats, rows of columns per image; they sum to log_prob")
    importance_samples: int | None = Field(
        None, ge=1, le=1000, description="models whose density is a bound (VAEs): K, the samples per image of the "
        "importance-weighted bound (1: an ELBO estimate; larger: tighter); default the model's, the K its "
        "calibration used")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="bound models: seed of the importance samples "
                             "(default 0: the same request gives the same bound)")

    model_config = {"extra": "forbid", "json_schema_extra": {"examples": [{"records": [[1.0, 2.0, 3.0]]},
                                                       {"images": [[[0, 1], [1, 0]]], "per_pixel": True}]}}

    @model_validator(mode="after")
    def _one_input(self) -> LogProbRequest:
        _records_or_images(self)
        return self


class LogProbResponse(BaseModel):
    model: str
    version: str
    log_prob: list[float] = Field(description="log p(x) in nats, per record or image (log p(x | label) when "
                                  "labels were given)")
    bits_per_dim: list[float] = Field(description="-log2 p(x) / number of features (records) or of pixels, "
                                      "height * width (images)")
    responsibilities: list[list[float]] | None = None
    density: DensityCapability = Field("exact", description="exact: log_prob is log p(x) itself; bound: a lower "
                                       "bound on it")
    per_pixel: list[list[list[float]]] | None = Field(
        None, description="images, with per_pixel: log p(x_i | x_<i [, y]) in nats, per image, row and column"
    )


class AnomalyRequest(BaseModel):
    records: list[Record] | None = Field(None, min_length=1, description="models of records: raw records. Give "
                                         "exactly one of records, images or texts")
    images: list[ImageInput] | None = Field(None, min_length=1, description=IMAGES_DESCRIPTION)
    texts: list[str] | None = Field(None, min_length=1, description="text models: texts, each scored whole from "
                                    "BOS (or per line, with per_line); at most limits.max_texts_per_request, each "
                                    "within the model's context length")
    labels: list[Label] | None = Field(None, description=LABELS_DESCRIPTION + "; the calibration is of the "
                                       "marginal, so labels are rarely what you want here")
    score: ScoreType | None = Field(None, description=SCORE_DESCRIPTION)
    per_line: bool = Field(False, description="text models: score every non-blank line of each text on its own "
                           "(from BOS) against the per-line calibration; results carry text_index and line")
    threshold: FiniteNumber | None = Field(
        None, description="flag items whose score exceeds this (in the score's units); overrides the calibrated "
        "threshold"
    )
    false_positive_rate: float | None = Field(
        None, gt=0.0, lt=1.0, description="flag at this held-out false-positive rate instead of the default (0.01)"
    )
    batch_test: bool = Field(False, description="also test all the items together: is the batch's mean nll (texts: "
                             "bits_per_char) as close to the typical set as batches of held-out normal items of its "
                             "size are (Nalisnick et al. 2019's typicality test)? The response's batch field says, "
                             "with a p-value; a batch can be atypical when no item alone is")

    model_config = {"extra": "forbid", "json_schema_extra": {"examples": [
        {"records": [[1.0, 2.0, 3.0]]}, {"images": [[[0, 1], [1, 0]]], "score": "complexity"},
        {"texts": ["To be, or not to be"], "score": "bits_per_char", "false_positive_rate": 0.05}]}}

    @model_validator(mode="after")
    def _one_threshold(self) -> AnomalyRequest:
        if sum(x is not None for x in (self.records, self.images, self.texts)) != 1:
            raise ValueError("give exactly one of records (models of records), images (image models) or texts "
                             "(text models)")
        if self.threshold is not None and self.false_positive_rate is not None:
            raise ValueError("give threshold or false_positive_rate, not both")
        return self


class SampleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(1, ge=1, description="number of samples (image models: at most limits.max_images_per_request; "
                   "models of records: limits.max_samples_per_request)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed, same samples")
    labels: list[Label] | None = Field(None, description="class-conditional image models: the label of each of "
                                       "the n images (n labels in [0, n_classes)); omitted: drawn from the "
                                       "class prior")
    label: Label | None = Field(None, description="class-conditional image models: one label for all n images")
    format: ImageFormat = Field("array", description="image models: images as arrays of levels, or base64 PNGs")

    @model_validator(mode="after")
    def _one_label_field(self) -> SampleRequest:
        if self.labels is not None and self.label is not None:
            raise ValueError("give labels (one per image) or label (one for all), not both")
        return self


class SampleResponse(BaseModel):
    model: str
    version: str
    feature_names: list[str]
    samples: list[list[float]]


class GeneratedImage(BaseModel):
    label: int | None = Field(description="the image's class label (given, or drawn); null for unconditional "
                              "models")
    log_prob: float | None = Field(description="log p(image | label) in nats (log p(image) when unconditional): "
                                   "exact for autoregressive models, a lower bound for a VAE, null for a GAN")
    array: list[list[int]] | None = Field(None, description="format array: rows of integer levels")
    png: str | None = Field(None, description="format png: base64 8-bit grey PNG, level l stored as "
                            "round(l * 255 / (levels - 1))")



class ReconstructRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: list[ImageInput] = Field(min_length=1, description=IMAGES_DESCRIPTION)
    format: Literal["array", "png"] = Field("array", description="how images come back")


class ReconstructResponse(BaseModel):
    model: str
    version: str
    images: list[GeneratedImage] = Field(description="each image decoded from its posterior mean (the most likely "
                                         "level of every pixel); log_prob is null")


class InterpolateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: list[ImageInput] = Field(min_length=2, max_length=2, description="the two end images; "
                                     + IMAGES_DESCRIPTION)
    steps: int = Field(8, ge=2, le=64, description="images on the path, both ends included")
    format: Literal["array", "png"] = Field("array", description="how images come back")


class InterpolateResponse(BaseModel):
    model: str
    version: str
    images: list[GeneratedImage] = Field(description="decoded (most likely levels) from evenly spaced points on the "
                                         "line between the two images' posterior means; log_prob is null")


class ImageSampleResponse(BaseModel):
    model: str
    version: str
    height: int
    width: int
    levels: int
    images: list[GeneratedImage]


class CompleteRequest(BaseModel):
    images: list[ImageInput] = Field(
        min_length=1, description="partial images at full size (array or PNG, as in log_prob); pixels after the "
        "known prefix are ignored (in arrays they may be any integer or null)"
    )
    known_rows: int | None = Field(None, ge=0, description="keep the top known_rows rows, in [0, height]; give "
                                   "this or known_pixels")
    known_pixels: int | None = Field(None, ge=0, description="keep the first known_pixels pixels in raster order "
                                     "(row by row), in [0, height * width]; give this or known_rows")
    n: int = Field(1, ge=1, description="completions per image; len(images) * n is at most "
                   "limits.max_images_per_request")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed, same completions")
    labels: list[Label] | None = Field(None, description="class-conditional models: one label per image; omitted: "
                                       "each completion's label is drawn from p(label | known pixels)")
    format: ImageFormat = Field("array", description="completions as arrays of levels, or base64 PNGs")

    model_config = {"extra": "forbid",
                    "json_schema_extra": {"examples": [{"images": [[[0, 1], [0, 0]]], "known_rows": 1, "n": 2}]}}

    @model_validator(mode="after")
    def _one_prefix(self) -> CompleteRequest:
        if (self.known_rows is None) == (self.known_pixels is None):
            raise ValueError("give exactly one of known_rows or known_pixels")
        return self


class CompleteResponse(BaseModel):
    model: str
    version: str
    height: int
    width: int
    levels: int
    known_pixels: int = Field(description="pixels kept from each input, in raster order")
    completions: list[list[GeneratedImage]] = Field(description="per input image, its n completions")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    models: dict[str, bool]


# ---- text models: generate and score -------------------------------------------------------------


class GenerateRequest(DecodingOptions):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"prompt": "ROMEO:\n", "max_new_tokens": 100, "temperature": 0.8, "top_k": 40, "seed": 1}]})

    prompt: str = Field("", description="text to continue; empty starts a new text")
    max_new_tokens: int | None = Field(None, ge=1, description="tokens to generate at most; default 64, or the "
                                       "server's limit if that is lower")
    stop: StopStrings | None = Field(None, description="stop before the first of these strings (at most 8)")
    n: int = Field(1, ge=1, description="independent samples of the same prompt")
    num_return_sequences: int | None = Field(None, ge=1, description="beam search: beams returned (<= num_beams)")
    logprobs: bool = Field(False, description="return each generated token with its log-probability")
    top_logprobs: int = Field(0, ge=0, le=20, description="with logprobs: also the most likely alternatives")
    stream: bool = Field(False, description="Server-Sent Events, one per step, then `data: [DONE]`")


class TokenLogprob(BaseModel):
    id: int
    text: str
    logprob: float = Field(description="log p(token | everything before it), nats, under the model")
    top: list[TokenLogprob] | None = None


class Completion(BaseModel):
    index: int
    text: str
    token_ids: list[int] = Field(description="generated tokens, including a final end-of-text token if any")
    finish_reason: Literal["stop", "length"] = Field(description="stop: EOS or a stop string; length: max tokens")
    stop: str | None = Field(None, description="the stop string that ended generation, if one did")
    log_prob: float = Field(description="sum of the generated tokens' log-probabilities, nats")
    score: float | None = Field(None, description="beam search: the length-normalised score beams are ranked by")
    tokens: list[TokenLogprob] | None = None


class GenerateResponse(BaseModel):
    model: str
    version: str
    completions: list[Completion]
    usage: Usage


class StreamChunk(BaseModel):
    """One Server-Sent Event of a streamed generate: text added to one completion."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"] | None = None
    tokens: list[TokenLogprob] | None = None
    usage: Usage | None = Field(None, description="in the last event only")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"texts": ["To be, or not to be, that is the question."]}]})

    texts: list[str] = Field(min_length=1, description="texts to score, each as a whole")
    per_token: bool = Field(True, description="also return every token's log-probability")


class TextScore(BaseModel):
    log_prob: float = Field(description="log p(text), nats: the sum over its tokens, the first given BOS")
    n_tokens: int
    n_chars: int
    nats_per_token: float
    perplexity: float = Field(description="exp(nats per token)")
    bits_per_char: float = Field(description="-log2 p(text) / characters: comparable across tokenizers")
    tokens: list[TokenLogprob] | None = None


class ScoreResponse(BaseModel):
    model: str
    version: str
    results: list[TextScore]


# ---- model management (/v1/admin; the admin role when API keys are on) ---------------------------------

VersionId = Annotated[str, Field(pattern=r"^[0-9]{1,9}$", description="a version number, as in the store")]
VersionState = Literal["READY", "LOADING", "UNLOADING", "UNAVAILABLE", "UNLOADED"]


class ManagedVersion(BaseModel):
    version: str
    state: VersionState
    reason: str = Field(description="why it is not READY (a failed load's error); empty when it is")
    since: float = Field(description="when it entered this state, seconds since the epoch")


class ManagedModel(BaseModel):
    name: str
    default_version: str | None = Field(description="the version unversioned requests go to, with no split")
    traffic: dict[str, int] = Field(description="percent of the unversioned requests per version")
    version_policy: str = Field(description="which versions in the store are loaded: latest N, all, specific")
    versions: list[ManagedVersion]


class ManagementStatus(BaseModel):
    control: Literal["none", "explicit", "poll"] = Field(description="the model control mode")
    started: bool = Field(description="the models served at start are loaded (or failed)")
    generation: int = Field(description="bumped on every change of what is served")
    models: list[ManagedModel]


class StoreVersion(BaseModel):
    name: str
    version: str
    state: VersionState
    reason: str


class VersionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"version": "2"}]})
    version: VersionId | None = Field(None, description="one version; default: what the model's version policy "
                                      "selects (load) or every loaded version (unload)")


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"version": "2"}]})
    version: VersionId = Field(description="the version that becomes the default, with all the traffic (loaded "
                               "first when it is not)")


class TrafficRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"split": {"3": 90, "4": 10}}]})
    split: dict[VersionId, Annotated[int, Field(ge=0, le=100)]] = Field(
        min_length=1, max_length=16, description="percent of the unversioned requests per READY version, summing "
        "to 100; the version with the most becomes the default")

    @model_validator(mode="after")
    def sums_to_100(self) -> TrafficRequest:
        if sum(self.split.values()) != 100:
            raise ValueError(f"the percentages must sum to 100, not {sum(self.split.values())}")
        return self
