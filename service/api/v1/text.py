"""/v1 routes of text models: `generate` (JSON, or Server-Sent Events) and `score`. The text service tokenises
and checks every limit; these routes turn its outputs into genserve's response bodies."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from genserve.artifacts.tokenizer import TextTokenizer
from genserve.service.api.common import ServicesDep, event_stream, record_metrics, sse
from genserve.service.api.errors import AUTH, POST, openai_error, responses
from genserve.service.api.fast_json import FastJSONRoute
from genserve.service.api.openai.schemas import OpenAIErrorResponse
from genserve.service.api.v1.schemas import (
    Completion,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ScoreRequest,
    ScoreResponse,
    StreamChunk,
    TextScore,
    TokenLogprob,
    Usage,
)
from genserve.service.edge import count_generated
from genserve.service.errors import InvalidInput
from genserve.service.isolation import failure_message
from genserve.service.services.text import (
    DEFAULT_NEW_TOKENS,
    TextService,
    failure_type,
    generation_params,
    token_piece,
)

TEXT_ERRORS = (400, 404, *POST, 500, 503, *AUTH)  # what the text routes can answer besides 200
router = APIRouter(route_class=FastJSONRoute)


def token_logprobs(tokenizer: TextTokenizer, ids: list[int], logprobs: list[float],
                   top: list[list[tuple[int, float]]] | None) -> list[TokenLogprob]:
    return [
        TokenLogprob(id=t, text=token_piece(tokenizer, t), logprob=lp,
                     top=[TokenLogprob(id=a, text=token_piece(tokenizer, a), logprob=alp) for a, alp in top[i]]
                     if top else None)
        for i, (t, lp) in enumerate(zip(ids, logprobs, strict=True))
    ]


@router.post("/v1/models/{name}/generate", name="generate", tags=["text"], response_model=GenerateResponse,
             responses=responses(ErrorResponse, *TEXT_ERRORS, ok={
                 "content": {"text/event-stream": {"schema": event_stream(StreamChunk, OpenAIErrorResponse)}},
                 "description": "JSON, or with stream: true Server-Sent Events of StreamChunk (the last with usage), "
                 "then `data: [DONE]`; a model failing mid-stream sends an `event: error`"}))
async def generate(name: str, body: GenerateRequest, services: ServicesDep):
    """Continue a prompt: greedy (temperature 0), sampling (temperature, top_k, top_p, seed), or beam search
    (num_beams > 1). Each completion comes with its log-probability under the model."""
    text = services.text
    manifest, tokenizer = text.model(name)
    if body.num_beams > 1 and body.n > 1:
        raise InvalidInput("with beam search use num_return_sequences, not n", param="n")
    max_new = body.max_new_tokens or min(DEFAULT_NEW_TOKENS, services.catalog.limits.max_new_tokens)
    returned = body.num_return_sequences or 1
    if returned > body.num_beams:
        raise InvalidInput(f"num_return_sequences={returned} exceeds num_beams={body.num_beams}",
                           param="num_return_sequences")
    text.check_decoding(max_new, body.num_beams, body.n, "max_new_tokens")
    prompt_ids = text.prompt_ids(name, body.prompt, max_new, "prompt")
    params = generation_params(body, max_new, body.n, tuple(body.stop or ()), returned,
                               body.top_logprobs if body.logprobs else 0)
    updates = await text.start(name, prompt_ids, params, body.stream)
    if body.stream:
        return StreamingResponse(_events(updates, tokenizer, len(prompt_ids), body.logprobs),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    outputs = await TextService.final(updates)
    completions = [
        Completion(index=o["index"], text=o["text"], token_ids=o["token_ids"], finish_reason=o["finish_reason"],
                   stop=o["stop"], log_prob=sum(o["logprobs"]), score=o["score"],
                   tokens=token_logprobs(tokenizer, o["token_ids"], o["logprobs"], o["top_logprobs"])
                   if body.logprobs else None)
        for o in outputs
    ]
    generated = sum(len(o["token_ids"]) for o in outputs)
    count_generated(generated)
    return GenerateResponse(model=name, version=manifest.version, completions=completions,
                            usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=generated,
                                        total_tokens=len(prompt_ids) + generated))


async def _events(updates: Any, tokenizer: TextTokenizer, prompt_tokens: int,
                  want_tokens: bool) -> AsyncIterator[bytes]:
    generated = 0
    try:
        async for item in TextService.deltas(updates):
            for d in item["deltas"]:
                generated += len(d["token_ids"])
                count_generated(len(d["token_ids"]))
                chunk = StreamChunk(index=d["index"], text=d["text"], token_ids=d["token_ids"],
                                    finish_reason=d["finish_reason"],
                                    tokens=token_logprobs(tokenizer, d["token_ids"], d["logprobs"], d["top_logprobs"])
                                    if want_tokens else None)
                if item["finished"] and d is item["deltas"][-1]:
                    chunk.usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=generated,
                                        total_tokens=prompt_tokens + generated)
                yield sse(chunk.model_dump_json(exclude_none=True))
    except Exception as e:  # the replica failed mid-stream: say so in the stream, then end it
        yield f"event: error\ndata: {json.dumps(openai_error(failure_message(e), failure_type(e)))}\n\n".encode()
    yield sse("[DONE]")


@router.post("/v1/models/{name}/score", name="score", tags=["text"], response_model=ScoreResponse,
             responses=responses(ErrorResponse, *TEXT_ERRORS))
async def score(name: str, body: ScoreRequest, request: Request, services: ServicesDep) -> ScoreResponse:
    """Exact log-probability of each text under the model: per token, in total, as perplexity and as bits per
    character. Each text is scored from a BOS token, so the first token is predicted too."""
    manifest, tokenizer = services.text.model(name)
    scores = await services.text.score(name, body.texts)
    record_metrics(request, ("genserve_texts_scored_total", {"model": name}, len(body.texts)))
    results = [
        TextScore(log_prob=s.log_prob, n_tokens=len(s.logprobs), n_chars=len(s.text),
                  nats_per_token=s.nats_per_token, perplexity=s.perplexity, bits_per_char=s.bits_per_char,
                  tokens=token_logprobs(tokenizer, s.token_ids, s.logprobs, None) if body.per_token else None)
        for s in scores
    ]
    return ScoreResponse(model=name, version=manifest.version, results=results)
