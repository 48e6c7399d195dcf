"""Load generators for the HTTP benchmarks (loopback only, bounded in time and requests).

* :func:`closed_loop` — ``concurrency`` asyncio tasks, each with its own
  keep-alive connection, each sending its next request as soon as the previous
  one answered, for a warm-up and then a measured window. Throughput is the
  requests that completed inside the window divided by its length; latencies
  are those requests' (send to last byte). A request counts as an error on any
  status but 200, a timeout or a connection failure. Two clients: ``raw``
  (default), a minimal HTTP/1.1 client on asyncio streams (~0.1 ms of CPU per
  request), and ``httpx`` (``httpx.AsyncClient``), which measured 2 ms of CPU
  per request at concurrency 8 and 5 ms at 32 here: on two shared cores it,
  not the server, became the bottleneck.
* :func:`open_loop` — requests started on a fixed schedule (``rate`` per
  second) whatever the server does, as real clients do; latency is measured
  from the *scheduled* start, so a stalled server shows up in the tail instead
  of silently slowing the generator down ("coordinated omission").
* :func:`sequential` — one keep-alive ``http.client`` connection, one request
  after another: the cheapest client Python has, for latency floors.

Every generator also reports the CPU time the generating process used per
request: on a two-core machine the client competes with the server, and this
says by how much.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx

from bench.common import latency_summary

log = logging.getLogger(__name__)

JSON_HEADERS = {"content-type": "application/json"}


@dataclass
class LoadResult:
    """One load run: throughput, latency and errors of the measured window."""

    concurrency: int
    window_s: float
    requests: int
    errors: int
    rps: float
    latency: dict[str, float]
    client_cpu_ms_per_request: float
    sent: int = 0  # every request sent, warm-up and stragglers included
    error_samples: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def predict_bodies(texts: Sequence[str]) -> list[bytes]:
    """One ``{"text": ...}`` body per sentence (encoded once, outside the timing)."""
    return [json.dumps({"text": t}, ensure_ascii=False).encode() for t in texts]


class _RawConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams; just enough HTTP for JSON APIs."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def send(self, request: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            await self._connect()
        assert self.reader is not None and self.writer is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = -1
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key == b"content-length":
                length = int(value)
            elif key == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            body = bytearray()
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                body += await self.reader.readexactly(size + 2)
                if size == 0:
                    break
            return status, bytes(body)
        if length < 0:
            raise ConnectionError("response without Content-Length")
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _raw_request(method: str, url: str, body: bytes | None) -> bytes:
    parsed = urlparse(url)
    path = parsed.path + (f"?{parsed.query}" if parsed.query else "")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {parsed.netloc}"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def _closed_loop(
    url: str,
    bodies: Sequence[bytes],
    *,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    timeout_s: float,
    max_requests: int,
    client: str,
) -> LoadResult:
    records: list[tuple[float, float, bool]] = []  # (end, latency ms, ok)
    errors_seen: list[str] = []
    counter = itertools.count()
    loop_start = time.perf_counter()
    window_start = loop_start + warmup_s
    window_end = window_start + duration_s
    parsed = urlparse(url)
    requests = [_raw_request("POST", url, b) for b in bodies]

    def note(problem: str) -> None:
        if len(errors_seen) < 5:
            errors_seen.append(problem)

    async def raw_worker(w: int) -> None:
        conn = _RawConnection(parsed.hostname or "127.0.0.1", parsed.port or 80)
        i = w
        try:
            while time.perf_counter() < window_end and next(counter) < max_requests:
                request = requests[i % len(requests)]
                i += concurrency
                t0 = time.perf_counter()
                ok = False
                try:
                    async with asyncio.timeout(timeout_s):
                        status, body = await conn.send(request)
                    ok = status == 200
                    if not ok:
                        note(f"HTTP {status}: {body[:200]!r}")
                except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
                    note(f"{type(exc).__name__}: {exc}")
                    conn.close()
                t1 = time.perf_counter()
                records.append((t1, (t1 - t0) * 1000.0, ok))
        finally:
            conn.close()

    async def httpx_worker(w: int, http: httpx.AsyncClient) -> None:
        i = w
        while time.perf_counter() < window_end and next(counter) < max_requests:
            body = bodies[i % len(bodies)]
            i += concurrency
            t0 = time.perf_counter()
            ok = False
            try:
                r = await http.post(url, content=body)
                ok = r.status_code == 200
                if not ok:
                    note(f"HTTP {r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as exc:
                note(f"{type(exc).__name__}: {exc}")
            t1 = time.perf_counter()
            records.append((t1, (t1 - t0) * 1000.0, ok))

    cpu0 = time.process_time()
    if client == "raw":
        await asyncio.gather(*(raw_worker(w) for w in range(concurrency)))
    elif client == "httpx":
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=timeout_s, headers=JSON_HEADERS) as h:
            await asyncio.gather(*(httpx_worker(w, h) for w in range(concurrency)))
    else:
        raise ValueError(f"unknown client {client!r} (raw or httpx)")
    cpu = time.process_time() - cpu0

    in_window = [r for r in records if window_start <= r[0] <= window_end]
    ok_ms = [ms for _, ms, ok in in_window if ok]
    errors = sum(1 for _, _, ok in in_window if not ok)
    last = max((r[0] for r in records), default=window_start)
    window = min(duration_s, max(1e-9, last - window_start))
    return LoadResult(
        concurrency=concurrency,
        window_s=round(window, 3),
        requests=len(ok_ms),
        errors=errors,
        rps=len(ok_ms) / window if window > 0 else 0.0,
        latency=latency_summary(ok_ms),
        client_cpu_ms_per_request=1000.0 * cpu / max(1, len(records)),
        sent=len(records),
        error_samples=errors_seen,
        extra={"client": client},
    )


def _run(coro: Any) -> Any:
    """``asyncio.run`` on uvloop when it is installed (less client CPU per request)."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def closed_loop(
    url: str,
    bodies: Sequence[bytes],
    *,
    concurrency: int,
    warmup_s: float = 2.0,
    duration_s: float = 10.0,
    timeout_s: float = 30.0,
    max_requests: int = 1_000_000,
    client: str = "raw",
) -> LoadResult:
    """Closed-loop POST load (see the module doc); returns the measured window."""
    result: LoadResult = _run(
        _closed_loop(
            url,
            bodies,
            concurrency=concurrency,
            warmup_s=warmup_s,
            duration_s=duration_s,
            timeout_s=timeout_s,
            max_requests=max_requests,
            client=client,
        )
    )
    return result


async def _open_loop(
    url: str,
    *,
    rate: float,
    duration_s: float,
    timeout_s: float,
    max_in_flight: int,
    client: str,
) -> LoadResult:
    n = max(1, int(rate * duration_s))
    lat_ms: list[float] = []
    errors = 0
    errors_seen: list[str] = []
    dropped = 0
    in_flight = 0
    parsed = urlparse(url)
    request = _raw_request("GET", url, None)
    idle: list[_RawConnection] = []
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    http = httpx.AsyncClient(limits=limits, timeout=timeout_s) if client == "httpx" else None

    async def get() -> tuple[int, bytes]:
        if http is not None:
            r = await http.get(url)
            return r.status_code, r.content
        conn = idle.pop() if idle else _RawConnection(parsed.hostname or "", parsed.port or 80)
        try:
            async with asyncio.timeout(timeout_s):
                out = await conn.send(request)
        except BaseException:
            conn.close()
            raise
        idle.append(conn)
        return out

    async def one(scheduled: float) -> None:
        nonlocal errors, in_flight
        in_flight += 1
        try:
            status, body = await get()
            if status == 200:
                lat_ms.append((time.perf_counter() - scheduled) * 1000.0)
            else:
                errors += 1
                if len(errors_seen) < 5:
                    errors_seen.append(f"HTTP {status}: {body[:200]!r}")
        except (OSError, TimeoutError, ValueError, httpx.HTTPError) as exc:
            errors += 1
            if len(errors_seen) < 5:
                errors_seen.append(f"{type(exc).__name__}: {exc}")
        finally:
            in_flight -= 1

    try:
        # A few unmeasured requests open the first connections.
        await asyncio.gather(*(get() for _ in range(min(4, max_in_flight))))
        start = time.perf_counter() + 0.05
        cpu0 = time.process_time()
        tasks = []
        for i in range(n):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if in_flight >= max_in_flight:
                dropped += 1  # the bound: never more than max_in_flight outstanding
                continue
            tasks.append(asyncio.create_task(one(scheduled)))
        await asyncio.gather(*tasks)
        cpu = time.process_time() - cpu0
        elapsed = time.perf_counter() - start
    finally:
        if http is not None:
            await http.aclose()
        for conn in idle:
            conn.close()
    return LoadResult(
        concurrency=max_in_flight,
        window_s=round(elapsed, 3),
        requests=len(lat_ms),
        errors=errors + dropped,
        rps=len(lat_ms) / elapsed if elapsed > 0 else 0.0,
        latency=latency_summary(lat_ms),
        client_cpu_ms_per_request=1000.0 * cpu / max(1, n),
        sent=n - dropped,
        error_samples=errors_seen,
        extra={
            "target_rate": rate,
            "scheduled": n,
            "dropped_over_bound": dropped,
            "client": client,
        },
    )


def open_loop(
    url: str,
    *,
    rate: float,
    duration_s: float,
    timeout_s: float = 10.0,
    max_in_flight: int = 64,
    client: str = "raw",
) -> LoadResult:
    """Open-loop GETs at ``rate`` per second for ``duration_s`` (see the module doc)."""
    result: LoadResult = _run(
        _open_loop(
            url,
            rate=rate,
            duration_s=duration_s,
            timeout_s=timeout_s,
            max_in_flight=max_in_flight,
            client=client,
        )
    )
    return result


class KeepAliveClient:
    """A single keep-alive ``http.client`` connection (lowest client overhead in Python)."""

    def __init__(self, base_url: str, timeout_s: float = 30.0) -> None:
        parsed = urlparse(base_url)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 80
        self.timeout_s = timeout_s
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = JSON_HEADERS if body is not None else {}
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=body, headers=headers)
                r = self.conn.getresponse()
                return r.status, r.read()
            except (http.client.HTTPException, ConnectionError):
                # The server closed an idle keep-alive connection: reconnect once.
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


def sequential(
    call: Callable[[int], bool], n: int, warmup: int = 5
) -> tuple[list[float], int, float]:
    """Run ``call(i)`` ``n`` times; returns (ms of each success, errors, CPU ms per call)."""
    for i in range(min(warmup, n)):
        call(i)
    lat: list[float] = []
    errors = 0
    cpu0 = time.process_time()
    for i in range(n):
        t0 = time.perf_counter()
        ok = call(i)
        ms = (time.perf_counter() - t0) * 1000.0
        if ok:
            lat.append(ms)
        else:
            errors += 1
    cpu = time.process_time() - cpu0
    return lat, errors, 1000.0 * cpu / max(1, n)
