"""Text models (GPT, LSTM, n-gram): tokenising and checking every limit at the ingress, so a bad request gets its
error without reaching a replica, whose decoding engine receives token ids and decoding parameters only; then
generation (one final result, or a stream of deltas) and exact scoring. Protocol-neutral: genserve's /v1 routes,
OpenAI's /v1/completions and /v2 call it."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from genserve.artifacts import artifact as art
from genserve.artifacts.tokenizer import TextTokenizer, UnknownCharactersError
from genserve.service.catalog import ModelCatalog
from genserve.service.decoding import DEFAULT_MAX_LEN, GenerationParams
from genserve.service.errors import InvalidInput, LimitExceeded, ModelFailed, Overloaded, Unavailable
from genserve.service.isolation import failure_message, is_replica_busy, is_request_failure

LN2 = math.log(2.0)
DEFAULT_NEW_TOKENS = 64


@dataclass
class TextScores:
    """One text's exact log-probability, from a BOS token (so its first token is predicted too)."""

    text: str
    token_ids: list[int]  # after BOS
    logprobs: list[float]  # one per token

    @property
    def log_prob(self) -> float:
        return float(sum(self.logprobs))

    @property
    def nats_per_token(self) -> float:
        return -self.log_prob / len(self.logprobs)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.nats_per_token, 700.0))

    @property
    def bits_per_char(self) -> float:
        return -self.log_prob / (LN2 * len(self.text))


def token_piece(tokenizer: TextTokenizer, token_id: int) -> str:
    """A generated token's text on its own ('' for an id past the tokenizer's vocabulary: a padded model head)."""
    return tokenizer.token_text(token_id) if token_id < tokenizer.vocab_size else ""


def failure_type(e: BaseException) -> str:
    """The error type of a generation that failed mid-stream: model_error for this request alone, else
    model_unavailable (the replica failed; retry)."""
    return "model_error" if is_request_failure(e) else "model_unavailable"


def generation_params(options: Any, max_new: int, n: int, stop: tuple[str, ...], returned: int,
                      top_logprobs: int) -> GenerationParams:
    """The engine's parameters from a request's decoding options (temperature, top_k, top_p, seed, ignore_eos,
    num_beams, length_penalty, early_stopping: the fields /v1 generate and OpenAI's completions share)."""
    beam = options.num_beams > 1
    return GenerationParams(
        max_new_tokens=max_new, temperature=options.temperature, top_k=options.top_k or None,
        top_p=options.top_p, seed=options.seed, stop=stop, ignore_eos=options.ignore_eos, n=1 if beam else n,
        num_beams=options.num_beams, length_penalty=options.length_penalty, early_stopping=options.early_stopping,
        num_return_sequences=returned if beam else 1, top_logprobs=top_logprobs,
    )


class TextService:
    def __init__(self, catalog: ModelCatalog):
        self.catalog = catalog

    # ---- checks ----------------------------------------------------------------------------------------

    def model(self, name: str, param: str | None = None) -> tuple[art.Manifest, TextTokenizer]:
        return self.catalog.text_model(name, param)

    def context_length(self, name: str) -> int:
        return self.catalog.context_length(name) or DEFAULT_MAX_LEN

    @staticmethod
    def encode(tokenizer: TextTokenizer, text: str, where: str) -> list[int]:
        try:
            return tokenizer.encode(text)
        except UnknownCharactersError as e:
            raise InvalidInput(f"{where}: {e}", type_="unknown_characters", param=where) from None

    @staticmethod
    def check_limit(value: int, limit: int, field: str, param: str | None = None) -> None:
        if value > limit:
            raise LimitExceeded(f"{param or field}={value} exceeds the limit of {limit} (limits.{field})",
                                param=param or field)

    def check_decoding(self, max_new: int, num_beams: int, n: int, new_param: str) -> None:
        limits = self.catalog.limits
        self.check_limit(max_new, limits.max_new_tokens, "max_new_tokens", new_param)
        self.check_limit(num_beams, limits.max_num_beams, "max_num_beams", "num_beams")
        self.check_limit(n, limits.max_n, "max_n", "n")

    def prompt_ids(self, name: str, prompt: str, max_new: int, where: str) -> list[int]:
        """The prompt's tokens (BOS alone for an empty prompt), which with max_new must fit the context."""
        _, tokenizer = self.model(name)
        ids = self.encode(tokenizer, prompt, where) or [tokenizer.bos_token_id]
        context = self.context_length(name)
        if len(ids) + max_new > context:
            raise LimitExceeded(f"{where} ({len(ids)} tokens) + max new tokens ({max_new}) = {len(ids) + max_new} "
                                f"exceeds model {name!r}'s context length of {context} tokens",
                                type_="context_length_exceeded", param=where)
        return ids

    # ---- generation ------------------------------------------------------------------------------------

    async def start(self, name: str, prompt_ids: list[int], params: GenerationParams, stream: bool) -> Any:
        """Submit to the model's replica; returns its update stream once the request is accepted. Unless `stream`,
        the replica sends only the final update (not one object per generated token)."""
        updates = self.catalog.stream(name, "generate", prompt_ids, params.__dict__, stream)
        try:
            await updates.__anext__()
        except ValueError as e:  # the engine refused it (a limit the ingress cannot see, e.g. slots)
            raise InvalidInput(failure_message(e)) from None
        except Exception as e:
            if is_replica_busy(e):
                raise Overloaded(failure_message(e)) from None
            raise Unavailable(f"model {name!r} could not take this request: {type(e).__name__}; retry "
                              "shortly") from None
        return updates

    @staticmethod
    async def final(updates: Any) -> list[dict[str, Any]]:
        """The finished outputs of a generation started with stream=False."""
        try:
            async for item in updates:
                if item["finished"]:
                    return item["outputs"]
        except Exception as e:
            if is_request_failure(e):  # this request alone failed (e.g. NaN logits): a retry fails the same way
                raise ModelFailed(f"generation failed: {failure_message(e)}") from None
            raise Unavailable(f"generation failed: {failure_message(e)}; retry shortly") from None
        raise Unavailable("generation ended without a result; retry shortly")

    @staticmethod
    async def deltas(updates: Any) -> AsyncIterator[dict[str, Any]]:
        """A streamed generation's updates until the finished one (a failure is raised to the caller, who reports
        it inside the stream: the response has started)."""
        async for item in updates:
            yield item
            if item["finished"]:
                return

    # ---- scoring ---------------------------------------------------------------------------------------

    def token_lists(self, name: str, texts: Sequence[str]) -> list[list[int]]:
        """Each text's tokens from BOS, checked against the limits and the model's context."""
        _, tokenizer = self.model(name)
        self.check_limit(len(texts), self.catalog.limits.max_texts_per_request, "max_texts_per_request", "texts")
        context = self.context_length(name)
        token_lists = []
        for i, text in enumerate(texts):
            if not text:
                raise InvalidInput(f"texts[{i}] is empty; there is nothing to score", param=f"texts[{i}]")
            ids = [tokenizer.bos_token_id, *self.encode(tokenizer, text, f"texts[{i}]")]
            if len(ids) > context:
                raise LimitExceeded(f"texts[{i}] is {len(ids) - 1} tokens (+1 BOS); model {name!r}'s context length "
                                    f"is {context} tokens", type_="context_length_exceeded", param=f"texts[{i}]")
            token_lists.append(ids)
        return token_lists

    async def score(self, name: str, texts: Sequence[str]) -> list[TextScores]:
        token_lists = self.token_lists(name, texts)
        per_token = await self.catalog.call(name, "score", token_lists)
        return [TextScores(text, ids[1:], list(lps))
                for text, ids, lps in zip(texts, token_lists, per_token, strict=True)]
