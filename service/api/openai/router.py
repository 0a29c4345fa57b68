"""OpenAI's completions API (/v1/completions), so OpenAI's clients work unchanged: a thin adapter over the text
service. Extras as in vLLM: top_k, ignore_eos, use_beam_search or num_beams, length_penalty, early_stopping.
Errors are OpenAI's body (service/api/errors.py renders every error on this path so)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from genserve.artifacts.tokenizer import TextTokenizer
from genserve.service.api.common import ServicesDep, Usage, event_stream, sse
from genserve.service.api.errors import AUTH, POST, openai_error, responses
from genserve.service.api.fast_json import FastJSONRoute
from genserve.service.api.openai.schemas import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    OpenAIErrorResponse,
)
from genserve.service.edge import count_generated
from genserve.service.errors import InvalidInput
from genserve.service.isolation import failure_message
from genserve.service.services.text import TextService, failure_type, generation_params, token_piece

router = APIRouter(route_class=FastJSONRoute)
COMPLETION_ERRORS = (400, 404, *POST, 500, 503, *AUTH)

UNSUPPORTED_FIELDS = {
    "echo": (lambda b: b.echo, "echo is not supported"),
    "suffix": (lambda b: b.suffix is not None, "suffix (insertion) is not supported"),
    "logit_bias": (lambda b: bool(b.logit_bias), "logit_bias is not supported"),
    "presence_penalty": (lambda b: b.presence_penalty != 0, "presence_penalty must be 0 (not supported)"),
    "frequency_penalty": (lambda b: b.frequency_penalty != 0, "frequency_penalty must be 0 (not supported)"),
    "best_of": (lambda b: b.best_of is not None and b.best_of != b.n,
                "best_of is not supported (use n, or use_beam_search)"),
}


def check_openai_fields(body: CompletionRequest) -> None:
    """OpenAI fields genserve does not implement, and unknown ones, refused by name."""
    for field, (is_set, message) in UNSUPPORTED_FIELDS.items():
        if is_set(body):
            raise InvalidInput(message, type_="invalid_request_error", param=field)
    if body.stream_options is not None and not body.stream:
        raise InvalidInput("stream_options is only allowed when stream is true", type_="invalid_request_error",
                           param="stream_options")
    unknown = sorted(body.model_extra or {})
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(unknown)}", type_="invalid_request_error",
                           param=unknown[0])


def openai_logprobs(tokenizer: TextTokenizer, ids: list[int], logprobs: list[float],
                    top: list[list[tuple[int, float]]] | None, offset: int) -> CompletionLogprobs:
    pieces = [token_piece(tokenizer, t) for t in ids]
    offsets = []
    for p in pieces:
        offsets.append(offset)
        offset += len(p)
    tops = None
    if top:
        tops = [{token_piece(tokenizer, a): alp for a, alp in alternatives} for alternatives in top]
    return CompletionLogprobs(tokens=pieces, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets)


@router.post("/v1/completions", name="completions", tags=["openai"], response_model=CompletionResponse,
             responses=responses(OpenAIErrorResponse, *COMPLETION_ERRORS, ok={
                 "content": {"text/event-stream": {"schema": event_stream(CompletionResponse, OpenAIErrorResponse)}},
                 "description": "JSON, or with stream: true Server-Sent Events of CompletionResponse chunks (with "
                 "stream_options.include_usage, a last chunk with empty choices and the usage), then "
                 "`data: [DONE]`"}))
async def completions(body: CompletionRequest, services: ServicesDep):
    """OpenAI's completions API, so OpenAI clients work unchanged. Extras as in vLLM: top_k, ignore_eos,
    use_beam_search or num_beams, length_penalty, early_stopping."""
    created, completion_id = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
    text = services.text
    check_openai_fields(body)
    _, tokenizer = text.model(body.model, "model")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise InvalidInput("prompt is an empty list", param="prompt")
    text.check_limit(len(prompts), services.catalog.limits.max_prompts_per_request, "max_prompts_per_request",
                     "prompt")
    if body.stream and len(prompts) > 1:
        raise InvalidInput("stream with several prompts is not supported; send one prompt per streamed request",
                           param="prompt")
    num_beams = body.num_beams if body.num_beams > 1 else (max(body.n, 4) if body.use_beam_search else 1)
    beam = num_beams > 1
    body.num_beams = num_beams
    text.check_decoding(body.max_tokens, num_beams, 1 if beam else body.n, "max_tokens")
    if beam and body.n > num_beams:
        raise InvalidInput(f"n={body.n} exceeds num_beams={num_beams}", param="n")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    params = generation_params(body, body.max_tokens, 1 if beam else body.n, stop, body.n if beam else 1,
                               body.logprobs or 0)
    where = ["prompt"] if isinstance(body.prompt, str) else [f"prompt[{i}]" for i in range(len(prompts))]
    prompt_ids = [text.prompt_ids(body.model, p, body.max_tokens, w) for p, w in zip(prompts, where, strict=True)]
    streams = [await text.start(body.model, ids, params, body.stream) for ids in prompt_ids]
    if body.stream:
        return StreamingResponse(_events(streams[0], tokenizer, body, completion_id, created, len(prompt_ids[0])),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    choices, generated = [], 0
    for p, updates in enumerate(streams):
        for o in await TextService.final(updates):
            generated += len(o["token_ids"])
            count_generated(len(o["token_ids"]))
            choices.append(CompletionChoice(
                index=p * body.n + o["index"], text=o["text"], finish_reason=o["finish_reason"],
                logprobs=openai_logprobs(tokenizer, o["token_ids"], o["logprobs"], o["top_logprobs"], 0)
                if body.logprobs is not None else None))
    prompt_total = sum(len(ids) for ids in prompt_ids)
    return CompletionResponse(id=completion_id, created=created, model=body.model, choices=choices,
                              usage=Usage(prompt_tokens=prompt_total, completion_tokens=generated,
                                          total_tokens=prompt_total + generated))


async def _events(updates: Any, tokenizer: TextTokenizer, body: CompletionRequest, completion_id: str,
                  created: int, prompt_tokens: int) -> AsyncIterator[bytes]:
    generated, offsets = 0, {}
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    try:
        async for item in TextService.deltas(updates):
            for d in item["deltas"]:
                generated += len(d["token_ids"])
                count_generated(len(d["token_ids"]))
                offset = offsets.get(d["index"], 0)
                offsets[d["index"]] = offset + len(d["text"])
                logprobs = (openai_logprobs(tokenizer, d["token_ids"], d["logprobs"], d["top_logprobs"], offset)
                            if body.logprobs is not None else None)
                chunk = CompletionResponse(
                    id=completion_id, created=created, model=body.model,
                    choices=[CompletionChoice(index=d["index"], text=d["text"], logprobs=logprobs,
                                              finish_reason=d["finish_reason"])])
                data = chunk.model_dump()  # finish_reason and logprobs null until set, as OpenAI sends them
                if not include_usage:  # as OpenAI: with include_usage every chunk has usage, null but the last
                    del data["usage"]
                yield sse(data)
        if include_usage:  # only when asked: OpenAI's and vLLM's clients expect choices in every other chunk
            usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=generated,
                          total_tokens=prompt_tokens + generated)
            final = CompletionResponse(id=completion_id, created=created, model=body.model, choices=[], usage=usage)
            yield sse(final.model_dump_json(exclude_none=True))
    except Exception as e:
        yield sse(openai_error(failure_message(e), failure_type(e)))
    yield sse("[DONE]")
