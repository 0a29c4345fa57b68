"""The FastAPI app: every protocol's router, the error handlers, the OpenAPI touches, the edge middleware and the
playground, in one place."""

from __future__ import annotations

from fastapi import FastAPI

from genserve.service.api import openapi
from genserve.service.api.errors import install_error_handlers
from genserve.service.api.openai.router import router as openai_router
from genserve.service.api.v1.admin import router as v1_admin
from genserve.service.api.v1.density import router as v1_density
from genserve.service.api.v1.models import router as v1_models
from genserve.service.api.v1.text import router as v1_text
from genserve.service.api.v2.router import router as v2_router
from genserve.service.middleware import GatewayMiddleware
from genserve.service.ui import mount_ui


def build_api() -> FastAPI:
    api = FastAPI(
        title="genserve",
        version="0.1.0",
        docs_url=None,  # service.ui.mount_ui serves /docs from a vendored Swagger UI, not a CDN
        description="Exact-likelihood generative models served on Ray Serve: log-densities, calibrated anomaly "
        "scores and samples. Errors are JSON: {\"error\": {\"type\", \"message\"}}.",
    )
    api.add_middleware(GatewayMiddleware)
    for router in (v1_text, v1_models, v1_density, v1_admin, v2_router, openai_router):
        api.include_router(router)
    install_error_handlers(api)
    openapi.install(api)  # the X-Request-ID parameter; no 422 that is never sent
    mount_ui(api)  # the playground at /ui (static files; GET / redirects there)
    return api
