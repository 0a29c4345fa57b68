"""The browser playground: static HTML/CSS/JS (service/ui/static/, no build step, nothing fetched from the
internet) served by the ingress at /ui, and the one read-only route it needs beyond the REST API: the
artifact's pictures (loss curve, sample grid) at GET /v1/models/{name}/files/{filename}.

The page holds no data, so /ui is open even when API keys are on; its scripts send the key the user types
(kept in sessionStorage) as `Authorization: Bearer KEY` on every API call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from genserve.service.errors import AUTH, ApiError, responses
from genserve.service.schemas import ErrorResponse

STATIC = Path(__file__).parent / "static"
QUANTILE_LEVELS = np.linspace(0.0, 1.0, 101)  # what /v1/models reports of each held-out score distribution

router = APIRouter()


def mount_ui(api: FastAPI) -> None:
    """/ui: the playground's files; GET / redirects there; /docs: Swagger UI from the vendored copy (none of them
    part of the OpenAPI schema). The app must be made with docs_url=None."""
    api.mount("/ui", StaticFiles(directory=STATIC, html=True), name="ui")

    @api.get("/", include_in_schema=False)
    async def _root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    @api.get("/docs", include_in_schema=False)
    async def _docs(request: Request) -> HTMLResponse:
        # FastAPI's own /docs loads Swagger UI from a CDN, which machines without internet cannot reach: this one
        # serves the copy vendored in static/vendor/swagger-ui (Swagger UI 5, which reads OpenAPI 3.1).
        root = request.scope.get("root_path", "")
        vendor = f"{root}/ui/vendor/swagger-ui"
        return get_swagger_ui_html(openapi_url=f"{root}{api.openapi_url}", title=f"{api.title} - API docs",
                                   swagger_js_url=f"{vendor}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{vendor}/swagger-ui.css",
                                   swagger_favicon_url=f"{vendor}/favicon-32x32.png")


def picture_files(contents: dict[str, bytes]) -> dict[str, bytes]:
    """The PNG files of a loaded artifact (every file of which the manifest lists with its sha256)."""
    return {name: data for name, data in contents.items() if name.endswith(".png") and "/" not in name}


def quantiles(levels: list[float], values: list[float]) -> list[float]:
    """A calibration's held-out score quantiles at QUANTILE_LEVELS (0, 0.01, ..., 1), rounded to 6 significant
    digits: enough for a histogram of the held-out distribution, small enough for every model listing."""
    return [float(f"{v:.6g}") for v in np.interp(QUANTILE_LEVELS, levels, values)]


class UIRoutes:
    """Mixed into the Gateway, which provides manifests, pictures and _manifest()."""

    pictures: dict[str, dict[str, bytes]]

    @router.get("/v1/models/{name}/files/{filename}", name="model_file", tags=["models"],
                response_class=Response,
                responses=responses(ErrorResponse, 404, *AUTH, ok={
                    "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                    "description": "the PNG, as the artifact holds it (its sha256 is the manifest's)"},
                    s404="unknown model, or no such picture in its artifact (only the PNG files its manifest lists "
                    "are served)"))
    async def model_file(self, name: str, filename: str) -> Response:
        """A picture from the model's artifact: loss_curve.png (gradient-trained models), samples.png (image
        models), as listed in the model's `pictures`. Read-only; no other file of the artifact is served."""
        self._manifest(name)
        files = getattr(self, "pictures", {}).get(name, {})
        if filename not in files:
            shown = ", ".join(sorted(files)) or "none"
            raise ApiError(404, "file_not_found", f"model {name!r} has no picture {filename!r}; its pictures: {shown}")
        return Response(files[filename], media_type="image/png", headers={"Cache-Control": "no-cache"})
