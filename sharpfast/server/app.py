"""The uvicorn transport: the API (sharpfast.server.router) over a Service, with a batcher in
front of the pipeline (`sharpfast serve`).

    app = sharpfast.server.create_app(pipe)           # a FastAPI app; uvicorn.run(app, ...)

Endpoints (the OpenAPI schema at /openapi.json declares them: sharpfast.server.protocol)
  POST /generate  {"prompt": str | [str], "num_inference_steps", "guidance_scale", "seed",
                   "num_images_per_prompt", "height", "width", "request_id"}
                  -> {"request_id", "seed", "images": [{"prompt", "png_base64", "warnings"}],
                      "memorization": [...], "batch_images", "batch_requests", "seconds"}
  GET  /health    -> {"status": "ok" | "draining", "queued", "in_flight", "serves", ...} (no key needed)
  GET  /metrics   -> Prometheus text: the guard's series (sharpfast.monitoring) and the server's own
                     (HTTP requests by status, batch requests and images, queue wait)

Request batching: one worker takes the queued requests with the same generation settings, up to
max_batch_size images, waiting at most max_wait_ms for a batch to fill, and makes ONE guarded
call for all of them in a worker thread (the pipeline runs one call at a time anyway, see
sharpfast.guarding). Every image has its own generator, seeded seed + k for the k-th image of a
request, so a request's images do not depend on what it was batched with (up to the float
rounding of a larger batch). A batch that raises is retried request by request, so a bad request
fails alone (400 for a sharpfast error naming the problem, 500 otherwise).

What no request can do (sharpfast.server.protocol.Limits): send a body over max_body_bytes (413) or
nested deeper than max_depth (400); ask for more prompts, characters, images, pixels or a larger
side than the limits (400 / 422); make the server calibrate: the guard's thresholds are resolved
at start for the default settings and those given (`calibrate_for`), and a request at another
setting gets 400 naming what the server serves. A client that disconnects has its request dropped
from the queue, or its batch stopped at the next sampling step when it was alone in it.

Graceful shutdown: on SIGTERM / SIGINT uvicorn stops accepting connections and waits up to its
graceful timeout for the requests in flight; then the worker drops what is queued and stops the
pipeline call in flight at its next step, so the process ends whatever was asked of it.
"""
# (no `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time)
import logging
from collections.abc import Callable
from typing import Any, Optional

from .. import validate
from ..errors import BadArgument, MissingDependency
from .batching import Batcher
from .service import Service

log = logging.getLogger("sharpfast.server")


def require() -> None:
    """MissingDependency unless the 'serve' extra is installed."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import pydantic  # noqa: F401
    except ImportError as e:
        raise MissingDependency(f"the server needs the 'serve' extra: pip install 'sharpfast[serve]' ({e})") from e


class UvicornTransport:
    """Requests reach the pipeline through the batcher; /health shows the queue."""

    def __init__(self, service: Service, max_batch_size: int, max_wait_ms: float) -> None:
        self.service = service
        self.batcher = Batcher(self.run, max_batch_size, max_wait_ms, service.metrics.observe)
        self.status = "starting"

    def run(self, bodies: list, should_stop: Optional[Callable[[], bool]] = None) -> list:
        """One pipeline call for a batch (in the batcher's worker thread): the service's runner."""
        return self.service.runner(bodies, should_stop)

    async def submit(self, body: dict, request: Any) -> dict:
        """Queue the body for a batch; its answer (withdrawn when the client disconnects)."""
        return await self.batcher.submit(body, request.is_disconnected)

    def health(self) -> dict:
        """The server's state and queue."""
        return {"status": self.status, "queued": len(self.batcher.pending), "in_flight": self.batcher.in_flight}

    async def metrics_text(self) -> str:
        """This process's series."""
        return self.service.metrics.text()

    def lifespan(self) -> Any:
        """Start the batcher with the app; on shutdown (after uvicorn's graceful wait for the requests
        in flight) drop what is queued, stop the call in flight, give the pipeline back as it was."""
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def lifespan(app: Any) -> Any:
            self.batcher.start()
            self.status = "ok"
            try:
                yield
            finally:
                self.status = "draining"
                log.info("sharpfast server: after the graceful wait: %d request(s) still queued, %d in the pipeline "
                         "call: stopping them", len(self.batcher.pending), self.batcher.in_flight)
                await self.batcher.stop(abort=True)
                if self.service.guard is not None:
                    self.service.guard.remove()  # the pipeline as it was
                log.info("sharpfast server: stopped gracefully after answering %d requests", self.batcher.answered)

        return lifespan


def create_app(pipe: Any, *, guarded: bool = True, metric: Optional[str] = None, threshold: Any = "auto",
               sail_kwargs: Optional[dict] = None, mitigation: Any = "auto", max_batch_size: int = 8,
               max_wait_ms: float = 10.0, defaults: Optional[dict] = None, name: str = "default",
               calibrate_for: Optional[list] = None, limits: Any = None) -> Any:
    """A FastAPI app serving `pipe` (guarded by sharpfast.guard unless guarded=False).

    Args:
        pipe: a supported diffusers pipeline (its guard is removed when the app stops).
        guarded: False serves the plain pipeline.
        metric: the guard's metric (default: the guard's).
        threshold: "auto" or a number.
        sail_kwargs: SAIL's extra keywords for the guard.
        mitigation: the guard's mitigation ("auto", a registry name, or None).
        max_batch_size: images per pipeline call (and per request) at most.
        max_wait_ms: how long a batch waits to fill.
        defaults: request defaults over the pipeline's own.
        name: the guard's monitoring label.
        calibrate_for: extra settings to serve besides the defaults, each a dict of some of
            num_inference_steps, guidance_scale, height, width.
        limits: a sharpfast.server.protocol.Limits (default: Limits.for_model, scaled to the
            model's own size and max_batch_size).

    Returns:
        The app (`uvicorn.run(app)`); app.state.service, app.state.batcher.

    Raises:
        MissingDependency: the 'serve' extra is missing.
        BadArgument: a bad batch size, wait or setting.
    """
    require()
    from .router import build_app

    max_batch_size = validate.integer(max_batch_size, "max_batch_size")
    max_wait_ms = validate.finite(max_wait_ms, "max_wait_ms")
    if max_wait_ms < 0:
        raise BadArgument(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
    service = Service(pipe, guarded=guarded, metric=metric, threshold=threshold, mitigation=mitigation,
                      sail_kwargs=sail_kwargs, name=name, calibrate_for=calibrate_for, defaults=defaults,
                      limits=limits, max_batch_size=max_batch_size)
    transport = UvicornTransport(service, max_batch_size, max_wait_ms)
    app = build_app(service, transport, lifespan=transport.lifespan())
    app.state.guard, app.state.batcher, app.state.limits = service.guard, transport.batcher, service.limits
    app.state.threshold = service.threshold
    return app
