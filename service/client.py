"""Typed Python client for the genserve REST API (httpx; sync and async).

    from genserve.service.client import GenserveClient

    with GenserveClient("http://127.0.0.1:8000") as client:
        scores = client.anomaly("breast-cancer", records)  # score="bits_per_dim", false_positive_rate=0.01, ...
        print(scores.results[0].is_anomaly)
        print(client.generate("shakespeare", "ROMEO:", max_new_tokens=100, seed=1).completions[0].text)
        digits = client.sample_images("mnist", n=4, label=3, seed=0).images  # arrays of grey levels
        print(client.log_prob_images("mnist", [d.array for d in digits]).log_prob)
        for chunk in client.stream("shakespeare", "JULIET:", max_new_tokens=100):
            print(chunk.text, end="", flush=True)

Model management (the admin role when API keys are on): `management()`, `repository()`, `load_model(name,
version)`, `unload_model`, `promote(name, version)` (also a rollback) and `set_traffic(name, {"3": 90, "4": 10})`.

Responses are the same pydantic models the server uses. A 4xx/5xx raises `GenserveError`
carrying the server's status, error type and message.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from genserve.service.api.v1.schemas import (
    AnomalyResponse,
    CompleteResponse,
    GenerateResponse,
    ImageSampleResponse,
    LogProbResponse,
    ManagedModel,
    ManagementStatus,
    ModelInfo,
    ModelList,
    Readiness,
    SampleResponse,
    ScoreResponse,
    StoreVersion,
    StreamChunk,
)

T = TypeVar("T", bound=BaseModel)
Records = Sequence[Sequence[float]]
# Images: each an (H, W) numpy array or nested lists of integer levels, or a base64 PNG string.
Images = Sequence[Any]
DEFAULT_URL = "http://127.0.0.1:8000"
JSON_HEADERS = {"Content-Type": "application/json"}


class GenserveError(Exception):
    """The server refused or failed a request; `message` is the server's explanation."""

    def __init__(self, status_code: int, error_type: str, message: str):
        super().__init__(f"{status_code} {error_type}: {message}")
        self.status_code, self.error_type, self.message = status_code, error_type, message


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        error_type, message = error["type"], error["message"]
    except (ValueError, KeyError, TypeError):
        error_type, message = "http_error", response.text or response.reason_phrase
    raise GenserveError(response.status_code, error_type, message)


def _parse(response: httpx.Response, model: type[T]) -> T:
    _raise_for_error(response)
    return model.model_validate_json(response.content)


def _readiness(response: httpx.Response) -> Readiness:
    # 503 is an answer here (not ready yet), not an error.
    return Readiness.model_validate_json(response.content) if response.status_code == 503 else _parse(
        response, Readiness)


# What each call sends: (method, path, JSON body). The server validates the body, so a bad
# input comes back as a GenserveError with the server's message rather than a local error.
def _log_prob(name: str, records: Records, responsibilities: bool) -> tuple[str, str, dict]:
    return "POST", f"/v1/models/{name}/log_prob", {"records": records, "responsibilities": responsibilities}


def _anomaly(name: str, records: Records, threshold: float | None, fpr: float | None,
             score: str | None = None) -> tuple[str, str, dict]:
    body = {"records": records, "score": score, "threshold": threshold, "false_positive_rate": fpr}
    return "POST", f"/v1/models/{name}/anomaly", _drop_none(body)


def _sample(name: str, n: int, seed: int | None) -> tuple[str, str, dict]:
    return "POST", f"/v1/models/{name}/sample", {"n": n} if seed is None else {"n": n, "seed": seed}


def _images(images: Images) -> list:
    return [image.tolist() if hasattr(image, "tolist") else image for image in images]


def _labels(labels: Sequence[int] | None) -> list[int] | None:
    return None if labels is None else [int(y) for y in labels]


def _drop_none(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


def _log_prob_images(name: str, images: Images, labels: Sequence[int] | None,
                     per_pixel: bool) -> tuple[str, str, dict]:
    body = {"images": _images(images), "labels": _labels(labels), "per_pixel": per_pixel}
    return "POST", f"/v1/models/{name}/log_prob", _drop_none(body)


def _anomaly_images(name: str, images: Images, labels: Sequence[int] | None, threshold: float | None,
                    fpr: float | None, score: str | None = None) -> tuple[str, str, dict]:
    body = {"images": _images(images), "labels": _labels(labels), "score": score, "threshold": threshold,
            "false_positive_rate": fpr}
    return "POST", f"/v1/models/{name}/anomaly", _drop_none(body)


def _anomaly_texts(name: str, texts: Sequence[str], score: str | None, per_line: bool, threshold: float | None,
                   fpr: float | None) -> tuple[str, str, dict]:
    # per_line is sent only when set, so a text request reads like the records and images ones.
    body = {"texts": list(texts), "score": score, "per_line": per_line or None, "threshold": threshold,
            "false_positive_rate": fpr}
    return "POST", f"/v1/models/{name}/anomaly", _drop_none(body)


def _sample_images(name: str, n: int, seed: int | None, labels: Sequence[int] | None, label: int | None,
                   format: str) -> tuple[str, str, dict]:
    body = {"n": n, "seed": seed, "labels": _labels(labels), "label": label, "format": format}
    return "POST", f"/v1/models/{name}/sample", _drop_none(body)


def _complete(name: str, images: Images, known_rows: int | None, known_pixels: int | None, n: int,
              seed: int | None, labels: Sequence[int] | None, format: str) -> tuple[str, str, dict]:
    body = {"images": _images(images), "known_rows": known_rows, "known_pixels": known_pixels, "n": n,
            "seed": seed, "labels": _labels(labels), "format": format}
    return "POST", f"/v1/models/{name}/complete", _drop_none(body)


def _generate(name: str, prompt: str, stream: bool, options: dict[str, Any]) -> tuple[str, str, dict]:
    """options: any GenerateRequest field (max_new_tokens, temperature, top_k, top_p, seed, stop, n,
    num_beams, num_return_sequences, length_penalty, early_stopping, logprobs, top_logprobs, ...)."""
    return "POST", f"/v1/models/{name}/generate", {"prompt": prompt, **options, "stream": stream}


def _score(name: str, texts: Sequence[str], per_token: bool) -> tuple[str, str, dict]:
    return "POST", f"/v1/models/{name}/score", {"texts": list(texts), "per_token": per_token}


def _sse_data(line: str) -> StreamChunk | None:
    """One Server-Sent Events line -> a chunk; None for blank lines, comments and the final [DONE]."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    data = json.loads(line[len("data: "):])
    if "error" in data:
        raise GenserveError(503, data["error"].get("type", "error"), data["error"].get("message", ""))
    return StreamChunk.model_validate(data)


def _version(version: str | int | None) -> dict[str, Any]:
    return {} if version is None else {"version": str(version)}


def _encode(body: dict) -> bytes:
    # allow_nan: a NaN goes to the server, which answers with a 422 naming the record and feature.
    return json.dumps(body, allow_nan=True).encode()


def _jsonable(records: Records) -> list:
    return records.tolist() if hasattr(records, "tolist") else [list(r) for r in records]


API_KEY_ENV = "GENSERVE_API_KEY"


def with_key(api_key: str | None, httpx_options: dict[str, Any]) -> dict[str, Any]:
    """httpx options with the API key (given, else from the environment) as a bearer token."""
    key = api_key or os.environ.get(API_KEY_ENV)
    if not key:
        return httpx_options
    return {**httpx_options, "headers": {**httpx_options.get("headers", {}), "Authorization": f"Bearer {key}"}}


class GenserveClient:
    """`api_key` (default $GENSERVE_API_KEY) goes as `Authorization: Bearer KEY`, for servers with keys on."""

    def __init__(self, base_url: str = DEFAULT_URL, timeout: float = 60.0, api_key: str | None = None,
                 **httpx_options: Any):
        self._http = httpx.Client(base_url=base_url, timeout=timeout, **with_key(api_key, httpx_options))

    def __enter__(self) -> GenserveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: dict, model: type[T]) -> T:
        return _parse(self._http.request(method, path, content=_encode(body), headers=JSON_HEADERS), model)

    def healthy(self) -> bool:
        return self._http.get("/healthz").is_success

    def ready(self) -> Readiness:
        return _readiness(self._http.get("/readyz"))

    def models(self) -> list[ModelInfo]:
        return _parse(self._http.get("/v1/models"), ModelList).models

    def model(self, name: str) -> ModelInfo:
        return _parse(self._http.get(f"/v1/models/{name}"), ModelInfo)

    def log_prob(self, name: str, records: Records, responsibilities: bool = False) -> LogProbResponse:
        return self._call(*_log_prob(name, _jsonable(records), responsibilities), LogProbResponse)

    def anomaly(self, name: str, records: Records, threshold: float | None = None,
                false_positive_rate: float | None = None, score: str | None = None) -> AnomalyResponse:
        """Anomaly scores of records: `score` picks the score type (default: the model's), and
        threshold or false_positive_rate the flagging threshold (default: the calibrated one)."""
        return self._call(*_anomaly(name, _jsonable(records), threshold, false_positive_rate, score),
                          AnomalyResponse)

    def sample(self, name: str, n: int = 1, seed: int | None = None) -> SampleResponse:
        return self._call(*_sample(name, n, seed), SampleResponse)

    # ---- image models ----

    def log_prob_images(self, name: str, images: Images, labels: Sequence[int] | None = None,
                        per_pixel: bool = False) -> LogProbResponse:
        """log p(x) of each image (log p(x | label) with labels; a conditional model's marginal without)."""
        return self._call(*_log_prob_images(name, images, labels, per_pixel), LogProbResponse)

    def anomaly_images(self, name: str, images: Images, labels: Sequence[int] | None = None,
                       threshold: float | None = None, false_positive_rate: float | None = None,
                       score: str | None = None) -> AnomalyResponse:
        return self._call(*_anomaly_images(name, images, labels, threshold, false_positive_rate, score),
                          AnomalyResponse)

    def anomaly_texts(self, name: str, texts: Sequence[str], score: str | None = None, per_line: bool = False,
                      threshold: float | None = None, false_positive_rate: float | None = None) -> AnomalyResponse:
        """Anomaly scores of texts; per_line: each line of each text scored on its own (results carry
        text_index and line)."""
        return self._call(*_anomaly_texts(name, texts, score, per_line, threshold, false_positive_rate),
                          AnomalyResponse)

    def sample_images(self, name: str, n: int = 1, seed: int | None = None, labels: Sequence[int] | None = None,
                      label: int | None = None, format: str = "array") -> ImageSampleResponse:
        """n images (format "array" or "png"), with their labels and exact log-probabilities."""
        return self._call(*_sample_images(name, n, seed, labels, label, format), ImageSampleResponse)

    def complete(self, name: str, images: Images, known_rows: int | None = None, known_pixels: int | None = None,
                 n: int = 1, seed: int | None = None, labels: Sequence[int] | None = None,
                 format: str = "array") -> CompleteResponse:
        """n completions of each partial image, keeping its top known_rows rows or first known_pixels pixels."""
        return self._call(*_complete(name, images, known_rows, known_pixels, n, seed, labels, format),
                          CompleteResponse)

    def generate(self, name: str, prompt: str = "", **options: Any) -> GenerateResponse:
        """Continue `prompt`; options as in the generate endpoint (see /docs)."""
        return self._call(*_generate(name, prompt, False, options), GenerateResponse)

    def stream(self, name: str, prompt: str = "", **options: Any) -> Iterator[StreamChunk]:
        """Like generate, yielding text as it is generated (Server-Sent Events)."""
        method, path, body = _generate(name, prompt, True, options)
        with self._http.stream(method, path, content=_encode(body), headers=JSON_HEADERS) as response:
            if not response.is_success:
                response.read()
                _raise_for_error(response)
            for line in response.iter_lines():
                if (chunk := _sse_data(line)) is not None:
                    yield chunk

    def score(self, name: str, texts: Sequence[str], per_token: bool = True) -> ScoreResponse:
        """log p(text) of each text, per token too, with perplexity and bits per character."""
        return self._call(*_score(name, texts, per_token), ScoreResponse)

    # ---- model management (/v1/admin) ----

    def management(self) -> ManagementStatus:
        return _parse(self._http.get("/v1/admin/models"), ManagementStatus)

    def repository(self) -> list[StoreVersion]:
        response = self._http.get("/v1/admin/repository")
        _raise_for_error(response)
        return [StoreVersion.model_validate(row) for row in response.json()]

    def load_model(self, name: str, version: str | int | None = None) -> ManagedModel:
        return self._call("POST", f"/v1/admin/models/{name}/load", _version(version), ManagedModel)

    def unload_model(self, name: str, version: str | int | None = None) -> ManagedModel:
        return self._call("POST", f"/v1/admin/models/{name}/unload", _version(version), ManagedModel)

    def promote(self, name: str, version: str | int) -> ManagedModel:
        return self._call("PUT", f"/v1/admin/models/{name}/default", {"version": str(version)}, ManagedModel)

    def set_traffic(self, name: str, split: dict[str | int, int]) -> ManagedModel:
        body = {"split": {str(v): w for v, w in split.items()}}
        return self._call("PUT", f"/v1/admin/models/{name}/traffic", body, ManagedModel)

    def metrics(self) -> str:
        response = self._http.get("/metrics")
        _raise_for_error(response)
        return response.text


class AsyncGenserveClient:
    """`api_key` (default $GENSERVE_API_KEY) goes as `Authorization: Bearer KEY`, for servers with keys on."""

    def __init__(self, base_url: str = DEFAULT_URL, timeout: float = 60.0, api_key: str | None = None,
                 **httpx_options: Any):
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, **with_key(api_key, httpx_options))

    async def __aenter__(self) -> AsyncGenserveClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, body: dict, model: type[T]) -> T:
        return _parse(await self._http.request(method, path, content=_encode(body), headers=JSON_HEADERS), model)

    async def healthy(self) -> bool:
        return (await self._http.get("/healthz")).is_success

    async def ready(self) -> Readiness:
        return _readiness(await self._http.get("/readyz"))

    async def models(self) -> list[ModelInfo]:
        return _parse(await self._http.get("/v1/models"), ModelList).models

    async def model(self, name: str) -> ModelInfo:
        return _parse(await self._http.get(f"/v1/models/{name}"), ModelInfo)

    async def log_prob(self, name: str, records: Records, responsibilities: bool = False) -> LogProbResponse:
        return await self._call(*_log_prob(name, _jsonable(records), responsibilities), LogProbResponse)

    async def anomaly(self, name: str, records: Records, threshold: float | None = None,
                      false_positive_rate: float | None = None, score: str | None = None) -> AnomalyResponse:
        return await self._call(*_anomaly(name, _jsonable(records), threshold, false_positive_rate, score),
                                AnomalyResponse)

    async def sample(self, name: str, n: int = 1, seed: int | None = None) -> SampleResponse:
        return await self._call(*_sample(name, n, seed), SampleResponse)

    async def log_prob_images(self, name: str, images: Images, labels: Sequence[int] | None = None,
                              per_pixel: bool = False) -> LogProbResponse:
        return await self._call(*_log_prob_images(name, images, labels, per_pixel), LogProbResponse)

    async def anomaly_images(self, name: str, images: Images, labels: Sequence[int] | None = None,
                             threshold: float | None = None, false_positive_rate: float | None = None,
                             score: str | None = None) -> AnomalyResponse:
        return await self._call(*_anomaly_images(name, images, labels, threshold, false_positive_rate, score),
                                AnomalyResponse)

    async def anomaly_texts(self, name: str, texts: Sequence[str], score: str | None = None,
                            per_line: bool = False, threshold: float | None = None,
                            false_positive_rate: float | None = None) -> AnomalyResponse:
        return await self._call(*_anomaly_texts(name, texts, score, per_line, threshold, false_positive_rate),
                                AnomalyResponse)

    async def sample_images(self, name: str, n: int = 1, seed: int | None = None,
                            labels: Sequence[int] | None = None, label: int | None = None,
                            format: str = "array") -> ImageSampleResponse:
        return await self._call(*_sample_images(name, n, seed, labels, label, format), ImageSampleResponse)

    async def complete(self, name: str, images: Images, known_rows: int | None = None,
                       known_pixels: int | None = None, n: int = 1, seed: int | None = None,
                       labels: Sequence[int] | None = None, format: str = "array") -> CompleteResponse:
        return await self._call(*_complete(name, images, known_rows, known_pixels, n, seed, labels, format),
                                CompleteResponse)

    async def generate(self, name: str, prompt: str = "", **options: Any) -> GenerateResponse:
        return await self._call(*_generate(name, prompt, False, options), GenerateResponse)

    async def stream(self, name: str, prompt: str = "", **options: Any) -> AsyncIterator[StreamChunk]:
        method, path, body = _generate(name, prompt, True, options)
        async with self._http.stream(method, path, content=_encode(body), headers=JSON_HEADERS) as response:
            if not response.is_success:
                await response.aread()
                _raise_for_error(response)
            async for line in response.aiter_lines():
                if (chunk := _sse_data(line)) is not None:
                    yield chunk

    async def score(self, name: str, texts: Sequence[str], per_token: bool = True) -> ScoreResponse:
        return await self._call(*_score(name, texts, per_token), ScoreResponse)

    # ---- model management (/v1/admin) ----

    async def management(self) -> ManagementStatus:
        return _parse(await self._http.get("/v1/admin/models"), ManagementStatus)

    async def repository(self) -> list[StoreVersion]:
        response = await self._http.get("/v1/admin/repository")
        _raise_for_error(response)
        return [StoreVersion.model_validate(row) for row in response.json()]

    async def load_model(self, name: str, version: str | int | None = None) -> ManagedModel:
        return await self._call("POST", f"/v1/admin/models/{name}/load", _version(version), ManagedModel)

    async def unload_model(self, name: str, version: str | int | None = None) -> ManagedModel:
        return await self._call("POST", f"/v1/admin/models/{name}/unload", _version(version), ManagedModel)

    async def promote(self, name: str, version: str | int) -> ManagedModel:
        return await self._call("PUT", f"/v1/admin/models/{name}/default", {"version": str(version)}, ManagedModel)

    async def set_traffic(self, name: str, split: dict[str | int, int]) -> ManagedModel:
        body = {"split": {str(v): w for v, w in split.items()}}
        return await self._call("PUT", f"/v1/admin/models/{name}/traffic", body, ManagedModel)

    async def metrics(self) -> str:
        response = await self._http.get("/metrics")
        _raise_for_error(response)
        return response.text
