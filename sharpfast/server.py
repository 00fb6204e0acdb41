"""An HTTP server for a guarded pipeline, on FastAPI + uvicorn (`sharpfast serve`).

    app = sharpfast.server.create_app(pipe)           # a FastAPI app; uvicorn.run(app, ...)

Endpoints
  POST /generate  {"prompt": str | [str], "num_inference_steps", "guidance_scale", "seed",
                   "num_images_per_prompt", "height", "width", "request_id"}
                  -> {"request_id", "seed", "images": [{"prompt", "png_base64"}], "memorization": [...],
                      "batch_images", "batch_requests", "seconds"}
  GET  /health    -> {"status": "ok" | "draining", "queued", "in_flight", ...}
  GET  /metrics   -> Prometheus text: the guard's series (sharpfast.monitoring) and the server's own
                     (HTTP requests by status, batch sizes, queue wait)

Request batching: one worker takes the queued requests with the same generation settings, up to
max_batch_size prompts, waiting at most max_wait_ms for a batch to fill, and makes ONE guarded
call for all of them in a worker thread (the pipeline runs one call at a time anyway, see
sharpfast.serving). Every image has its own generator, seeded seed + k for the k-th image of a
request, so a request's images do not depend on what it was batched with (up to the float
rounding of a larger batch). A batch that raises is retried request by request, so a bad request
fails alone (400 for a sharpfast error naming the problem, 500 otherwise).

Graceful shutdown: on SIGTERM / SIGINT uvicorn stops accepting connections and waits for the
requests in flight; the worker keeps serving the queue until they are answered, then stops.
"""
# (no `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time)
import asyncio
import base64
import io
import logging
import secrets
import time

import torch

from .errors import BadArgument, MissingDependency, SharpfastError, UsageError

log = logging.getLogger("sharpfast.server")

MAX_PROMPTS_PER_REQUEST = 64
MAX_STEPS = 1000
MAX_SIDE = 2048  # pixels: a request may not ask the server for more memory than a 2048^2 image


def _require():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as e:
        raise MissingDependency(f"the server needs the 'serve' extra: pip install 'sharpfast[serve]' ({e})") from e


def _png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class _Job:
    __slots__ = ("body", "future", "queued_at")

    def __init__(self, body, future):
        self.body, self.future, self.queued_at = body, future, time.perf_counter()

    @property
    def key(self):  # requests that may share one pipeline call
        b = self.body
        return (b["num_inference_steps"], b["guidance_scale"], b["num_images_per_prompt"], b["height"], b["width"])

    @property
    def size(self):
        return len(self.body["prompts"]) * self.body["num_images_per_prompt"]


class Batcher:
    """The queue and the one worker that turns queued requests into guarded pipeline calls."""

    def __init__(self, run_batch, max_batch_size: int, max_wait_ms: float, observe=None):
        self.run_batch, self.max_batch_size, self.max_wait = run_batch, max_batch_size, max_wait_ms / 1000.0
        self.observe = observe or (lambda **kw: None)
        self.pending: list[_Job] = []
        self.in_flight = 0
        self._wake = asyncio.Event()
        self._task = None
        self._closing = False
        self.answered = 0

    def start(self):
        """Start the batching worker on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def submit(self, body) -> dict:
        """Queue one request body; its response once its batch has run."""
        if self._closing:
            raise UsageError("the server is shutting down")
        job = _Job(body, asyncio.get_running_loop().create_future())
        self.pending.append(job)
        self._wake.set()
        return await job.future

    async def stop(self):
        """Answer everything queued, then stop the worker."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    def _take(self) -> list[_Job]:
        first = self.pending[0]
        batch: list = []
        size = 0
        rest: list = []
        for job in self.pending:
            if job.key == first.key and (not batch or size + job.size <= self.max_batch_size):
                batch.append(job)
                size += job.size
            else:
                rest.append(job)
        self.pending = rest
        return batch

    async def _worker(self):
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # let a batch fill: until max_batch_size images of one setting are queued, or max_wait
            deadline = loop.time() + self.max_wait
            while not self._closing and loop.time() < deadline:
                first = self.pending[0]
                if sum(j.size for j in self.pending if j.key == first.key) >= self.max_batch_size:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            self.in_flight += len(batch)
            now = time.perf_counter()
            self.observe(requests=len(batch), images=sum(j.size for j in batch),
                         waits=[now - j.queued_at for j in batch])
            try:
                results = await asyncio.to_thread(self._run_safely, batch)
            finally:
                self.in_flight -= len(batch)
            self.answered += len(batch)
            for job, res in zip(batch, results):
                if not job.future.done():
                    (job.future.set_exception if isinstance(res, BaseException) else job.future.set_result)(res)

    def _run_safely(self, batch):
        try:
            return self.run_batch([j.body for j in batch])
        except Exception as err:  # noqa: BLE001 (a failed batch is retried request by request)
            if len(batch) == 1:
                return [err]
            out = []
            for job in batch:
                try:
                    out.extend(self.run_batch([job.body]))
                except Exception as e:  # noqa: BLE001
                    out.append(e)
            return out


def parse_request(body: dict, defaults: dict, needs_cfg: bool = True) -> dict:
    """A /generate body checked and completed with the server's defaults (BadArgument names the field)."""
    from . import validate

    if not isinstance(body, dict):
        raise BadArgument("the request body must be a JSON object")
    unknown = set(body) - {"prompt", "num_inference_steps", "guidance_scale", "seed", "num_images_per_prompt",
                           "height", "width", "request_id"}
    if unknown:
        raise BadArgument(f"unknown field(s) {sorted(unknown)}")
    if "prompt" not in body:
        raise BadArgument("the request needs a 'prompt' (a string or a list of strings)")
    prompts = validate.prompts(body["prompt"], "prompt")
    if len(prompts) > MAX_PROMPTS_PER_REQUEST:
        raise BadArgument(f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {len(prompts)}")
    get = lambda k: body[k] if body.get(k) is not None else defaults[k]  # noqa: E731
    steps = validate.integer(get("num_inference_steps"), "num_inference_steps")
    if steps > MAX_STEPS:
        raise BadArgument(f"num_inference_steps must be at most {MAX_STEPS}, got {steps}")
    n = validate.integer(get("num_images_per_prompt"), "num_images_per_prompt")
    if n > MAX_PROMPTS_PER_REQUEST:
        raise BadArgument(f"num_images_per_prompt must be at most {MAX_PROMPTS_PER_REQUEST}, got {n}")
    guidance = validate.guidance_scale(get("guidance_scale"), needs_cfg=needs_cfg)
    size: dict = {}
    for k in ("height", "width"):
        v = body.get(k)
        size[k] = None if v is None else validate.integer(v, k)
        if size[k] is not None and (size[k] % 8 or size[k] > MAX_SIDE):
            raise BadArgument(f"{k} must be a multiple of 8 and at most {MAX_SIDE}, got {size[k]}")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(31)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 62:
        raise BadArgument(f"seed must be an integer in [0, 2**62), got {seed!r}")
    rid = body.get("request_id")
    if rid is not None and (not isinstance(rid, str) or len(rid) > 200):
        raise BadArgument("request_id must be a string of at most 200 characters")
    return {"prompts": prompts, "num_inference_steps": steps, "guidance_scale": guidance, "seed": seed,
            "num_images_per_prompt": n, "request_id": rid, **size}


class Runner:
    """One pipeline call for a batch of parsed requests (guarded or plain), split back per request."""

    def __init__(self, pipe, guard=None):
        from .serving import pipeline_lock

        self.pipe, self.guard = pipe, guard
        self._lock = pipeline_lock(pipe)  # the guard's own lock too: one pipeline call at a time

    def __call__(self, bodies: list[dict]) -> list[dict]:
        """Generate a batch of compatible request bodies in one pipeline call."""
        b0 = bodies[0]
        n = b0["num_images_per_prompt"]
        prompts, gens = [], []
        for b in bodies:
            for i, p in enumerate(b["prompts"]):
                prompts.append(p)
                gens += [torch.Generator("cpu").manual_seed(b["seed"] + i * n + j) for j in range(n)]
        kw = dict(num_inference_steps=b0["num_inference_steps"], guidance_scale=b0["guidance_scale"],
                  num_images_per_prompt=n, generator=gens, output_type="pil")
        kw.update({k: b0[k] for k in ("height", "width") if b0[k] is not None})
        start = time.perf_counter()
        if self.guard is not None:
            out = self.guard(prompts, **kw)
            report = out.memorization
        else:
            with self._lock:
                out = self.pipe(prompts, **kw)
            report = None
        seconds = time.perf_counter() - start
        results, row = [], 0
        for b in bodies:
            k = len(b["prompts"])
            images = out.images[row * n:(row + k) * n]
            results.append({
                "request_id": b["request_id"], "seed": b["seed"],
                "images": [{"prompt": b["prompts"][i // n], "png_base64": _png(im)} for i, im in enumerate(images)],
                "memorization": None if report is None else report[row:row + k],
                "batch_images": len(prompts) * n, "batch_requests": len(bodies), "seconds": seconds})
            row += k
        return results


class _ServerMetrics:
    """The server's own Prometheus series (beside the guard's): HTTP status, batch sizes, queue wait."""

    def __init__(self, guard):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        from .monitoring import LATENCY_BUCKETS

        self.registry = CollectorRegistry()
        if guard is not None:
            guard.register_prometheus(self.registry)
        self.http = Counter("sharpfast_http_requests", "HTTP requests to /generate by status", ["status"],
                            registry=self.registry)
        self.batch = Histogram("sharpfast_batch_requests", "HTTP requests per pipeline call", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64))
        self.images = Histogram("sharpfast_batch_images", "images per pipeline call", registry=self.registry,
                                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.wait = Histogram("sharpfast_queue_wait_seconds", "time a request waited for its batch",
                              registry=self.registry, buckets=LATENCY_BUCKETS)

    def observe(self, requests, images, waits):
        self.batch.observe(requests)
        self.images.observe(images)
        for w in waits:
            self.wait.observe(w)

    def text(self):
        from fastapi.responses import PlainTextResponse
        from prometheus_client import generate_latest
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        return PlainTextResponse(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def _lifespan(batcher, guard, state):
    """Start the batcher with the app; on shutdown drain it and give the pipeline back as it was."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        state["status"] = "ok"
        try:
            yield
        finally:
            state["status"] = "draining"
            log.info("sharpfast server: shutting down, %d requests queued, %d in flight",
                     len(batcher.pending), batcher.in_flight)
            await batcher.stop()
            if guard is not None:
                guard.remove()  # the pipeline as it was
            log.info("sharpfast server: stopped gracefully after answering %d requests", batcher.answered)

    return lifespan


def _generate_handler(batcher, metrics, defaults, needs_cfg):
    """POST /generate: parse (400 naming the problem), queue for a batch, answer (500 only for a bug)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    def fail(status, message, rid=None):
        metrics.http.labels(str(status)).inc()
        return JSONResponse({"error": message, **({} if rid is None else {"request_id": rid})}, status_code=status)

    async def generate(request: Request):
        try:
            body = parse_request(await request.json(), defaults, needs_cfg)
        except SharpfastError as err:
            return fail(400, str(err))
        except ValueError as err:  # not JSON
            return fail(400, f"the body is not JSON: {err}")
        try:
            result = await batcher.submit(body)
        except SharpfastError as err:
            return fail(400, str(err), body["request_id"])
        except Exception as err:  # noqa: BLE001 (a bug or the model's failure: reported, the server lives on)
            return fail(500, f"{type(err).__name__}: {err}", body["request_id"])
        metrics.http.labels("200").inc()
        return result

    return generate


def create_app(pipe, *, guarded: bool = True, metric: str | None = None, threshold="auto", sail_kwargs=None,
               mitigation="auto",
               max_batch_size: int = 8, max_wait_ms: float = 10.0, defaults: dict | None = None, name="default"):
    """A FastAPI app serving `pipe` (guarded by sharpfast.guard unless guarded=False)."""
    _require()
    from fastapi import FastAPI

    from . import validate
    from .score import ScoreModel, pipeline_defaults

    max_batch_size = validate.integer(max_batch_size, "max_batch_size")
    needs_cfg = not ScoreModel(pipe).distilled  # Flux's guidance is embedded: any finite scale
    max_wait_ms = validate.finite(max_wait_ms, "max_wait_ms")
    if max_wait_ms < 0:
        raise BadArgument(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
    defaults = {**pipeline_defaults(pipe), "num_images_per_prompt": 1, **(defaults or {})}
    g = None
    if guarded:
        from .serving import DEFAULT_METRIC, guard

        g = guard(pipe, metric=metric or DEFAULT_METRIC, threshold=threshold, mitigation=mitigation,
                  sail_kwargs=sail_kwargs, name=name)
    metrics = _ServerMetrics(g)
    batcher = Batcher(Runner(pipe, g), max_batch_size, max_wait_ms, metrics.observe)
    state = {"status": "starting"}
    app = FastAPI(title="sharpfast", description="text-to-image generation guarded against memorization",
                  lifespan=_lifespan(batcher, g, state))
    app.post("/generate")(_generate_handler(batcher, metrics, defaults, needs_cfg))

    @app.get("/health")
    async def health():
        return {"status": state["status"], "guarded": g is not None, "metric": metric if g else None,
                "threshold": g.threshold if g else None, "queued": len(batcher.pending),
                "in_flight": batcher.in_flight}

    @app.get("/metrics")
    async def metrics_text():
        return metrics.text()

    app.state.guard, app.state.batcher = g, batcher
    return app
