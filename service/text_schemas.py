"""Request and response bodies of the text endpoints: genserve's own `generate` and `score`, and
the OpenAI-compatible `/v1/completions`. Limits that depend on the server's configuration (token
counts, beams, samples) are checked by the Gateway, which names the limit in its 400."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from genserve.service.edge import REQUEST_ID

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
StopStrings = Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=8)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


class DecodingOptions(BaseModel):
    """What generate and completions share: how tokens are chosen and when generation stops."""

    temperature: FiniteFloat = Field(1.0, ge=0, le=100, description="0 is greedy; higher is more random; below "
                                     "1e-5 decodes greedily (sampling that cold is the argmax but for near-ties)")
    top_k: int | None = Field(None, ge=0, description="sample among the k most likely tokens (0 or null: all)")
    top_p: FiniteFloat | None = Field(None, gt=0, le=1, description="nucleus sampling: smallest set with this mass")
    seed: Seed | None = Field(None, description="same seed, prompt and options: same text")
    ignore_eos: bool = Field(False, description="keep generating past the end-of-text token")
    num_beams: int = Field(1, ge=1, description="> 1: beam search (deterministic; sampling options unused)")
    length_penalty: FiniteFloat = Field(1.0, description="beam search: score = log p / generated_len ** this")
    early_stopping: bool | Literal["never"] = Field(False, description="beam search stopping rule, as transformers")


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


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


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


# ---- OpenAI-compatible completions ---------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="send a last chunk with empty choices and the whole request's "
                                "usage before `data: [DONE]`; every other chunk then has usage: null")


class CompletionRequest(DecodingOptions):
    """The OpenAI completions request. Beam search and top_k are extras (`extra_body` in the
    openai client), as in vLLM."""

    # Unknown OpenAI fields are let through to be refused by name (a 400 in OpenAI's shape), so none is allowed.
    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})

    model: str
    prompt: str | list[str] = ""
    max_tokens: int = Field(16, ge=1)
    n: int = Field(1, ge=1)
    stop: str | StopStrings | None = None
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="with stream only (as OpenAI)")
    logprobs: int | None = Field(None, ge=0, le=20, description="return this many most likely tokens per position")
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None
    use_beam_search: bool = False


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="e.g. invalid_request_error, model_not_found, limit_exceeded")
    param: str | None = Field(None, description="the request field at fault")
    code: str | None = None
    request_id: str | None = Field(None, description="the request's X-Request-ID, to find it in the server's logs")


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error body, answered by /v1/completions."""

    error: OpenAIErrorDetail


def openai_error(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body, with the id of the request being handled."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code,
                      "request_id": REQUEST_ID.get()}}


def v2_error(message: str) -> dict[str, Any]:
    """The Open Inference Protocol's error body, with the id of the request being handled."""
    return {"error": message, "request_id": REQUEST_ID.get()}
