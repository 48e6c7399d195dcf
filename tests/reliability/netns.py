"""Hosts made of Linux network namespaces, for tests that need several machines.

:class:`Lan` makes one namespace per host and wires them with veth pairs to a
bridge inside the first host's namespace (10.231.0.0/24, addresses only inside
the namespaces it made; nothing is added to the root namespace), and removes
them all on :meth:`Lan.close`. :class:`Forward` relays TCP between two
namespaces (or a namespace and the root one) from a thread of this process,
which ``setns`` puts on the right side for each socket it opens: how the test
reaches the API in one "host", and how that host reaches a server that runs
in the root namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
SUBNET = "10.231.0"
_libc = ctypes.CDLL(None, use_errno=True)


def netns_problem() -> str | None:
    """Why namespaces cannot be made here (not root, no iproute2...), or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns add)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    probe = f"t16probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Lan:
    """Namespaces named ``<tag>-<host>``; the first host holds the bridge (.1)."""

    hosts: list[str]
    tag: str = field(default_factory=lambda: f"tc{uuid.uuid4().hex[:6]}")
    made: list[str] = field(default_factory=list)

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def addr(self, host: str) -> str:
        return f"{SUBNET}.{self.hosts.index(host) + 1}"

    def up(self) -> None:
        hub = self.ns(self.hosts[0])
        for host in self.hosts:
            _ip("netns", "add", self.ns(host))
            self.made.append(self.ns(host))
            _ip("-n", self.ns(host), "link", "set", "lo", "up")
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "addr", "add", f"{self.addr(self.hosts[0])}/24", "dev", "br0")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts[1:], 1):
            port = f"v{i}"
            # Both ends made inside the namespaces: no link ever sits in the root one.
            _ip(
                "-n",
                hub,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "eth0",
                "netns",
                self.ns(host),
            )
            _ip("-n", hub, "link", "set", port, "master", "br0", "up")
            _ip("-n", self.ns(host), "addr", "add", f"{self.addr(host)}/24", "dev", "eth0")
            _ip("-n", self.ns(host), "link", "set", "eth0", "up")

    def exec(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run inside a host's namespace."""
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def pids(self, host: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns(host)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill_host(self, host: str) -> list[int]:
        """SIGKILL every process in the host's namespace (the machine losing power)."""
        pids = self.pids(host)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        return pids

    def close(self) -> None:
        for ns in reversed(self.made):
            for pid in subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True
            ).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made.clear()


def in_netns(ns: str | None, fn: Callable[[], T]) -> T:
    """``fn()`` run in a fresh thread that first enters namespace ``ns`` (None: here)."""
    if ns is None:
        return fn()
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=run, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


class Forward:
    """Listens on ``listen`` (namespace, host, port 0 = any) and relays each
    connection to ``target`` (namespace, host, port); None is the root namespace."""

    def __init__(
        self, listen: tuple[str | None, str, int], target: tuple[str | None, str, int]
    ) -> None:
        self.target = target
        self._listener = in_netns(listen[0], lambda: socket.create_server(listen[1:]))
        self.port = int(self._listener.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, name="forward", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        ns, host, port = self.target
        try:
            upstream = in_netns(ns, lambda: socket.create_connection((host, port), timeout=10))
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        threading.Thread(target=_pump, args=(upstream, conn), daemon=True).start()
        _pump(conn, upstream)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
