"""The web console: a static single-page app (plain HTML, CSS and JavaScript, no
build step) served under ``/ui``. It talks to the same REST API as every other
client, so it can do nothing the API refuses; write calls send the API key the
user typed (kept in the tab's ``sessionStorage``) as ``X-API-Key``."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, status
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from textcls.jobs import DEFAULT_STEPS, KIND_PARAMS, PIPELINE_STEPS
from textcls.models import JobStatus

STATIC_DIR = Path(__file__).parent
# The console's files: nothing else under this folder is ever served.
ASSETS: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
AssetName = Annotated[str, PathParam(max_length=32, pattern=r"^[a-z]+\.(js|css)$")]

router = APIRouter(tags=["console"])


@lru_cache
def _read(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


@router.get("/", status_code=status.HTTP_307_TEMPORARY_REDIRECT)
def root() -> RedirectResponse:
    """The console lives at ``/ui``."""
    return RedirectResponse("/ui", status_code=status.HTTP_307_TEMPORARY_REDIRECT)


@lru_cache
def _page() -> bytes:
    """index.html with the core's job kinds, statuses and pipeline steps filled in,
    so the console's lists never drift from the API's."""
    config = {
        "kinds": sorted(KIND_PARAMS),
        "statuses": [s.value for s in JobStatus],
        "pipeline_steps": list(PIPELINE_STEPS),
        "default_steps": list(DEFAULT_STEPS),
    }
    # "<" escaped: the JSON sits inside a <script> element.
    blob = json.dumps(config).replace("<", "\\u003c")
    return _read("index.html").replace(b"{{CONFIG}}", blob.encode())


@router.get("/ui", response_class=HTMLResponse)
def console() -> HTMLResponse:
    """The web console (datasets, jobs, models, deployments)."""
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})


@router.get(
    "/ui/{asset}",
    responses={200: {"content": {"text/javascript": {}, "text/css": {}}}, 404: {}},
)
def console_asset(asset: AssetName) -> Response:
    """One of the console's script and style files."""
    media_type = ASSETS.get(asset)
    if media_type is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no console file {asset!r}")
    return Response(_read(asset), media_type=media_type, headers={"Cache-Control": "no-cache"})
