"""``POST /deployments/try``: one sentence through the served model, from the control plane.

The console runs in the browser on the control plane's origin; the inference
workers listen elsewhere (``TEXTCLS_INFERENCE_URL``, default port 8001) and may
want their own key (``TEXTCLS_PREDICT_API_KEY``). Rather than open the
inference workers to cross-origin calls and hand their key to browsers, the
control plane forwards the sentence there, with that key, and returns the
answer: the console only needs the control plane's API key, like every write.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from fastapi import APIRouter, HTTPException, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api.deps import SettingsDep, WriteAccess

log = logging.getLogger(__name__)
router = APIRouter(tags=["deployments"])

TRY_TIMEOUT_S = 10.0


class TryRequest(BaseModel):
    text: str = Field(min_length=1, description="one sentence to classify")


class TryResult(BaseModel):
    """The inference worker's answer (the seed's shape) and where it came from."""

    categories: int
    probabilities: float
    model_id: int | None = None
    inference_url: str


@router.post(
    "/deployments/try",
    response_model=TryResult,
    dependencies=[WriteAccess],
    responses={
        422: {"description": "the inference worker refused the text (its reason)"},
        502: {"description": "the inference worker could not be reached"},
        503: {"description": "no model is being served yet"},
    },
)
def try_served_model(body: TryRequest, settings: SettingsDep) -> Any:
    """Classify one sentence with the served model (forwarded to ``TEXTCLS_INFERENCE_URL``)."""
    url = settings.resolved_inference_url()
    headers = {"X-API-Key": settings.predict_api_key} if settings.predict_api_key else {}
    try:
        r = httpx.post(
            f"{url}/predict", json={"text": body.text}, headers=headers, timeout=TRY_TIMEOUT_S
        )
    except httpx.HTTPError as exc:
        log.warning("try: inference worker at %s unreachable: %s", url, exc)
        raise HTTPException(
            status.HTTP_502_BAD_GATEWAY,
            detail=f"the inference worker at {url} could not be reached ({type(exc).__name__})",
        ) from None
    try:
        answer = r.json()
    except ValueError:
        answer = {"detail": r.text[:500]}
    if r.status_code != 200:
        # Its refusal (bad text, no model yet) is the answer, with its reason.
        detail = answer.get("detail") if isinstance(answer, dict) else answer
        return JSONResponse({"detail": detail}, status_code=r.status_code)
    return TryResult(**answer, inference_url=url)
