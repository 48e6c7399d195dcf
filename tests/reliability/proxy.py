"""A TCP proxy the test controls: put it between a stack and its database, then cut it."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class _ConnState:
    """What one proxied connection sent in its current transaction."""

    seen: set[bytes] = field(default_factory=set)
    committing: bool = False


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``cut()`` makes the target unreachable.

    While cut, live connections are closed and new ones are accepted and closed at
    once (a database that went away), without giving up the port; ``restore()``
    forwards again.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._up = threading.Event()
        self._up.set()
        self._closed = False
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        # cut_after_commit: the markers to look for; whether the trigger is armed.
        self._markers: tuple[bytes, ...] = ()
        self._armed = False
        self.tripped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)
        self._thread.start()

    def cut(self) -> None:
        """The target goes away: drop every live connection, refuse new ones."""
        self._up.clear()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            _close(conn)
        log.info("proxy %s cut", self.port)

    def cut_after_commit(self, *markers: bytes) -> None:
        """Cut as soon as the server answers a COMMIT of a transaction that sent ``markers``.

        Each marker is looked for in what one client connection sends within
        one transaction (a statement's text or a bound parameter such as
        b"succeeded"; psycopg sends only the parameters of a statement it has
        prepared already); the answer to that transaction's
        COMMIT reaches the client, then the database goes away: ``tripped`` is
        set. A PostgreSQL COMMIT goes as its own simple query.
        """
        with self._lock:
            self._markers, self._armed = markers, True
        self.tripped.clear()

    def _watch_client(self, conn: _ConnState, data: bytes) -> None:
        with self._lock:
            if not self._armed:
                return
            conn.seen.update(m for m in self._markers if m in data)
            if b"COMMIT" in data or b"ROLLBACK" in data:
                conn.committing = b"COMMIT" in data and conn.seen == set(self._markers)
                conn.seen.clear()

    def _after_server(self, conn: _ConnState) -> None:
        with self._lock:
            trip = self._armed and conn.committing
            if trip:
                self._armed = conn.committing = False
        if trip:
            self.cut()
            self.tripped.set()

    def restore(self) -> None:
        self._up.set()
        log.info("proxy %s restored", self.port)

    def close(self) -> None:
        self._closed = True
        self.cut()
        _close(self._listener)
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up.is_set():
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns.update((client, upstream))
            state = _ConnState()
            for src, dst, from_client in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(
                    target=self._pump, args=(src, dst, from_client, state), daemon=True
                ).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, from_client: bool, state: _ConnState
    ) -> None:
        try:
            while data := src.recv(65536):
                if from_client:
                    self._watch_client(state, data)
                dst.sendall(data)
                if not from_client:
                    self._after_server(state)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with self._lock:
                    self._conns.discard(s)
                _close(s)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
