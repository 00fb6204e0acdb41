"""An HTTP server for a guarded pipeline, on FastAPI + uvicorn (`sharpfast serve`).

    app = sharpfast.server.create_app(pipe)           # a FastAPI app; uvicorn.run(app, ...)

Endpoints (the OpenAPI schema at /openapi.json declares them: sharpfast.server_api)
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

What no request can do (sharpfast.server_api.Limits): send a body over max_body_bytes (413) or
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
import asyncio
import base64
import io
import logging
import secrets
import threading
import time

import torch

from .errors import BadArgument, MissingDependency, NotCalibrated, SharpfastError, UsageError

log = logging.getLogger("sharpfast.server")


def _require():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import pydantic  # noqa: F401
    except ImportError as e:
        raise MissingDependency(f"the server needs the 'serve' extra: pip install 'sharpfast[serve]' ({e})") from e


def _png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class _Stopped(Exception):
    """Raised in a step callback: every request of the batch was withdrawn, or the server stops."""


class _Job:
    __slots__ = ("body", "future", "queued_at", "cancelled")

    def __init__(self, body, future):
        self.body, self.future, self.queued_at, self.cancelled = body, future, time.perf_counter(), False

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
        self.aborted = threading.Event()  # set: the call in flight stops at its next step
        self.answered = 0

    def start(self):
        """Start the batching worker on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def submit(self, body, disconnected=None) -> dict:
        """Queue one request body; its response once its batch has run. disconnected: an async
        callable polled while waiting; when it says True the request is withdrawn."""
        if self._closing:
            raise UsageError("the server is shutting down")
        job = _Job(body, asyncio.get_running_loop().create_future())
        self.pending.append(job)
        self._wake.set()
        if disconnected is None:
            return await job.future
        while True:
            done, _ = await asyncio.wait({job.future}, timeout=0.25)
            if done:
                return job.future.result()
            if await disconnected():
                job.cancelled = True
                if job in self.pending:
                    self.pending.remove(job)
                raise asyncio.CancelledError("the client disconnected")

    async def stop(self, abort: bool = False):
        """Stop the worker: answer everything queued first, or with abort=True drop the queue
        (503) and stop the call in flight at its next step."""
        self._closing = True
        if abort:
            self.aborted.set()
            for job in self.pending:
                if not job.future.done():
                    job.future.set_exception(UsageError("the server is shutting down"))
            self.pending = []
        self._wake.set()
        if self._task is not None:
            await self._task

    def _take(self) -> list[_Job]:
        self.pending = [j for j in self.pending if not j.cancelled]
        if not self.pending:
            return []
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

    async def _fill(self, loop):
        """Let a batch fill: until max_batch_size images of one setting are queued, or max_wait."""
        deadline = loop.time() + self.max_wait
        while not self._closing and loop.time() < deadline and self.pending:
            first = self.pending[0]
            if sum(j.size for j in self.pending if j.key == first.key) >= self.max_batch_size:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                break

    async def _worker(self):
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._fill(loop)
            batch = self._take()
            if not batch:
                continue
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

    def _should_stop(self, batch) -> bool:
        return self.aborted.is_set() or all(j.cancelled for j in batch)

    def _run_safely(self, batch):
        stop = lambda: self._should_stop(batch)  # noqa: E731
        try:
            return self.run_batch([j.body for j in batch], stop)
        except Exception as err:  # noqa: BLE001 (a failed batch is retried request by request)
            if len(batch) == 1 or isinstance(err, _Stopped):
                return [err] * len(batch)
            out = []
            for job in batch:
                try:
                    out.extend(self.run_batch([job.body], lambda job=job: self._should_stop([job])))
                except Exception as e:  # noqa: BLE001
                    out.append(e)
            return out


def parse_request(body: dict, defaults: dict, needs_cfg: bool = True, limits=None) -> dict:
    """A /generate body checked and completed with the server's defaults (BadArgument names the
    field and the limit; sharpfast.server_api.Limits)."""
    from . import validate
    from .server_api import MAX_GUIDANCE, MAX_STEPS, Limits

    lim = limits or Limits()
    if not isinstance(body, dict):
        raise BadArgument("the request body must be a JSON object")
    unknown = set(body) - {"prompt", "num_inference_steps", "guidance_scale", "seed", "num_images_per_prompt",
                           "height", "width", "request_id"}
    if unknown:
        raise BadArgument(f"unknown field(s) {sorted(unknown)}")
    if "prompt" not in body:
        raise BadArgument("the request needs a 'prompt' (a string or a list of strings)")
    prompts = validate.prompts(body["prompt"], "prompt")
    if len(prompts) > lim.max_prompts:
        raise BadArgument(f"at most {lim.max_prompts} prompts per request, got {len(prompts)}")
    long = [i for i, p in enumerate(prompts) if len(p) > lim.max_prompt_chars]
    if long:
        raise BadArgument(f"prompt[{long[0]}] has {len(prompts[long[0]])} characters; at most "
                          f"{lim.max_prompt_chars}")
    get = lambda k: body[k] if body.get(k) is not None else defaults[k]  # noqa: E731
    steps = validate.integer(get("num_inference_steps"), "num_inference_steps")
    if steps > min(MAX_STEPS, lim.max_steps):
        raise BadArgument(f"num_inference_steps must be at most {min(MAX_STEPS, lim.max_steps)}, got {steps}")
    n = validate.integer(get("num_images_per_prompt"), "num_images_per_prompt")
    if len(prompts) * n > lim.max_images:
        raise BadArgument(f"{len(prompts)} prompts x {n} images = {len(prompts) * n} images; this server makes at "
                          f"most {lim.max_images} per request")
    guidance = validate.guidance_scale(get("guidance_scale"), needs_cfg=needs_cfg)
    if abs(guidance) > MAX_GUIDANCE:
        raise BadArgument(f"guidance_scale must be within +-{MAX_GUIDANCE:g}, got {guidance:g}")
    size = _size(body, defaults, lim, len(prompts) * n)
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


def _size(body, defaults, lim, images) -> dict:
    from . import validate

    size: dict = {}
    for k in ("height", "width"):
        v = body.get(k)
        size[k] = None if v is None else validate.integer(v, k)
        if size[k] is not None and (size[k] % 8 or size[k] > lim.max_side):
            raise BadArgument(f"{k} must be a multiple of 8 and at most {lim.max_side}, got {size[k]}")
    h, w = size["height"] or defaults.get("height") or 0, size["width"] or defaults.get("width") or 0
    if h * w * images > lim.max_pixels:
        raise BadArgument(f"{images} images of {h}x{w} are {h * w * images} pixels; this server makes at most "
                          f"{lim.max_pixels} per request")
    return size


class Runner:
    """One pipeline call for a batch of parsed requests (guarded or plain), split back per request."""

    def __init__(self, pipe, guard=None):
        from .adapters import ScoreModel
        from .guarding import pipeline_lock

        self.pipe, self.guard = pipe, guard
        self._lock = pipeline_lock(pipe)  # the guard's own lock too: one pipeline call at a time
        self._model = ScoreModel(pipe)

    def __call__(self, bodies: list[dict], should_stop=None) -> list[dict]:
        """Generate a batch of compatible request bodies in one pipeline call; should_stop() is
        asked at every sampling step (True: the call stops with _Stopped)."""
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
        if should_stop is not None:
            def check(pipe, i, t, cb_kwargs):
                if should_stop():
                    raise _Stopped("the request was withdrawn (client gone) or the server is stopping")
                return {}
            kw["callback_on_step_end"] = check
        start = time.perf_counter()
        if self.guard is not None:
            out = self.guard(prompts, **kw)
            report = out.memorization
        else:
            with self._lock:
                out = self.pipe(prompts, **kw)
            report = None
        return self._split(bodies, out, report, len(prompts) * n, time.perf_counter() - start)

    def _split(self, bodies, out, report, images, seconds) -> list[dict]:
        n = bodies[0]["num_images_per_prompt"]
        results, row = [], 0
        for b in bodies:
            k = len(b["prompts"])
            warn = [self._model._truncation(p) for p in b["prompts"]]
            results.append({
                "request_id": b["request_id"], "seed": b["seed"],
                "images": [{"prompt": b["prompts"][i // n][:200], "png_base64": _png(im), "warnings": warn[i // n]}
                           for i, im in enumerate(out.images[row * n:(row + k) * n])],
                "memorization": None if report is None else [{**r, "prompt": r["prompt"][:200]}
                                                            for r in report[row:row + k]],
                "batch_images": images, "batch_requests": len(bodies), "seconds": seconds})
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
    """Start the batcher with the app; on shutdown (after uvicorn's graceful wait for the requests
    in flight) drop what is queued, stop the call in flight, give the pipeline back as it was."""
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
            await batcher.stop(abort=True)
            if guard is not None:
                guard.remove()  # the pipeline as it was
            log.info("sharpfast server: stopped gracefully after answering %d requests", batcher.answered)

    return lifespan


def _not_served(guard, body, defaults):
    """Why the guard cannot serve this request's setting (None: it can); no calibration is made."""
    if guard is None or guard.config.threshold != "auto":
        return None
    key = (body["num_inference_steps"], float(body["guidance_scale"]), body["height"] or defaults["height"],
           body["width"] or defaults["width"])
    served = guard.served_settings()
    if key in served:
        return None
    show = lambda k: f"{k[0]} steps, guidance {k[1]:g}, {k[2]}x{k[3]}"  # noqa: E731
    return (f"this server has no calibrated threshold at {show(key)}; it serves {'; '.join(map(show, served))} "
            f"(start it with --calibrate-for to serve more)")


def _generate_handler(batcher, metrics, defaults, needs_cfg, limits, guard):
    """POST /generate: parse (400 naming the problem), queue for a batch, answer (500 only for a bug)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    from .server_api import GenerateRequest, GenerateResponse

    def fail(status, message, rid=None):
        metrics.http.labels(str(status)).inc()
        return JSONResponse({"error": message, **({} if rid is None else {"request_id": rid})}, status_code=status)

    async def generate(req: GenerateRequest, request: Request) -> GenerateResponse:
        try:
            body = parse_request(req.model_dump(exclude_none=True), defaults, needs_cfg, limits)
        except SharpfastError as err:
            return fail(400, str(err))
        why = _not_served(guard, body, defaults)
        if why:
            return fail(400, why, body["request_id"])
        try:
            result = await batcher.submit(body, request.is_disconnected)
        except (NotCalibrated, BadArgument) as err:
            return fail(400, str(err), body["request_id"])
        except UsageError as err:  # shutting down: another replica can take it
            return fail(503, str(err), body["request_id"])
        except _Stopped as err:
            return fail(503, str(err), body["request_id"])
        except SharpfastError as err:
            return fail(400, str(err), body["request_id"])
        except Exception as err:  # noqa: BLE001 (a bug or the model's failure: reported, the server lives on)
            return fail(500, f"{type(err).__name__}: {err}", body["request_id"])
        metrics.http.labels("200").inc()
        return result

    return generate


def _guard(pipe, guarded, metric, threshold, mitigation, sail_kwargs, name, calibrate_for, defaults):
    """The server's guard, its thresholds resolved now for every setting it serves (the defaults and
    `calibrate_for`): no request waits for a calibration, and one at another setting is refused."""
    if not guarded:
        return None
    from .guarding import DEFAULT_METRIC, guard

    g = guard(pipe, metric=metric or DEFAULT_METRIC, threshold=threshold, mitigation=mitigation,
              sail_kwargs=sail_kwargs, name=name, calibrate_new=False)
    for s in [{}, *(calibrate_for or [])]:
        bad = set(s) - {"num_inference_steps", "guidance_scale", "height", "width"}
        if bad:
            raise BadArgument(f"calibrate_for takes num_inference_steps, guidance_scale, height, width; got {bad}")
        g.calibrate(s.get("num_inference_steps", defaults["num_inference_steps"]),
                    s.get("guidance_scale", defaults["guidance_scale"]), s.get("height"), s.get("width"))
    return g


def create_app(pipe, *, guarded: bool = True, metric: str | None = None, threshold="auto", sail_kwargs=None,
               mitigation="auto", max_batch_size: int = 8, max_wait_ms: float = 10.0, defaults: dict | None = None,
               name="default", calibrate_for=None, limits=None):
    """A FastAPI app serving `pipe` (guarded by sharpfast.guard unless guarded=False).

    calibrate_for: extra settings to serve besides the defaults, each a dict of some of
    num_inference_steps, guidance_scale, height, width; limits: a sharpfast.server_api.Limits
    (default: Limits.for_model, scaled to the model's own size and max_batch_size)."""
    _require()
    from fastapi import FastAPI

    from . import validate
    from .adapters import ScoreModel, pipeline_defaults
    from .server_api import ERRORS, BodyGuard, GenerateResponse, Limits

    max_batch_size = validate.integer(max_batch_size, "max_batch_size")
    model = ScoreModel(pipe)
    max_wait_ms = validate.finite(max_wait_ms, "max_wait_ms")
    if max_wait_ms < 0:
        raise BadArgument(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
    defaults = {**pipeline_defaults(pipe), "num_images_per_prompt": 1, **(defaults or {})}
    h, w = model.default_size()
    defaults.setdefault("height", h)
    defaults.setdefault("width", w)
    limits = limits or Limits.for_model((h, w), max_batch_size, pipe.scheduler)
    g = _guard(pipe, guarded, metric, threshold, mitigation, sail_kwargs, name, calibrate_for, defaults)
    thr = None if g is None else g.calibrate(defaults["num_inference_steps"], defaults["guidance_scale"])
    metrics = _ServerMetrics(g)
    batcher = Batcher(Runner(pipe, g), max_batch_size, max_wait_ms, metrics.observe)
    state = {"status": "starting"}
    app = FastAPI(title="sharpfast", description="text-to-image generation guarded against memorization",
                  lifespan=_lifespan(batcher, g, state))
    app.post("/generate", response_model=GenerateResponse, responses=ERRORS)(
        _generate_handler(batcher, metrics, defaults, not model.distilled, limits, g))  # Flux: any finite guidance

    @app.get("/health")
    async def health() -> dict:
        return {"status": state["status"], "guarded": g is not None, "metric": metric if g else None,
                "threshold": thr, "queued": len(batcher.pending),
                "in_flight": batcher.in_flight, "serves": [list(k) for k in g.served_settings()] if g else None}

    @app.get("/metrics", response_class=_plain_text(), responses={401: ERRORS[401]})
    async def metrics_text():
        return metrics.text()

    _count_invalid(app, metrics)
    app.add_middleware(BodyGuard, limits=limits, on_refused=lambda status: metrics.http.labels(str(status)).inc())
    app.state.guard, app.state.batcher, app.state.limits, app.state.threshold = g, batcher, limits, thr
    return app


def _count_invalid(app, metrics=None):
    """422 for a body that does not match the schema: FastAPI's detail without the inputs (never
    echo a large body), counted as the other statuses are."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        if metrics is not None:
            metrics.http.labels("422").inc()
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))[:300], "type": e.get("type")}
                  for e in exc.errors()[:20]]
        return JSONResponse({"error": "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail),
                             "detail": detail}, status_code=422)


def _plain_text():
    from fastapi.responses import PlainTextResponse

    return PlainTextResponse
