"""Deployments: which model is served, and the one set of rules for changing it.

:func:`promote` and :func:`rollback` are the only ways a deployment row is
written: ``POST /models/{id}/promote``, ``POST /deployments/rollback`` and a
pipeline's ``promote=true`` all go through them, so they all refuse the same
things (an unservable model, a different label set without ``force``).

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

from textcls.labels import names_or_ids, same_label_set
from textcls.models import Deployment, Model, ModelFormat, utcnow
from textcls.settings import get_settings
from textcls.store import ArtifactStore

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


# --------------------------------------------------------------------------- changing it


class DeploymentRefused(Exception):
    """A promotion or rollback that must not happen; the message says why (a 409)."""


@dataclass(frozen=True)
class Change:
    """What a promotion or rollback did (not yet committed, not yet published)."""

    deployment: Deployment
    previous_model_id: int | None
    # False: the model was already served and nothing was recorded.
    recorded: bool = True


def servability_problem(model: Model, store: ArtifactStore | None = None) -> str | None:
    """Why inference workers could not load this model, or None if they can.

    The folder must be there and complete: the size registered with the row is
    what a finished step wrote (a folder cut short or emptied since is refused).
    """
    if model.format not in SERVABLE_FORMATS:
        return (
            f"model {model.id} has format {model.format!r}, which inference workers cannot "
            f"serve (servable: {', '.join(sorted(SERVABLE_FORMATS))})"
        )
    if model.num_labels == 0:
        return (
            f"model {model.id} is a masked language model (a pretrain output, no classifier): "
            f"train a classifier on it first (train base_model_id={model.id})"
        )
    try:
        # A folder's size, or a manifest's (nothing is downloaded to check it).
        entry = (store or ArtifactStore()).stat(model.path)
    except ValueError as exc:
        return f"model {model.id} is not servable: {exc}"
    if entry is None or not entry.is_dir:
        return f"model {model.id} is not servable: its folder {model.path!r} is missing"
    size = entry.size
    if size == 0 or size != model.size_bytes:
        return (
            f"model {model.id} is not servable: its folder {model.path!r} holds {size} bytes, "
            f"not the {model.size_bytes} registered"
        )
    return None


def promote(session: Session, model: Model, *, force: bool = False) -> Change:
    """Make ``model`` the served one, in the caller's transaction (commit, then publish).

    A model whose label set (number of labels, or their names) differs from the
    served model's is refused unless ``force``: clients would silently get a
    different class set.
    Promoting the served model again records nothing, so a later rollback still
    goes back to the model before it.
    """
    assert model.id is not None
    lock_deployments(session)
    problem = servability_problem(model)
    if problem:
        raise DeploymentRefused(problem)
    current = current_deployment(session)
    if current is not None and current.model_id == model.id:
        return Change(current, current.model_id, recorded=False)
    if current is not None and not force:
        served = session.get(Model, current.model_id)
        if served is not None and not same_label_set(served, model):
            raise DeploymentRefused(
                f"model {model.id} has labels "
                f"{names_or_ids(model.label_names, model.num_labels)} but the served model "
                f"{served.id} has {names_or_ids(served.label_names, served.num_labels)}; "
                "clients would get a different label set. Promote with ?force=true to do it "
                "anyway."
            )
    dep = Deployment(model_id=model.id, action="promote", created_at=utcnow())
    session.add(dep)
    session.flush()
    log.info("promoting model %s (deployment %s)", model.id, dep.id)
    return Change(dep, current.model_id if current else None)


def rollback(session: Session) -> Change:
    """Serve the model promoted before the current one, in the caller's transaction.

    The current promotion is marked reverted, so the next rollback goes one
    step further back instead of bouncing between two models.
    """
    lock_deployments(session)
    stack = active_promotions(session)
    if not stack:
        raise DeploymentRefused("nothing to roll back: no model has been promoted")
    if len(stack) < 2:
        raise DeploymentRefused(
            f"nothing to roll back to: model {stack[0].model_id} is the only promotion "
            "left in the history"
        )
    undone, target = stack[0], stack[1]
    model = session.get(Model, target.model_id)
    problem = servability_problem(model) if model is not None else "the model row is gone"
    if problem:
        raise DeploymentRefused(f"cannot roll back to model {target.model_id}: {problem}")
    undone.reverted = True
    session.add(undone)
    dep = Deployment(model_id=target.model_id, action="rollback", created_at=utcnow())
    session.add(dep)
    session.flush()
    log.info("rolling back from model %s to model %s", undone.model_id, target.model_id)
    return Change(dep, undone.model_id)
