"""What the protocol routers share: how a route reaches the services (ServicesDep), how it counts what it served
(record_metrics), the decoding options of genserve's generate and OpenAI's completions, token usage, and helpers
that put a model's JSON schema where FastAPI does not (a body read by hand, an event stream)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import Depends, Request
from pydantic import BaseModel, Field

from genserve.service.services import Services


async def services(request: Request) -> Services:
    """The ingress replica's services, which its constructor put on the app's state. Async on purpose: FastAPI
    runs a plain function dependency in its thread pool, a thread hop on every request."""
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(services)]


def sse(data: Any) -> bytes:
    """One Server-Sent Event carrying `data` (a string as is, anything else as JSON)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def record_metrics(request: Request, *events: tuple[str, dict[str, str], float]) -> None:
    """Counters for the gateway's middleware to send with the request's own metrics once it is answered."""
    request.state.metric_events = [*getattr(request.state, "metric_events", []), *events]

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


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int



def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its $defs inlined, to embed in the OpenAPI document where FastAPI does not put
    a model's schema in its components (a request body read by hand, an event stream's events)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                name = node["$ref"].rsplit("/", 1)[-1]
                # A recursive model (a token's top alternatives are tokens) is cut at its second level.
                return {"type": "object"} if name in seen else resolve(defs[name], (*seen, name))
            return {k: resolve(v, seen) for k, v in node.items()}
        return [resolve(v, seen) for v in node] if isinstance(node, list) else node

    return resolve(schema, ())


def event_stream(*models: type[BaseModel]) -> dict[str, Any]:
    """An event stream's schema as OpenAPI 3.1 reads it: one Server-Sent Event, whose data is `[DONE]` (the last)
    or JSON of one of `models`."""
    data = [{"type": "string", "contentMediaType": "application/json", "contentSchema": inline_schema(m)}
            for m in models]
    return {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string", "description": "message, or error when the model failed mid-stream"},
        "data": {"anyOf": [{"const": "[DONE]"}, *data]}}}


