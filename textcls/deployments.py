"""Deployments shared by the control plane and the inference workers.

The database is the truth about which model is served: the newest
``deployments`` row names it. A Redis pub/sub message is only a nudge that
makes inference workers re-read the database at once instead of at their next
poll, so a lost message (or a Redis restart) delays a switch but never loses it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlparse

from sqlalchemy import text
from sqlmodel import Session, col, select

from textcls.models import Deployment, Model, ModelFormat
from textcls.settings import get_settings

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "textcls:deployments"
SERVABLE_FORMATS = frozenset(f.value for f in ModelFormat)
# Any constant works; it only has to be the same in every process.
_PG_LOCK_KEY = 0x7465_7874_636C_7331 & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class ServedModel:
    """The current deployment joined with its model row."""

    deployment_id: int
    action: str
    model_id: int
    model_format: str
    model_path: str
    num_labels: int


def deployment_channel(broker_url: str | None = None) -> str:
    """The pub/sub channel for one broker URL.

    Pub/sub channels are shared by every Redis database number, so stacks that
    share one server on different database numbers get their own channel.
    """
    url = broker_url or get_settings().resolved_broker_url()
    path = (urlparse(url).path or "/").strip("/")
    db = path if path.isdigit() else "0"
    return CHANNEL_PREFIX if db == "0" else f"{CHANNEL_PREFIX}:db{db}"


def current_deployment(session: Session) -> Deployment | None:
    """The newest deployment row (promotion or rollback), or None before any promotion."""
    stmt = select(Deployment).order_by(col(Deployment.id).desc()).limit(1)
    return session.exec(stmt).first()


def current_served(session: Session) -> ServedModel | None:
    """What inference workers should serve now, or None before any promotion."""
    dep = current_deployment(session)
    if dep is None:
        return None
    model = session.get(Model, dep.model_id)
    if model is None:  # pragma: no cover - the foreign key prevents it
        return None
    assert dep.id is not None and model.id is not None
    return ServedModel(
        deployment_id=dep.id,
        action=dep.action,
        model_id=model.id,
        model_format=model.format,
        model_path=model.path,
        num_labels=model.num_labels,
    )


def active_promotions(session: Session) -> list[Deployment]:
    """Promotions not undone by a rollback, newest first: the rollback stack."""
    stmt = (
        select(Deployment)
        .where(Deployment.action == "promote", col(Deployment.reverted).is_(False))
        .order_by(col(Deployment.id).desc())
    )
    return list(session.exec(stmt).all())


def lock_deployments(session: Session) -> None:
    """Serialise promotions and rollbacks until the session's transaction ends.

    Both read the history and then write it; two at once could otherwise roll
    back the same promotion twice. PostgreSQL gets a transaction-scoped advisory
    lock; on SQLite an (empty) UPDATE takes the database write lock early.
    """
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    elif bind.dialect.name == "sqlite":
        session.execute(text("UPDATE deployments SET reverted = reverted WHERE 0"))


@lru_cache(maxsize=8)
def _redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)


def publish_deployment(deployment: Deployment, broker_url: str | None = None) -> int | None:
    """Nudge inference workers; returns how many listeners got it, None if Redis is away.

    A failure is logged, not raised: the row is already committed and workers
    also poll the database, so they switch anyway, only later.
    """
    url = broker_url or get_settings().resolved_broker_url()
    message = json.dumps(
        {
            "deployment_id": deployment.id,
            "model_id": deployment.model_id,
            "action": deployment.action,
        }
    )
    try:
        return int(_redis_client(url).publish(deployment_channel(url), message))
    except Exception as exc:
        log.warning("could not publish deployment %s on Redis: %s", deployment.id, exc)
        return None
