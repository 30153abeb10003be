"""The feature browser: a read-only FastAPI app over one or more model folders.

JSON API (every route takes `?model=KEY`, default the first model):
    GET /api/models                   the models served
    GET /api/model                    a model: architecture, data, forest size, examples, labels, scores, eval report
    GET /api/features?parent=-1       the roots (parent=I: feature I's children), paged by offset/limit
    GET /api/features/{i}             one feature: label, stats, histogram, contexts, family, neighbours, ...
    GET /api/search?q=...             features by id, by label, or by a token they fire on
    GET /api/steer?feature=&scale=&text=   what adding the feature at the hook does (computed, nothing stored)
    GET /api/images/{id}              an image model's picture `id` of its store's images.json, as PNG
Pages: `/` and `/features/{i}` (a link of its own for every feature) serve the one page shipped in
`static/`; `/report` serves the model's eval report.

Only GET routes; no parameter names a file (models are addressed by key, static files by StaticFiles,
which refuses paths outside its folder; pictures by their id in images.json, read only from the files
it lists, inside their collection: hsae.serve.images). Corpus text reaches the page only as JSON and is set as text
by the page; a Content-Security-Policy allowing only the page's own script backs that up. A feature id
out of range is a 404 with a message, and so is an image id the store does not list.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from hsae.errors import HsaeError
from hsae.serve.data import FeatureNotFound, ModelView
from hsae.serve.images import ImageNotFound

STATIC = Path(__file__).parent / "static"
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'self'; form-action 'none'; frame-ancestors 'none'"
)
# The eval report is hsae's own self-contained HTML: inline styles and data: images, never scripts.
REPORT_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"


def model_keys(directories: Sequence[Path]) -> list[str]:
    """A short key per model folder: its name (safe characters only), numbered where names repeat."""
    keys: list[str] = []
    for directory in directories:
        base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(directory).resolve().name) or "model"
        key, n = base, 2
        while key in keys:
            key, n = f"{base}-{n}", n + 1
        keys.append(key)
    return keys


def create_app(directories: Sequence[str | Path]) -> FastAPI:
    if not directories:
        raise HsaeError("give at least one model folder to serve")
    paths = [Path(d) for d in directories]
    views = {key: ModelView(path, key) for key, path in zip(model_keys(paths), paths, strict=True)}
    first = next(iter(views))
    app = FastAPI(title="hsae feature browser", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    page = (STATIC / "index.html").read_text()

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        policy = REPORT_POLICY if request.url.path == "/report" else PAGE_POLICY
        response.headers["Content-Security-Policy"] = policy
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.exception_handler(FeatureNotFound)
    @app.exception_handler(ImageNotFound)
    async def not_found(request: Request, err: LookupError):
        return JSONResponse({"detail": str(err)}, status_code=404)

    @app.exception_handler(HsaeError)
    async def bad_request(request: Request, err: HsaeError):
        return JSONResponse({"detail": str(err)}, status_code=400)

    def view(model: str | None) -> ModelView:
        key = model or first
        if key not in views:
            raise HTTPException(404, f"no model {key!r} is served here (models: {', '.join(views)})")
        return views[key]

    @app.get("/api/models")
    def models() -> list[dict]:
        return [
            {"key": v.key, "name": v.directory.name, "arch": v.sae.arch, "n_latents": v.n_latents}
            for v in views.values()
        ]

    @app.get("/api/model")
    def model_info(model: str | None = None) -> dict:
        return view(model).model()

    @app.get("/api/features")
    def features(
        parent: int = -1,
        offset: int = Query(0, ge=0),
        limit: int = Query(200, ge=1, le=1000),
        model: str | None = None,
    ) -> dict:
        return view(model).list_children(parent, offset, limit)

    @app.get("/api/features/{latent}")
    def feature(latent: int, model: str | None = None) -> dict:
        return view(model).feature(latent)

    @app.get("/api/search")
    def search(q: str = Query(..., max_length=200), limit: int = Query(50, ge=1, le=500), model: str | None = None):
        return view(model).search(q, limit)

    @app.get("/api/steer")
    def steer(feature: int, scale: float, text: str = Query(..., max_length=2000), model: str | None = None) -> dict:
        if not math.isfinite(scale) or abs(scale) > 1e4:
            raise HTTPException(400, "scale must be a finite number of at most 1e4 in size")
        return view(model).steer(feature, scale, text)

    @app.get("/api/images/{image}")
    def image(image: int, model: str | None = None) -> Response:
        v = view(model)
        if v.images is None:
            why = v.images_problem or "it was not trained on an image store"
            raise HTTPException(404, f"model {v.key} has no images to show: {why}")
        # an image's bytes do not change while its store stays; an hour keeps the page quick
        return Response(v.images.png(image), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/report")
    def report(model: str | None = None) -> Response:
        v = view(model)
        if not v.report_html.is_file():
            return HTMLResponse(
                "<!doctype html><title>no report</title><p>This model has no eval report yet: run "
                "<code>hsae eval</code> on its folder.</p>",
                status_code=404,
            )
        return FileResponse(v.report_html, media_type="text/html")

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/features/{latent}", response_class=HTMLResponse)
    def feature_page(latent: str, model: str | None = None) -> HTMLResponse:
        # The page itself shows the feature (or the API's message); a bad id still answers 404.
        v = view(model)
        ok = latent.isdigit() and int(latent) < v.n_latents
        return HTMLResponse(page, status_code=200 if ok else 404)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve(directories: Sequence[str | Path], host: str = "127.0.0.1", port: int = 8765) -> None:
    import uvicorn

    uvicorn.run(create_app(directories), host=host, port=port, log_level="warning")
