"""Request and response bodies of the REST API; the OpenAPI schema at /docs is generated from these.

The same models are used by `service.client`, so the client and the server cannot drift apart.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

# JSON numbers only: strict mode refuses strings and booleans, allow_inf_nan=False refuses the
# NaN/Infinity literals that Python's JSON parser would otherwise accept.
FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Record = Annotated[list[FiniteNumber], Field(min_length=1)]


class ErrorDetail(BaseModel):
    type: str = Field(description="machine-readable category, e.g. invalid_request, not_found")
    message: str = Field(description="what was wrong and what is allowed")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Limits(BaseModel):
    max_records_per_request: int
    max_samples_per_request: int
    max_body_bytes: int
    max_new_tokens: int
    max_num_beams: int
    max_n: int
    max_texts_per_request: int
    max_prompts_per_request: int


class InputInfo(BaseModel):
    type: Literal["records", "text"]
    n_features: int | None = Field(None, description="records: features per record")
    feature_names: list[str] | None = Field(None, description="records: feature names, in order")
    tokenizer: Literal["char", "bpe"] | None = Field(None, description="text: the tokenizer's kind")
    vocab_size: int | None = Field(None, description="text: tokens in the vocabulary")
    context_length: int | None = Field(None, description="text: longest sequence (prompt + generated), tokens")


class CalibrationInfo(BaseModel):
    score: str
    n_heldout: int
    false_positive_rate: float
    threshold: float


class ModelInfo(BaseModel):
    name: str
    version: str
    kind: str
    created: str
    runtime: str = Field(description="torch or onnx")
    input: InputInfo
    config: dict[str, Any]
    metrics: dict[str, Any]
    training: dict[str, Any]
    calibration: CalibrationInfo | None = Field(None, description="anomaly calibration, for density models")
    limits: Limits


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


class LogProbRequest(BaseModel):
    records: list[Record] = Field(
        min_length=1, description="raw (unstandardised) records, one list of numbers per record"
    )
    responsibilities: bool = Field(False, description="also return each mixture component's posterior")

    model_config = {"json_schema_extra": {"examples": [{"records": [[1.0, 2.0, 3.0]]}]}}


class LogProbResponse(BaseModel):
    model: str
    version: str
    log_prob: list[float] = Field(description="log p(x) in nats, per record")
    bits_per_dim: list[float] = Field(description="-log2 p(x) / number of features, per record")
    responsibilities: list[list[float]] | None = None


class AnomalyRequest(BaseModel):
    records: list[Record] = Field(min_length=1)
    threshold: FiniteNumber | None = Field(
        None, description="flag records whose score exceeds this (nats); overrides the calibrated threshold"
    )
    false_positive_rate: float | None = Field(
        None, gt=0.0, lt=1.0, description="flag at this held-out false-positive rate instead of the default"
    )

    @model_validator(mode="after")
    def _one_threshold(self) -> AnomalyRequest:
        if self.threshold is not None and self.false_positive_rate is not None:
            raise ValueError("give threshold or false_positive_rate, not both")
        return self


class AnomalyResult(BaseModel):
    score: float = Field(description="anomaly score: negative log-likelihood in nats (higher = more anomalous)")
    log_prob: float
    percentile: float = Field(description="percent of held-out normal records scoring at or below this one")
    is_anomaly: bool


class AnomalyResponse(BaseModel):
    model: str
    version: str
    score_type: Literal["nll_nats"] = "nll_nats"
    threshold: float
    false_positive_rate: float | None = Field(
        description="held-out false-positive rate of the threshold (null when the request set the threshold)"
    )
    results: list[AnomalyResult]


class SampleRequest(BaseModel):
    n: int = Field(1, ge=1, description="number of samples")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed, same samples")


class SampleResponse(BaseModel):
    model: str
    version: str
    feature_names: list[str]
    samples: list[list[float]]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    models: dict[str, bool]
