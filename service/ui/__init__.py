"""The browser playground: static HTML/CSS/JS (service/ui/static/, no build step, nothing fetched from the
internet) served by the ingress at /ui. Beyond the REST API it reads the artifact's pictures (loss curve, sample
grid) from GET /v1/models/{name}/files/{filename} (service/api/v1/models.py).

The page holds no data, so /ui is open even when API keys are on; its scripts send the key the user types
(kept in sessionStorage) as `Authorization: Bearer KEY` on every API call.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


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
