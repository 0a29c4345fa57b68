"""One error model for the whole service: domain exceptions, raised by the catalog, the services, the replicas'
callers and in-process scoring alike, and rendered in the protocol of the route that failed (genserve's JSON on
/v1, OpenAI's on /v1/completions, the Open Inference Protocol's on /v2) by service/api/errors.py, which also maps
each to its HTTP status.

`type` is the stable name clients match on (model_not_found, wrong_model_kind, limit_exceeded, ...): each class
has a default, and a raise site may name a finer one (unknown_characters, invalid_label, ...) of the same class.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A request the service cannot answer as asked; `message` says what was wrong and what is allowed."""

    type = "internal_error"

    def __init__(self, message: str, *, type_: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.type = type_ or type(self).type
        self.param = param  # the request field at fault, where one is (OpenAI's error carries it)


class InvalidInput(ServiceError):
    """The request is wrong: a value, a field, a combination of fields (400)."""

    type = "invalid_request"


class WrongKind(InvalidInput):
    """The request does not fit the model's family or kind: texts for an image model, per_pixel for a VAE (400)."""

    type = "wrong_model_kind"


class LimitExceeded(InvalidInput):
    """A parameter or the request's cost is past a configured limit (400): max_new_tokens, sampled pixels."""

    type = "limit_exceeded"


class TooLarge(ServiceError):
    """The request holds more items, or bytes, than a limit allows (413)."""

    type = "limit_exceeded"


class NotCalibrated(InvalidInput):
    """An anomaly score the artifact has no calibration (or reference model) for (400)."""

    type = "not_calibrated"


class NotFound(ServiceError):
    """No such model, version or route (404)."""

    type = "model_not_found"


class Conflict(ServiceError):
    """The request conflicts with what the server is doing: e.g. loading a version that is still unloading (409)."""

    type = "conflict"


class LoadFailed(InvalidInput):
    """A model version could not be loaded (400, as Triton answers a failed load): its reason says why."""

    type = "load_failed"


class ModelFailed(ServiceError):
    """The model failed on this request alone (500): its batch-mates were answered; a retry fails the same way."""

    type = "model_error"


class Overloaded(ServiceError):
    """The replica's queue or memory is full (503): retry shortly, or elsewhere."""

    type = "overloaded"


class Unavailable(ServiceError):
    """The model's replica is not there or failed (503): Serve retries elsewhere when it can; retry shortly."""

    type = "model_unavailable"
