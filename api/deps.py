"""FastAPI dependencies: database session, settings, API key."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Path, Query, status
from sqlmodel import Session

from textcls.db import get_db
from textcls.settings import Settings, get_settings

SessionDep = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

# Ids (and offsets) fit the schema's 32-bit INTEGER columns: a larger number
# names nothing, and the databases would fail on it (a 500) instead of a 404.
MAX_ID = 2**31 - 1
PathId = Annotated[int, Path(ge=1, le=MAX_ID)]
FilterId = Annotated[int | None, Query(ge=1, le=MAX_ID)]
Offset = Annotated[int, Query(ge=0, le=MAX_ID)]
# A name filter (job kind, model format): word characters only, so control
# characters (PostgreSQL refuses NUL in text) never reach the database.
NameFilter = Annotated[str | None, Query(max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")]


def _presented_key(x_api_key: str | None, authorization: str | None) -> str | None:
    if x_api_key:
        return x_api_key
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def require_api_key(
    settings: SettingsDep,
    x_api_key: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    """Guards state-changing calls when ``TEXTCLS_API_KEY`` is set."""
    expected = settings.api_key
    if not expected:
        return
    presented = _presented_key(x_api_key, authorization)
    if presented is None or not secrets.compare_digest(presented.encode(), expected.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or wrong API key (send it as X-API-Key or Authorization: Bearer)",
            headers={"WWW-Authenticate": "Bearer"},
        )


WriteAccess = Depends(require_api_key)
