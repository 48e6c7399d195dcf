"""Request body limits, enforced before the application reads the body.

A body whose ``Content-Length`` is over the limit is refused with 413 before
any of it is read. A body without one (chunked) is counted as it streams in
and refused as soon as it passes the limit. Uploads (``POST /datasets``) get
``max_upload_bytes`` plus room for the multipart framing; every other request
gets ``max_request_bytes``. The dataset route still checks the file's own size.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

# Multipart boundaries, part headers and the optional ``name`` field.
MULTIPART_SLACK = 64 * 1024
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuses request bodies over a limit with 413 (pure ASGI, streams untouched)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_request_bytes: int,
        max_upload_bytes: int,
        upload_paths: Collection[str] = ("/datasets",),
    ) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.max_upload_bytes = max_upload_bytes
        self.upload_paths = frozenset(upload_paths)

    def limit_for(self, path: str) -> int:
        if path.rstrip("/") in self.upload_paths:
            return self.max_upload_bytes + MULTIPART_SLACK
        return self.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in BODYLESS_METHODS:
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _refuse(send, 400, "invalid Content-Length header")
                return
            if size > limit:
                await _refuse(send, 413, _too_large(scope["path"], limit, size))
                return

        received = 0
        too_large = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if too_large and not started:
                return  # the app's answer to a cut-off body is replaced by the 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large and not started:
            await _refuse(send, 413, _too_large(scope["path"], limit, None))


def _too_large(path: str, limit: int, size: int | None) -> str:
    what = f"request body is {size} bytes" if size is not None else "request body is too large"
    return f"{what}; the limit for {path} is {limit} bytes"


async def _refuse(send: Send, status: int, detail: str) -> None:
    log.warning("refused a request body: %s", detail)
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
