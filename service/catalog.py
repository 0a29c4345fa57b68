"""The ModelCatalog: everything the ingress knows of the models it serves (manifests, calibrations, tokenizers,
pictures, limits) and the handles of their replicas, with the one place a replica's failure becomes an error.

The services (service/services/) look models up here; lookups raise the domain errors of service/errors.py
(unknown model, wrong family), whichever protocol asked.
"""

from __future__ import annotations

import asyncio
from typing import Any

from genserve.artifacts import artifact as art
from genserve.artifacts.calibration import CalibrationSet
from genserve.artifacts.families import Family, family_of
from genserve.artifacts.tokenizer import TextTokenizer
from genserve.service.errors import (
    InvalidInput,
    LimitExceeded,
    ModelFailed,
    NotFound,
    Overloaded,
    ServiceError,
    Unavailable,
    WrongKind,
)
from genserve.service.isolation import failure_message, is_over_limit, is_replica_busy, is_request_failure
from genserve.service.limits import Limits

INFO_TIMEOUT_S = 5.0  # a replica that does not report its runtime in this long is "unavailable"
READY_TIMEOUT_S = 2.0


def replica_failure(name: str, action: str, e: BaseException) -> ServiceError:
    """A failed replica call as the error the client gets, for every family: overloaded when the replica's queue
    or memory is full (a replica out of memory on one request is busy, not that request's fault), model_error when
    the model failed on this request alone (its batch-mates were answered; a retry fails the same way),
    limit_exceeded when the request alone is over a replica's budget, else model_unavailable (the replica failed or
    is gone; Serve retries elsewhere when it can)."""
    if is_replica_busy(e):
        return Overloaded(f"{failure_message(e)}; retry shortly")
    if is_request_failure(e):
        return ModelFailed(f"model {name!r} could not {action} this request: {failure_message(e)}")
    if is_over_limit(e):
        return LimitExceeded(failure_message(e))
    return Unavailable(f"model {name!r} could not {action} this request: {type(e).__name__}; retry shortly")


def kind_phrase(name: str, manifest: art.Manifest) -> str:
    """'model 'x' is a gmm model of records: use ...' - what the model is and which endpoints it takes."""
    kind, path = manifest.kind, f"/v1/models/{name}"
    if manifest.input.type == "text":
        return (f"model {name!r} is a {kind} text model: use {path}/generate, {path}/score, /v1/completions, or "
                f"{path}/anomaly with texts")
    if manifest.input.type == "image":
        return (f"model {name!r} is a {kind} image model: use {path}/sample, {path}/complete, and {path}/log_prob "
                f"or {path}/anomaly with images")
    return f"model {name!r} is a {kind} model of records: use {path}/log_prob, {path}/anomaly or {path}/sample " \
           "with records"


def require_density(name: str, manifest: art.Manifest, endpoint: str) -> None:
    """InvalidInput for `endpoint` (log_prob, anomaly, ...) of a model that gives no density (a GAN only samples)."""
    if manifest.density == "none":
        raise InvalidInput(f"model {name!r} is a {manifest.kind}: it can only sample (its density capability is "
                           f"'none'), so it has no {endpoint}; use /v1/models/{name}/sample",
                           type_="density_unavailable")


class ModelCatalog:
    """The served models by name. Built once per ingress replica from what `build` read off the artifacts."""

    def __init__(self, handles: dict[str, Any], manifests: dict[str, dict], calibrations: dict[str, dict],
                 limits: dict[str, Any], tokenizers: dict[str, str] | None = None,
                 pictures: dict[str, dict[str, bytes]] | None = None, store_uri: str | None = None):
        self.handles = handles
        self.manifests = {name: art.Manifest.model_validate(m) for name, m in manifests.items()}
        self.calibrations = {name: CalibrationSet.from_dict(c) for name, c in calibrations.items()}
        self.limits = Limits.model_validate(limits)
        self.pictures = pictures or {}  # the artifacts' PNGs (loss curve, samples), served read-only
        self.store_uri = store_uri  # the model store, which /v2/repository/index lists
        self.tokenizers: dict[str, TextTokenizer] = {}
        for name, data in (tokenizers or {}).items():
            spec = self.manifests[name].input
            self.tokenizers[name] = TextTokenizer.from_json(data, spec.tokenizer, spec.bos_token_id, spec.eos_token_id)

    # ---- lookups -------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self.manifests)

    def manifest(self, name: str, version: str | None = None) -> art.Manifest:
        if name not in self.manifests:
            raise NotFound(f"no model named {name!r}; available models: {', '.join(self.names()) or 'none'}")
        manifest = self.manifests[name]
        if version is not None and version != manifest.version:
            raise NotFound(f"model {name!r} has no version {version!r} here; the served version is "
                           f"{manifest.version}")
        return manifest

    def family(self, name: str) -> Family:
        manifest = self.manifest(name)
        return family_of(manifest.kind, manifest.input.type)

    def of_input(self, input_type: str) -> str:
        """The served models that take `input_type`, for messages."""
        return ", ".join(n for n, m in sorted(self.manifests.items()) if m.input.type == input_type) or "none"

    def records_model(self, name: str) -> art.Manifest:
        manifest = self.manifest(name)
        if manifest.input.type == "image":
            raise WrongKind(kind_phrase(name, manifest))
        if manifest.input.type != "records":
            raise WrongKind(f"model {name!r} is a text model: use /v1/models/{name}/generate or /score; models of "
                            f"records: {self.of_input('records')}")
        return manifest

    def image_model(self, name: str, endpoint: str) -> art.Manifest:
        manifest = self.manifest(name)
        if manifest.input.type != "image":
            raise WrongKind(f"{endpoint} is for image models; {kind_phrase(name, manifest)}; image models: "
                            f"{self.of_input('image')}")
        return manifest

    def text_model(self, name: str, param: str | None = None) -> tuple[art.Manifest, TextTokenizer]:
        texts = ", ".join(sorted(self.tokenizers)) or "none"
        manifest = self.manifests.get(name)
        if manifest is None:
            raise NotFound(f"no model named {name!r}; text models: {texts}", param=param)
        if name not in self.tokenizers:
            what = kind_phrase(name, manifest) if manifest.input.type == "image" else \
                f"model {name!r} is a {manifest.kind} model of records"
            raise WrongKind(f"{what}; it is not a text model; text models: {texts}", param=param)
        return manifest, self.tokenizers[name]

    def require_density(self, name: str, endpoint: str) -> art.Manifest:
        manifest = self.manifest(name)
        require_density(name, manifest, endpoint)
        return manifest

    def context_length(self, name: str) -> int | None:
        return self.manifest(name).input.context_length

    # ---- replicas ------------------------------------------------------------------------------------------

    async def call(self, name: str, method: str, *args: Any, action: str | None = None) -> Any:
        """`method` of the model's replica; any failure as a ServiceError (replica_failure)."""
        try:
            return await getattr(self.handles[name], method).remote(*args)
        except Exception as e:
            raise replica_failure(name, action or method.replace("_", " "), e) from e

    def stream(self, name: str, method: str, *args: Any) -> Any:
        """A streaming call's response generator (its failures are the caller's to map, item by item)."""
        return getattr(self.handles[name].options(stream=True), method).remote(*args)

    async def replica_info(self, name: str) -> dict[str, Any]:
        """A replica's info(): its runtime, device and how the runtime was chosen; {"runtime": "unavailable"}
        when no replica answers in time."""
        try:
            return await asyncio.wait_for(self.handles[name].info.remote(), timeout=INFO_TIMEOUT_S)
        except Exception:
            return {"runtime": "unavailable"}

    async def readiness(self) -> dict[str, bool]:
        """Whether each model has a replica that has loaded it."""

        async def ready(name: str) -> bool:
            try:
                return bool(await asyncio.wait_for(self.handles[name].ready.remote(), timeout=READY_TIMEOUT_S))
            except Exception:
                return False

        names = self.names()
        return dict(zip(names, await asyncio.gather(*(ready(n) for n in names)), strict=True))
