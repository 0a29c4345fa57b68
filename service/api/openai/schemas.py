"""Request and response bodies of OpenAI's completions API (/v1/completions), as OpenAI's clients send and read
them. Limits that depend on the server's configuration (token counts, beams, samples) are checked by the text
service, which names the limit in its 400."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from genserve.service.api.common import DecodingOptions, StopStrings, Usage

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
