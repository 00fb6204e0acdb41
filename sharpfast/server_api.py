"""What the HTTP server accepts, declared once: the limits, the request and response models (the
OpenAPI schema says what /generate takes), the ASGI middleware that refuses what must not reach
the JSON parser (oversized or deeply nested bodies, a missing API key), and the uvicorn protocol
that drops connections whose request headers do not arrive in time (slow clients).

Only the server imports this module; it needs the 'serve' extra (fastapi, pydantic, uvicorn).
"""
from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_PROMPTS_PER_REQUEST = 64
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (each refused with a 4xx naming the limit).

    Attributes:
        max_body_bytes: the request body (413 beyond).
        max_depth: JSON nesting of the body (400 beyond; parsers recurse).
        max_prompt_chars: characters per prompt (a CLIP prompt is 77 tokens, some 300 characters).
        max_prompts: prompts per request.
        max_images: images per request (prompts x num_images_per_prompt): the batch cap applies to
            one request too.
        max_side: height and width in pixels.
        max_pixels: height x width x images of one request.
        header_timeout: seconds a connection may take to send its request headers.
        max_steps: num_inference_steps at most.
        api_key: the key /generate and /metrics require as `Authorization: Bearer <key>`, or None.
    """

    max_body_bytes: int = 1 << 20
    max_depth: int = 16
    max_prompt_chars: int = 2000
    max_prompts: int = MAX_PROMPTS_PER_REQUEST
    max_images: int = 8
    max_side: int = 2048
    max_pixels: int = 8 << 20
    header_timeout: float = 10.0
    api_key: Optional[str] = None
    max_steps: int = MAX_STEPS

    @classmethod
    def for_model(cls, default_size: tuple, max_batch_size: int, scheduler=None, **kw) -> Limits:
        """Limits scaled to a model: sides up to 4x its own (at most 2048), a request's pixels up
        to max_batch_size images of twice its side, steps up to what its scheduler can take."""
        h, w = default_size
        side = min(2048, 4 * max(h, w))
        kw = {k: v for k, v in kw.items() if v is not None}
        if "max_steps" not in kw:
            kw["max_steps"] = MAX_STEPS if scheduler is None else scheduler_step_limit(scheduler)
        return cls(max_images=max_batch_size, max_side=side, max_pixels=max_batch_size * 4 * h * w, **kw)


def _steps_fit(scheduler, n: int) -> bool:
    """Whether a fresh copy of the scheduler lays out n steps inside its training timesteps."""
    try:
        s = type(scheduler).from_config(scheduler.config)
        s.set_timesteps(n)
        t = s.timesteps
        top = getattr(s.config, "num_train_timesteps", None)
        return len(t) > 0 and (top is None or float(t.max()) < top) and float(t.min()) >= 0
    except Exception:  # noqa: BLE001 (a scheduler that cannot lay out n steps has no n-step schedule)
        return False


def scheduler_step_limit(scheduler, cap: int = MAX_STEPS) -> int:
    """The most sampling steps (at most `cap`) a scheduler lays out without an out-of-range
    timestep: DDIM with steps_offset=1 and 1000 training steps takes 999, not 1000 (at 1000 its
    last timestep is 1000, an index error inside the pipeline). A scheduler whose layout cannot be
    probed without the pipeline's arguments (e.g. a dynamically shifted flow schedule) keeps `cap`.
    """
    if _steps_fit(scheduler, cap) or not _steps_fit(scheduler, 1):
        return cap
    lo, hi = 1, cap  # lo fits, hi does not: bounded bisection (log2(cap) probes)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _steps_fit(scheduler, mid) else (lo, mid)
    return lo


class GenerateRequest(BaseModel):
    """The body of POST /generate (limits beyond these: see the server's 400 answers)."""

    model_config = ConfigDict(extra="forbid")
    prompt: Union[str, list[str]] = Field(description="a prompt or up to 64 prompts (each at most the server's "
                                                      "max_prompt_chars)")
    num_inference_steps: Optional[int] = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: Optional[float] = Field(None, ge=-MAX_GUIDANCE, le=MAX_GUIDANCE)
    seed: Optional[int] = Field(None, ge=0, lt=2 ** 62)
    num_images_per_prompt: Optional[int] = Field(None, ge=1, le=MAX_PROMPTS_PER_REQUEST)
    height: Optional[int] = Field(None, ge=8, le=4096, multiple_of=8)
    width: Optional[int] = Field(None, ge=8, le=4096, multiple_of=8)
    request_id: Optional[str] = Field(None, max_length=200)


class Image(BaseModel):
    """One generated image of an answer."""

    prompt: str = Field(description="the image's prompt (cut to 200 characters in the answer)")
    png_base64: str
    warnings: list[str] = Field(default_factory=list, description="e.g. the tokenizer's truncation")


class GenerateResponse(BaseModel):
    """The answer of POST /generate."""

    request_id: Optional[str]
    seed: int
    images: list[Image]
    memorization: Optional[list[dict]] = Field(description="per prompt: score, threshold, its source, flagged, "
                                                           "mitigated, the mitigation and its check")
    batch_images: int = Field(description="images in the pipeline call that served this request")
    batch_requests: int = Field(description="requests in that call")
    seconds: float
    replica: Optional[str] = Field(None, description="the replica that answered (Ray Serve deployments)")


class ErrorResponse(BaseModel):
    """Every refusal and failure: one message naming the problem."""

    error: str
    request_id: Optional[str] = None


ERRORS: dict[Union[int, str], dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "a request the server refuses, the message names why"},
          401: {"model": ErrorResponse, "description": "no or a wrong API key"},
          413: {"model": ErrorResponse, "description": "the body is larger than the server takes"},
          503: {"model": ErrorResponse, "description": "the server is shutting down: retry elsewhere"},
          500: {"model": ErrorResponse, "description": "the model failed (the server lives on)"}}


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
    """ASGI middleware in front of the app: the API key (for every path but /health and the
    docs), then for POST bodies the size (Content-Length and the bytes actually sent) and the
    nesting depth, before any JSON parser sees them."""

    OPEN = ("/health", "/docs", "/openapi.json", "/redoc")

    def __init__(self, app, limits: Limits, on_refused=None):
        self.app, self.limits, self.on_refused = app, limits, on_refused or (lambda status: None)

    async def __call__(self, scope, receive, send):
        """The ASGI entry: refuse, or pass the (replayed) request on."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.limits.api_key is not None and scope.get("path") not in self.OPEN:
            given = headers.get(b"authorization", b"").decode("latin-1")
            want = f"Bearer {self.limits.api_key}"
            if not hmac.compare_digest(given.encode("utf-8"), want.encode("utf-8")):
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
        while True:
            msg = await receive()
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
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send, status: int, message: str):
        self.on_refused(status)
        payload = json.dumps({"error": message}).encode("utf-8")
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def timed_h11(header_timeout: float):
    """uvicorn's h11 protocol, closing a connection whose first request headers have not arrived
    within `header_timeout` seconds (a client dripping its headers holds no connection for long)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def handle_events(self):
            super().handle_events()
            if self.cycle is not None and self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def connection_lost(self, exc):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _headers_late(self):
            self._header_timer = None
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

    return TimedH11
