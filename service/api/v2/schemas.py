"""The Open Inference Protocol's JSON bodies (KServe v2, Triton's HTTP/REST API): the inference request as
genserve reads it, and the responses as the OpenAPI schema describes them (the routes build the bodies
themselves)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from genserve.service.api.common import inline_schema
from genserve.service.api.errors import REQUEST_ID_HEADER


class V2ErrorResponse(BaseModel):
    """The Open Inference Protocol's error body (/v2 routes)."""

    error: str = Field(description="what was wrong and what is allowed")
    request_id: str | None = Field(None, description="the request's X-Request-ID, to find it in the server's logs")



# ---- the request's JSON -------------------------------------------------------------------------------------


class V2Input(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    shape: list[Annotated[StrictInt, Field(ge=0)]]
    datatype: StrictStr
    parameters: dict[str, Any] = {}
    data: Any = None


class V2RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    parameters: dict[str, Any] = {}


class V2InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictStr | None = None
    parameters: dict[str, Any] = {}
    inputs: list[V2Input] = Field(min_length=1)
    outputs: list[V2RequestedOutput] | None = None


# ---- the responses' JSON, for the OpenAPI schema (the routes build the bodies themselves) ------------------


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(description="one of the protocol's datatypes: BOOL, INT64, FP32, FP64, BYTES, ...")
    shape: list[int] = Field(description="-1: any size (the batch)")


class RepositoryIndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ready: bool = Field(False, description="only the models that are ready")


class RepositoryModel(BaseModel):
    name: str
    version: str
    state: Literal["READY", "LOADING", "UNLOADING", "UNAVAILABLE", "UNLOADED"] = Field(
        description="READY: served; LOADING: its replicas are starting; UNLOADING: draining the requests it "
        "accepted; UNAVAILABLE: it failed to load (see reason); UNLOADED: in the store, not served")
    reason: str = Field(description="why a version is not READY; empty when it is")


class RepositoryLoadParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | int | None = Field(None, description="genserve's extension: the one version to load; default "
                                      "the versions the model's version policy selects")


class RepositoryLoadRequest(BaseModel):
    """Triton's load request. genserve loads models from its store only: a `config` or `file:` override is
    refused."""

    model_config = ConfigDict(extra="forbid")
    parameters: RepositoryLoadParameters = RepositoryLoadParameters()


class RepositoryUnloadParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    unload_dependents: bool = Field(False, description="accepted for Triton's clients; genserve models have no "
                                    "dependents")
    version: str | int | None = Field(None, description="genserve's extension: the one version to unload; default "
                                      "every loaded version")


class RepositoryUnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parameters: RepositoryUnloadParameters = RepositoryUnloadParameters()


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str = Field(description="pytorch, onnxruntime, or genserve when the replica did not answer")
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = Field(None, description="the elements, flat, row-major (absent when binary)")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size when the data follow the JSON")


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(None, description="the request's id, when it gave one")
    parameters: dict[str, Any] | None = Field(None, description="score_type, threshold and false_positive_rate "
                                               "used, when anomaly outputs were computed")
    outputs: list[V2OutputTensor]


INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": inline_schema(V2InferRequest)},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description": "the JSON "
                                            "request, then binary tensor data; Inference-Header-Content-Length "
                                            "gives the JSON's length"}},
}}}
INFER_OK = {"description": "JSON, or (binary outputs) the JSON response then binary tensor data, with "
            "Inference-Header-Content-Length",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
HEALTH_OK = {"description": "true (the body is empty)"}
HEALTH_FALSE = {"description": "false: some model (or this model) has no replica that has loaded it (the body is "
                "empty)", "headers": REQUEST_ID_HEADER}


