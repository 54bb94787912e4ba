"""The routes of `vlm serve`: the web page at / (vlm/serve/static/), /health, and the OpenAI-compatible /v1 API."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from vlm.serve import errors

STATIC_DIR = Path(__file__).resolve().parent / "static"


def create_app(model_id: str, static_dir: Path = STATIC_DIR) -> FastAPI:
    """The server's ASGI app."""
    app = FastAPI(title="vlm", docs_url=None, redoc_url=None, openapi_url=None)
    errors.install(app)
    app.mount("/static", StaticFiles(directory=static_dir), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(static_dir / "index.html", media_type="text/html")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "vlm"}]}

    return app
