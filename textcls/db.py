"""Database engine, sessions and schema migrations."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlmodel import Session, create_engine

from textcls.settings import get_settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

T = TypeVar("T")


@lru_cache
def engine_for(url: str) -> Engine:
    """One engine per URL per process (created lazily, never at import)."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs.update(pool_size=5, max_overflow=10, pool_recycle=1800)
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        # The API, workers and inference workers share one SQLite file; WAL lets
        # readers run beside a writer and busy_timeout waits out short locks.
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


def get_engine() -> Engine:
    return engine_for(get_settings().resolved_database_url())


def get_db() -> Iterator[Session]:
    """FastAPI dependency: one session per request.

    Closing runs after the response is sent; if the database went away by then,
    the rollback in ``close`` fails. That must not turn a sent response into an
    application error (uvicorn would drop the keep-alive connection), so the
    session is invalidated and the pool drops its connection instead.
    """
    session = Session(get_engine())
    try:
        yield session
    finally:
        try:
            session.close()
        except DBAPIError as exc:
            log.warning("closing a database session failed (%s); dropping its connection", exc)
            with contextlib.suppress(Exception):
                session.invalidate()


def session_scope() -> Session:
    """A new session for code outside a request (workers, CLI)."""
    return Session(get_engine())


def retry_db(fn: Callable[[], T], what: str, seconds: float | None = None) -> T:
    """Call ``fn``, retrying while the database is unreachable, for up to ``seconds``.

    For a job's final bookkeeping: its work is done and must not be thrown away
    because the database blinked. The heartbeat thread keeps the job alive
    meanwhile, as soon as the database is back.
    """
    limit = get_settings().db_retry_seconds if seconds is None else seconds
    deadline = time.monotonic() + limit
    pause = 0.5
    while True:
        try:
            return fn()
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("%s: database unavailable (%s); retrying", what, str(exc).splitlines()[0])
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


class SingletonLock:
    """A lock that one process per database holds at a time, for as long as it lives.

    PostgreSQL: a session-level ``pg_try_advisory_lock`` on a connection kept
    for the purpose (the server releases it when that connection or the
    process dies). SQLite, which means one host: an ``flock`` on a file beside
    the database (released when the process dies). :meth:`held` tries to take
    the lock when it is free and checks it is still ours when taken, so a
    replica takes over within one call of the holder's death. Used to run the
    reaper's sweeps in one API process of several.
    """

    def __init__(self, name: str, url: str | None = None) -> None:
        self.name = name
        self.url = url or get_settings().resolved_database_url()
        # A stable 63-bit key from the name (advisory locks are per database).
        self._key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1
        self._conn: Connection | None = None
        self._fd: int | None = None

    def held(self) -> bool:
        """Whether this process holds the lock now (taking it if it is free)."""
        backend = make_url(self.url).get_backend_name()
        was = self._conn is not None or self._fd is not None
        now = self._held_pg() if backend == "postgresql" else self._held_file()
        if now != was:
            log.info("%s lock %s by this process", self.name, "taken" if now else "lost")
        return now

    def release(self) -> None:
        if self._conn is not None:
            # Invalidated, not returned to the pool: the lock must go with it.
            with contextlib.suppress(Exception):
                self._conn.invalidate()
                self._conn.close()
            self._conn = None
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the flock
            self._fd = None

    def _held_pg(self) -> bool:
        try:
            if self._conn is not None:
                self._conn.execute(text("SELECT 1"))
                self._conn.rollback()
                return True
            conn = engine_for(self.url).connect()
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self._key}).scalar()
            conn.rollback()  # the lock is the session's, not the transaction's
            if got:
                self._conn = conn
                return True
            conn.close()
            return False
        except (OperationalError, InterfaceError):
            # The connection (and with it the lock) is gone; try again next time.
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.invalidate()
                self._conn = None
            return False

    def _held_file(self) -> bool:
        if self._fd is not None:
            return True
        database = make_url(self.url).database
        if not database or database == ":memory:":
            return True  # an in-memory database lives in this process alone
        try:
            fd = os.open(f"{database}.{self.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            log.warning("cannot open the %s lock file: %s", self.name, exc)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another process holds it
            os.close(fd)
            return False
        self._fd = fd
        return True


def alembic_config(url: str | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would choke on '%' in passwords.
    cfg.set_main_option(
        "sqlalchemy.url", (url or get_settings().resolved_database_url()).replace("%", "%%")
    )
    return cfg


def migrate(url: str | None = None) -> None:
    """Bring the schema to the newest migration (idempotent)."""
    from alembic import command

    url = url or get_settings().resolved_database_url()
    log.info("migrating database %s", make_url(url).render_as_string(hide_password=True))
    engine_for(url)  # creates the SQLite folder if needed
    command.upgrade(alembic_config(url), "head")
