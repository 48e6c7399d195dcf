"""FastAPI dependencies: database session, settings, API key."""

from __future__ import annotations

import secrets
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Header, HTTPException, Path, Query, status
from sqlmodel import Session, col
from sqlmodel.sql.expression import SelectOfScalar

from textcls.db import get_db
from textcls.models import MAX_ID
from textcls.settings import Settings, get_settings

SessionDep = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

PathId = Annotated[int, Path(ge=1, le=MAX_ID)]
FilterId = Annotated[int | None, Query(ge=1, le=MAX_ID)]
Offset = Annotated[int, Query(ge=0, le=MAX_ID)]
# A name filter (job kind, model format): word characters only, so control
# characters (PostgreSQL refuses NUL in text) never reach the database.
NameFilter = Annotated[str | None, Query(max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")]
# Lists return at most this many rows; a larger ?limit= is clamped, not refused.
MAX_PAGE = 1000

Row = TypeVar("Row")


def newest_first(
    stmt: SelectOfScalar[Row], id_column: Any, limit: int, offset: int
) -> SelectOfScalar[Row]:
    """One page of a list query, newest (highest id) first."""
    stmt = stmt.order_by(col(id_column).desc())
    return stmt.offset(max(0, offset)).limit(max(1, min(limit, MAX_PAGE)))


def where_given(stmt: SelectOfScalar[Row], *filters: tuple[Any, Any]) -> SelectOfScalar[Row]:
    """``stmt`` narrowed by each ``(column, value)`` whose value was given (not None)."""
    for column, value in filters:
        if value is not None:
            stmt = stmt.where(column == value)
    return stmt


def get_or_404(session: Session, table: type[Row], row_id: int, what: str) -> Row:
    """The row with ``row_id``, or a 404 that names what was not found."""
    row = session.get(table, row_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"{what} {row_id} not found")
    return row


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
