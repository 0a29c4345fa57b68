"""The Gateway's text routes: `generate` (JSON or Server-Sent Events), `score`, and the
OpenAI-compatible `/v1/completions`.

The Gateway tokenises and checks every limit itself, so a bad request gets its 400 without
reaching a model replica; the replica's decoding engine receives token ids and decoding
parameters only. `TextRoutes` is mixed into the `Gateway` class (service/app.py): Serve's ingress
binds routes of base classes too.
"""

import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from genserve.artifacts import artifact as art
from genserve.artifacts.tokenizer import TextTokenizer, UnknownCharactersError
from genserve.service.decoding import DEFAULT_MAX_LEN, GenerationParams
from genserve.service.edge import count_generated
from genserve.service.errors import AUTH, POST, error_body, responses
from genserve.service.runtime import is_request_failure
from genserve.service.schemas import ErrorResponse, event_stream
from genserve.service.text import Overloaded
from genserve.service.text_schemas import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    GenerateRequest,
    GenerateResponse,
    OpenAIErrorResponse,
    ScoreRequest,
    ScoreResponse,
    StreamChunk,
    TextScore,
    TokenLogprob,
    Usage,
    openai_error,
)

LN2 = math.log(2.0)
DEFAULT_NEW_TOKENS = 64
TEXT_ERRORS = (400, 404, *POST, 500, 503, *AUTH)  # what the text routes can answer besides 200
router = APIRouter()


class TextLimits(BaseModel):
    """Limits of the text endpoints (the `limits` of the app's args in the Serve config)."""

    max_new_tokens: int = Field(1024, ge=1, description="tokens one request may generate")
    max_num_beams: int = Field(8, ge=1, description="beam width")
    max_n: int = Field(16, ge=1, description="samples of one prompt")
    max_texts_per_request: int = Field(64, ge=1, description="texts one score request may hold")
    max_prompts_per_request: int = Field(16, ge=1, description="prompts one completions request may hold")


class TextError(Exception):
    def __init__(self, status: int, type_: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.param = status, type_, message, param


def text_error_response(exc: TextError) -> JSONResponse:
    body = openai_error(exc.message, exc.type, exc.param)
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(body, status_code=exc.status, headers=headers)


def sse(data: Any) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


class TextRoutes:
    """Routes for text models; expects the Gateway's handles, manifests, tokenizers, limits, metrics."""

    handles: dict
    manifests: dict[str, art.Manifest]
    tokenizers: dict[str, TextTokenizer]
    text_limits: TextLimits

    # ---- checks ----------------------------------------------------------------------------

    def _text_model(self, name: str, param: str | None = None) -> tuple[art.Manifest, TextTokenizer]:
        if name not in self.manifests:
            texts = ", ".join(sorted(self.tokenizers)) or "none"
            raise TextError(404, "model_not_found", f"no model named {name!r}; text models: {texts}", param)
        if name not in self.tokenizers:
            texts = ", ".join(sorted(self.tokenizers)) or "none"
            raise TextError(400, "wrong_model_kind", f"model {name!r} is a {self.manifests[name].kind} model of "
                            f"records, not a text model; text models: {texts}", param)
        return self.manifests[name], self.tokenizers[name]

    def _max_len(self, name: str) -> int:
        spec = self.manifests[name].input
        return spec.context_length or DEFAULT_MAX_LEN

    def _encode(self, tokenizer: TextTokenizer, text: str, where: str) -> list[int]:
        try:
            return tokenizer.encode(text)
        except UnknownCharactersError as e:
            raise TextError(400, "unknown_characters", f"{where}: {e}", where) from None

    def _limit(self, value: int, limit: int, field: str, param: str | None = None) -> None:
        if value > limit:
            raise TextError(400, "limit_exceeded", f"{param or field}={value} exceeds the limit of {limit} "
                            f"(limits.{field})", param or field)

    def _prompt_ids(self, name: str, tokenizer: TextTokenizer, prompt: str, max_new: int, where: str) -> list[int]:
        ids = self._encode(tokenizer, prompt, where) or [tokenizer.bos_token_id]
        context = self._max_len(name)
        if len(ids) + max_new > context:
            raise TextError(400, "context_length_exceeded",
                            f"{where} ({len(ids)} tokens) + max new tokens ({max_new}) = {len(ids) + max_new} "
                            f"exceeds model {name!r}'s context length of {context} tokens", where)
        return ids

    def _check_decoding(self, body, max_new: int, n: int, new_param: str) -> None:
        limits = self.text_limits
        self._limit(max_new, limits.max_new_tokens, "max_new_tokens", new_param)
        self._limit(body.num_beams, limits.max_num_beams, "max_num_beams", "num_beams")
        self._limit(n, limits.max_n, "max_n", "n")

    async def _start(self, name: str, prompt_ids: list[int], params: GenerationParams, stream: bool):
        """Submit to the model's replica; returns the update stream once the request is accepted. Unless
        `stream`, the replica sends only the final update (not one object per generated token)."""
        updates = self.handles[name].options(stream=True).generate.remote(prompt_ids, params.__dict__, stream)
        try:
            await updates.__anext__()
        except ValueError as e:  # the engine refused it (a limit the Gateway cannot see, e.g. slots)
            raise TextError(400, "invalid_request", _cause(e)) from None
        except Overloaded as e:
            raise TextError(503, "overloaded", _cause(e)) from None
        except Exception as e:
            raise TextError(503, "model_unavailable", f"model {name!r} could not take this request: "
                            f"{type(e).__name__}; retry shortly") from None
        return updates

    # ---- generate --------------------------------------------------------------------------

    @router.post("/v1/models/{name}/generate", name="generate", tags=["text"], response_model=GenerateResponse,
                 responses=responses(ErrorResponse, *TEXT_ERRORS, ok={
                     "content": {"text/event-stream": {"schema": event_stream(StreamChunk, OpenAIErrorResponse)}},
                     "description": "JSON, or with stream: true Server-Sent Events of StreamChunk (the last with "
                     "usage), then `data: [DONE]`; a model failing mid-stream sends an `event: error`"}))
    async def generate(self, name: str, body: GenerateRequest, request: Request):
        """Continue a prompt: greedy (temperature 0), sampling (temperature, top_k, top_p, seed), or beam search
        (num_beams > 1). Each completion comes with its log-probability under the model."""
        try:
            manifest, tokenizer = self._text_model(name)
            if body.num_beams > 1 and body.n > 1:
                raise TextError(400, "invalid_request", "with beam search use num_return_sequences, not n", "n")
            if body.max_new_tokens is None:
                body.max_new_tokens = min(DEFAULT_NEW_TOKENS, self.text_limits.max_new_tokens)
            returned = body.num_return_sequences or 1
            if returned > body.num_beams:
                raise TextError(400, "invalid_request", f"num_return_sequences={returned} exceeds num_beams="
                                f"{body.num_beams}", "num_return_sequences")
            self._check_decoding(body, body.max_new_tokens, body.n, "max_new_tokens")
            prompt_ids = self._prompt_ids(name, tokenizer, body.prompt, body.max_new_tokens, "prompt")
            params = _params(body, body.max_new_tokens, body.n, tuple(body.stop or ()), returned,
                             body.top_logprobs if body.logprobs else 0)
            stream = await self._start(name, prompt_ids, params, body.stream)
        except TextError as e:
            return _plain_error(e)
        want_tokens = body.logprobs
        if body.stream:
            return StreamingResponse(self._generate_events(stream, tokenizer, len(prompt_ids), want_tokens),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            outputs = await _final(stream)
        except TextError as e:
            return _plain_error(e)
        completions = [
            Completion(index=o["index"], text=o["text"], token_ids=o["token_ids"], finish_reason=o["finish_reason"],
                       stop=o["stop"], log_prob=sum(o["logprobs"]), score=o["score"],
                       tokens=_token_logprobs(tokenizer, o["token_ids"], o["logprobs"], o["top_logprobs"])
                       if want_tokens else None)
            for o in outputs
        ]
        generated = sum(len(o["token_ids"]) for o in outputs)
        count_generated(generated)
        return GenerateResponse(model=name, version=manifest.version, completions=completions,
                                usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=generated,
                                            total_tokens=len(prompt_ids) + generated))

    async def _generate_events(self, stream, tokenizer: TextTokenizer, prompt_tokens: int,
                               want_tokens: bool) -> AsyncIterator[bytes]:
        generated = 0
        try:
            async for item in stream:
                for d in item["deltas"]:
                    generated += len(d["token_ids"])
                    count_generated(len(d["token_ids"]))
                    chunk = StreamChunk(index=d["index"], text=d["text"], token_ids=d["token_ids"],
                                        finish_reason=d["finish_reason"],
                                        tokens=_token_logprobs(tokenizer, d["token_ids"], d["logprobs"],
                                                               d["top_logprobs"]) if want_tokens else None)
                    if item["finished"] and d is item["deltas"][-1]:
                        chunk.usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=generated,
                                            total_tokens=prompt_tokens + generated)
                    yield sse(chunk.model_dump_json(exclude_none=True))
                if item["finished"]:
                    break
        except Exception as e:  # the replica failed mid-stream: say so in the stream, then end it
            yield f"event: error\ndata: {json.dumps(openai_error(_cause(e), _failure_type(e)))}\n\n".encode()
        yield sse("[DONE]")

    # ---- score -----------------------------------------------------------------------------

    @router.post("/v1/models/{name}/score", name="score", tags=["text"], response_model=ScoreResponse,
                 responses=responses(ErrorResponse, *TEXT_ERRORS))
    async def score(self, name: str, body: ScoreRequest, request: Request):
        """Exact log-probability of each text under the model: per token, in total, as perplexity and as bits
        per character. Each text is scored from a BOS token, so the first token is predicted too."""
        try:
            manifest, tokenizer = self._text_model(name)
            self._limit(len(body.texts), self.text_limits.max_texts_per_request, "max_texts_per_request", "texts")
            token_lists = []
            context = self._max_len(name)
            for i, text in enumerate(body.texts):
                if not text:
                    raise TextError(400, "invalid_request", f"texts[{i}] is empty; there is nothing to score",
                                    f"texts[{i}]")
                ids = [tokenizer.bos_token_id, *self._encode(tokenizer, text, f"texts[{i}]")]
                if len(ids) > context:
                    raise TextError(400, "context_length_exceeded",
                                    f"texts[{i}] is {len(ids) - 1} tokens (+1 BOS); model {name!r}'s context "
                                    f"length is {context} tokens", f"texts[{i}]")
                token_lists.append(ids)
            try:
                scores = await self.handles[name].score.remote(token_lists)
            except Exception as e:
                raise TextError(503, "model_unavailable", f"model {name!r} could not score: {type(e).__name__}; "
                                "retry shortly") from None
        except TextError as e:
            return _plain_error(e)
        request.state.metric_events = [("genserve_texts_scored_total", {"model": name}, len(body.texts))]
        results = []
        for text, ids, lps in zip(body.texts, token_lists, scores, strict=True):
            total = float(sum(lps))
            results.append(TextScore(
                log_prob=total, n_tokens=len(lps), n_chars=len(text), nats_per_token=-total / len(lps),
                perplexity=math.exp(min(-total / len(lps), 700.0)), bits_per_char=-total / (LN2 * len(text)),
                tokens=_token_logprobs(tokenizer, ids[1:], lps, None) if body.per_token else None,
            ))
        return ScoreResponse(model=name, version=manifest.version, results=results)

    # ---- OpenAI-compatible completions ---------------------------------------------------------

    @router.post("/v1/completions", name="completions", tags=["openai"], response_model=CompletionResponse,
                 responses=responses(OpenAIErrorResponse, *TEXT_ERRORS, ok={
                     "content": {"text/event-stream": {
                         "schema": event_stream(CompletionResponse, OpenAIErrorResponse)}},
                     "description": "JSON, or with stream: true Server-Sent Events of CompletionResponse chunks (with "
                     "stream_options.include_usage, a last chunk with empty choices and the usage), then "
                     "`data: [DONE]`"}))
    async def completions(self, body: CompletionRequest, request: Request):
        """OpenAI's completions API, so OpenAI clients work unchanged. Extras as in vLLM: top_k, ignore_eos,
        use_beam_search or num_beams, length_penalty, early_stopping."""
        created = int(time.time())
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        try:
            _check_openai_fields(body)
            _, tokenizer = self._text_model(body.model, "model")
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if not prompts:
                raise TextError(400, "invalid_request", "prompt is an empty list", "prompt")
            self._limit(len(prompts), self.text_limits.max_prompts_per_request, "max_prompts_per_request", "prompt")
            if body.stream and len(prompts) > 1:
                raise TextError(400, "invalid_request", "stream with several prompts is not supported; send one "
                                "prompt per streamed request", "prompt")
            num_beams = body.num_beams if body.num_beams > 1 else (max(body.n, 4) if body.use_beam_search else 1)
            beam = num_beams > 1
            body.num_beams = num_beams
            self._check_decoding(body, body.max_tokens, 1 if beam else body.n, "max_tokens")
            if beam and body.n > num_beams:
                raise TextError(400, "invalid_request", f"n={body.n} exceeds num_beams={num_beams}", "n")
            stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
            top = body.logprobs or 0
            params = _params(body, body.max_tokens, 1 if beam else body.n, stop, body.n if beam else 1, top)
            where = ["prompt"] if isinstance(body.prompt, str) else [f"prompt[{i}]" for i in range(len(prompts))]
            prompt_ids = [self._prompt_ids(body.model, tokenizer, p, body.max_tokens, w)
                          for p, w in zip(prompts, where, strict=True)]
            streams = [await self._start(body.model, ids, params, body.stream) for ids in prompt_ids]
        except TextError as e:
            return text_error_response(e)
        if body.stream:
            return StreamingResponse(
                self._completion_events(streams[0], tokenizer, body, completion_id, created, len(prompt_ids[0])),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices, generated = [], 0
        try:
            for p, stream in enumerate(streams):
                for o in await _final(stream):
                    generated += len(o["token_ids"])
                    count_generated(len(o["token_ids"]))
                    choices.append(CompletionChoice(
                        index=p * body.n + o["index"], text=o["text"], finish_reason=o["finish_reason"],
                        logprobs=_openai_logprobs(tokenizer, o["token_ids"], o["logprobs"], o["top_logprobs"], 0)
                        if body.logprobs is not None else None))
        except TextError as e:
            return text_error_response(e)
        prompt_total = sum(len(ids) for ids in prompt_ids)
        return CompletionResponse(id=completion_id, created=created, model=body.model, choices=choices,
                                  usage=Usage(prompt_tokens=prompt_total, completion_tokens=generated,
                                              total_tokens=prompt_total + generated))

    async def _completion_events(self, stream, tokenizer, body: CompletionRequest, completion_id: str,
                                 created: int, prompt_tokens: int) -> AsyncIterator[bytes]:
        generated, offsets = 0, {}
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        try:
            async for item in stream:
                for d in item["deltas"]:
                    generated += len(d["token_ids"])
                    count_generated(len(d["token_ids"]))
                    offset = offsets.get(d["index"], 0)
                    offsets[d["index"]] = offset + len(d["text"])
                    logprobs = (_openai_logprobs(tokenizer, d["token_ids"], d["logprobs"], d["top_logprobs"], offset)
                                if body.logprobs is not None else None)
                    chunk = CompletionResponse(
                        id=completion_id, created=created, model=body.model,
                        choices=[CompletionChoice(index=d["index"], text=d["text"], logprobs=logprobs,
                                                  finish_reason=d["finish_reason"])])
                    data = chunk.model_dump()  # finish_reason and logprobs null until set, as OpenAI sends them
                    if not include_usage:  # as OpenAI: with include_usage every chunk has usage, null but the last
                        del data["usage"]
                    yield sse(data)
                if item["finished"]:
                    break
            if include_usage:  # only when asked: OpenAI's and vLLM's clients expect choices in every other chunk
                usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=generated,
                              total_tokens=prompt_tokens + generated)
                final = CompletionResponse(id=completion_id, created=created, model=body.model, choices=[],
                                           usage=usage)
                yield sse(final.model_dump_json(exclude_none=True))
        except Exception as e:
            yield sse(openai_error(_cause(e), _failure_type(e)))
        yield sse("[DONE]")


# ---- helpers -------------------------------------------------------------------------------------


def _cause(e: BaseException) -> str:
    """The message of an exception raised in a replica, without Ray's traceback wrapping."""
    cause = getattr(e, "cause", None) or e
    return str(cause.args[0]) if getattr(cause, "args", None) else str(cause)


def _plain_error(e: TextError) -> JSONResponse:
    """genserve's own error body {"error": {"type", "message"}}, plus the parameter at fault."""
    body = error_body(e.type, e.message)
    if e.param:
        body["error"]["param"] = e.param
    return JSONResponse(body, status_code=e.status, headers={"Retry-After": "1"} if e.status == 503 else None)


def _params(body, max_new: int, n: int, stop: tuple[str, ...], returned: int, top_logprobs: int) -> GenerationParams:
    beam = body.num_beams > 1
    return GenerationParams(
        max_new_tokens=max_new, temperature=body.temperature, top_k=body.top_k or None,
        top_p=body.top_p, seed=body.seed, stop=stop, ignore_eos=body.ignore_eos, n=1 if beam else n,
        num_beams=body.num_beams, length_penalty=body.length_penalty, early_stopping=body.early_stopping,
        num_return_sequences=returned if beam else 1, top_logprobs=top_logprobs,
    )


async def _final(stream) -> list[dict[str, Any]]:
    try:
        async for item in stream:
            if item["finished"]:
                return item["outputs"]
    except Exception as e:
        if is_request_failure(e):  # this request alone failed (e.g. NaN logits): a retry fails the same way
            raise TextError(500, "model_error", f"generation failed: {_cause(e)}") from None
        raise TextError(503, "model_unavailable", f"generation failed: {_cause(e)}; retry shortly") from None
    raise TextError(503, "model_unavailable", "generation ended without a result; retry shortly")


def _failure_type(e: BaseException) -> str:
    """The error type of a generation that failed mid-stream: model_error for this request alone, else
    model_unavailable (the replica failed; retry)."""
    return "model_error" if is_request_failure(e) else "model_unavailable"


def _piece(tokenizer: TextTokenizer, token_id: int) -> str:
    return tokenizer.token_text(token_id) if token_id < tokenizer.vocab_size else ""


def _token_logprobs(tokenizer, ids, logprobs, top) -> list[TokenLogprob]:
    return [
        TokenLogprob(id=t, text=_piece(tokenizer, t), logprob=lp,
                     top=[TokenLogprob(id=a, text=_piece(tokenizer, a), logprob=alp) for a, alp in top[i]]
                     if top else None)
        for i, (t, lp) in enumerate(zip(ids, logprobs, strict=True))
    ]


def _openai_logprobs(tokenizer, ids, logprobs, top, offset: int) -> CompletionLogprobs:
    pieces = [_piece(tokenizer, t) for t in ids]
    offsets = []
    for p in pieces:
        offsets.append(offset)
        offset += len(p)
    tops = None
    if top:
        tops = [{_piece(tokenizer, a): alp for a, alp in alternatives} for alternatives in top]
    return CompletionLogprobs(tokens=pieces, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets)


UNSUPPORTED_FIELDS = {
    "echo": (lambda b: b.echo, "echo is not supported"),
    "suffix": (lambda b: b.suffix is not None, "suffix (insertion) is not supported"),
    "logit_bias": (lambda b: bool(b.logit_bias), "logit_bias is not supported"),
    "presence_penalty": (lambda b: b.presence_penalty != 0, "presence_penalty must be 0 (not supported)"),
    "frequency_penalty": (lambda b: b.frequency_penalty != 0, "frequency_penalty must be 0 (not supported)"),
    "best_of": (lambda b: b.best_of is not None and b.best_of != b.n,
                "best_of is not supported (use n, or use_beam_search)"),
}


def _check_openai_fields(body: CompletionRequest) -> None:
    for field, (is_set, message) in UNSUPPORTED_FIELDS.items():
        if is_set(body):
            raise TextError(400, "invalid_request_error", message, field)
    if body.stream_options is not None and not body.stream:
        raise TextError(400, "invalid_request_error", "stream_options is only allowed when stream is true",
                        "stream_options")
    unknown = sorted(body.model_extra or {})
    if unknown:
        raise TextError(400, "invalid_request_error", f"unknown field(s): {', '.join(unknown)}", unknown[0])
