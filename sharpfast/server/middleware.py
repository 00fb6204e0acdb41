"""ASGI and uvicorn pieces in front of the app: the middleware that refuses what must not reach
the JSON parser (oversized or deeply nested bodies, a missing API key) and the uvicorn protocol
that drops connections whose request headers do not arrive in time (slow clients)."""
from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable
from typing import Any, Optional

from .protocol import Limits


def depth_ok(body: bytes, limit: int) -> bool:
    """Whether JSON text nests at most `limit` arrays / objects (strings skipped), in one pass."""
    depth, in_str, esc = 0, False, False
    for ch in body:
        if in_str:
            if esc:
                esc = False
            elif ch == 0x5C:  # backslash
                esc = True
            elif ch == 0x22:  # quote
                in_str = False
        elif ch == 0x22:
            in_str = True
        elif ch in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return False
        elif ch in (0x5D, 0x7D):
            depth -= 1
    return True


class BodyGuard:
    """ASGI middleware in front of the app: the API key (for every path but Limits.open_paths():
    /health, and the docs when the operator serves them), then for POST bodies the size
    (Content-Length and the bytes actually sent), the nesting depth and whether it is JSON at
    all, before the app's JSON parser sees them."""

    def __init__(self, app, limits: Limits, on_refused=None) -> None:
        self.app, self.limits, self.on_refused = app, limits, on_refused or (lambda status: None)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> Any:
        """The ASGI entry: refuse, or pass the (replayed) request on."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.limits.api_key is not None and scope.get("path") not in self.limits.open_paths():
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")  # the scheme is case-insensitive (RFC 7235), the key is not
            ok = hmac.compare_digest(token.encode("utf-8"), self.limits.api_key.encode("utf-8"))
            if scheme.lower() != "bearer" or not ok:
                return await self._refuse(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        if scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        limit = self.limits.max_body_bytes
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            return await self._refuse(send, 400, "Content-Length is not a number")
        if declared > limit:
            return await self._refuse(send, 413, f"the body is {declared} bytes; this server takes at most {limit}")
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.limits.body_timeout
        while True:
            try:  # the whole body within body_timeout: a dripped, short or unfinished body is dropped
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                return await self._refuse(send, 408, f"the body did not arrive within {self.limits.body_timeout:g} s")
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self._refuse(send, 413, f"the body is over {limit} bytes")
            chunks.append(chunk)
            if not msg.get("more_body"):
                break
        body = b"".join(chunks)
        if not depth_ok(body, self.limits.max_depth):
            return await self._refuse(send, 400, f"the body nests deeper than {self.limits.max_depth} levels")
        try:
            json.loads(body)
        except UnicodeDecodeError:
            return await self._refuse(send, 400, "the body is not UTF-8 text")
        except ValueError as err:
            return await self._refuse(send, 400, f"the body is not JSON ({str(err)[:120]})")
        # JSON whatever the Content-Type says: `curl -d '{...}'` sends form-urlencoded
        scope = dict(scope, headers=[(k, v) for k, v in scope.get("headers") or [] if k.lower() != b"content-type"]
                     + [(b"content-type", b"application/json")])
        sent = False

        async def replay() -> Any:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send: Callable, status: int, message: str) -> None:
        self.on_refused(status)
        payload = json.dumps({"error": message}).encode("utf-8")
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def timed_h11(header_timeout: float) -> Any:
    """uvicorn's h11 protocol, closing a connection whose first request headers have not arrived
    within `header_timeout` seconds (a client dripping its headers holds no connection for long)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._header_timer: Optional[asyncio.TimerHandle] = self.loop.call_later(header_timeout,
                                                                                     self._headers_late)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def connection_lost(self, exc: Optional[Exception]) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

    return TimedH11
