"""The guarded pipeline on Ray Serve: replicas behind one endpoint, replaced by Ray when they die.

    from ray import serve
    import sharpfast.server_ray
    serve.run(sharpfast.server_ray.ray_app("digits", num_replicas=2))   # or mount it in your own app
    # sharpfast serve --model digits --engine ray --replicas 2             # the same from the CLI

Ray Serve is the engine: its proxy routes requests to the replicas, `@serve.batch` gathers a
replica's requests (grouped here by generation settings, as the single-process server does, and
cut to max_batch_size images per pipeline call), its controller health-checks every replica
(`check_health`) and starts a new one for each that died. sharpfast writes no router or scheduler.

Each replica holds one pipeline wrapped by sharpfast.guard, with the same HTTP API, limits and
report as `sharpfast serve` (sharpfast.server, sharpfast.server_api): thresholds resolved when the
replica starts, for the defaults and `calibrate_for`; other settings refused with a 400.
GET /metrics on any replica answers for the whole deployment: every replica publishes its
Prometheus series to one named Ray actor after each batch, and the answer is all of them with a
`replica` label (a replaced replica's counters stay, so sums over replicas keep counting).
"""
# (no `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time)
import asyncio
import os
import time

from .errors import BadArgument, MissingDependency

BOARD = "sharpfast-metrics-board"


def _require():
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        raise MissingDependency(f"the Ray deployment needs the 'ray' extra: pip install 'sharpfast[ray]' ({e})") from e


def _board():
    """The named actor that holds every replica's latest Prometheus text (created on first use)."""
    import ray

    @ray.remote(num_cpus=0)
    class Board:
        def __init__(self):
            self.texts: dict = {}

        def put(self, replica: str, text: str) -> None:
            self.texts[replica] = text

        def all(self) -> dict:
            return dict(self.texts)

    return Board.options(name=BOARD, get_if_exists=True, lifetime="detached", namespace="sharpfast").remote()


def merge_metrics(texts: dict) -> str:
    """Prometheus text of several replicas as one exposition: each sample gains a `replica` label
    (HELP / TYPE written once per family)."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict = {}
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            f = families.setdefault(fam.name, (fam.type, fam.documentation, []))
            for s in fam.samples:
                f[2].append((s.name, {**s.labels, "replica": replica}, s.value))
    out = []
    for name, (kind, doc, samples) in families.items():
        head = f"{name}_total" if kind == "counter" else name  # (the text format names counters with _total)
        out += [f"# HELP {head} {doc}", f"# TYPE {head} {kind}"]
        for sname, labels, value in samples:
            lab = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            out.append(f"{sname}{{{lab}}} {value!r}")
    return "\n".join(out) + "\n"


def _escape(v) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _groups(bodies: list, max_images: int) -> list:
    """Indices of `bodies` grouped by generation settings, each group at most max_images images."""
    from .server import _Job

    groups: list = []
    open_: dict = {}
    for i, b in enumerate(bodies):
        job = _Job(b, None)
        g = open_.get(job.key)
        if g is None or g[1] + job.size > max_images:
            g = open_[job.key] = [[], 0]
            groups.append(g[0])
        g[0].append(i)
        g[1] += job.size
    return groups


def ray_app(model: str, *, device: str = "auto", dtype: str = "auto", num_replicas: int = 2, num_gpus: float = 0,
            num_cpus: float = 1, metric=None, threshold="auto", mitigation="auto", max_batch_size: int = 8,
            max_wait_ms: float = 10.0, defaults=None, calibrate_for=None, limits=None, guarded: bool = True,
            api_key=None):
    """A Ray Serve application of the guarded pipeline (`serve.run(ray_app(...))`).

    Args:
        model: 'digits' or a local diffusers model directory, loaded by every replica.
        device: each replica's torch device ('auto': its GPU when Ray gave it one).
        dtype: 'auto', 'fp32', 'fp16' or 'bf16'.
        num_replicas: replicas (one pipeline each).
        num_gpus: GPUs per replica (0 on CPU machines).
        num_cpus: CPUs Ray reserves per replica.
        metric: the guard's metric (default: the guard's).
        threshold: "auto" or a number.
        mitigation: the guard's mitigation ("auto", a registry name, or None).
        max_batch_size: images per pipeline call (and per request) at most.
        max_wait_ms: how long `@serve.batch` waits for a batch to fill.
        defaults: request defaults (num_inference_steps, guidance_scale, num_images_per_prompt).
        calibrate_for: further settings each replica serves (dicts, as for create_app).
        limits: a sharpfast.server_api.Limits (default: scaled to the model).
        guarded: False serves the plain pipeline.
        api_key: the key /generate and /metrics require (`Authorization: Bearer <key>`), or None.

    Returns:
        The bound Ray Serve application.

    Raises:
        MissingDependency: ray[serve] is not installed.
        BadArgument: a bad replica count or size.
    """
    _require()
    from . import validate

    num_replicas = validate.integer(num_replicas, "num_replicas")
    max_batch_size = validate.integer(max_batch_size, "max_batch_size")
    if num_gpus < 0 or num_cpus < 0:
        raise BadArgument("num_gpus and num_cpus must be >= 0")
    cfg = dict(model=model, device=device, dtype=dtype, metric=metric, threshold=threshold, mitigation=mitigation,
               max_batch_size=max_batch_size, defaults=dict(defaults or {}), calibrate_for=list(calibrate_for or []),
               limits=limits, guarded=guarded, api_key=api_key)
    return _deployment(cfg, num_replicas, num_gpus, num_cpus, max_batch_size, max_wait_ms).bind()


def _deployment(cfg, num_replicas, num_gpus, num_cpus, max_batch_size, max_wait_ms):
    from fastapi import FastAPI, Request
    from ray import serve

    from .server import _count_invalid
    from .server_api import ERRORS, BodyGuard, GenerateRequest, GenerateResponse, Limits

    api = FastAPI(title="sharpfast (Ray Serve)", description="text-to-image generation guarded against memorization")
    _count_invalid(api)
    api.add_middleware(BodyGuard, limits=cfg["limits"] or Limits(api_key=cfg.get("api_key")))

    @serve.deployment(num_replicas=num_replicas, ray_actor_options={"num_gpus": num_gpus, "num_cpus": num_cpus},
                      health_check_period_s=2, health_check_timeout_s=30, max_ongoing_requests=4 * max_batch_size,
                      graceful_shutdown_timeout_s=10)
    @serve.ingress(api)
    class SharpfastReplica:
        def __init__(self):
            self.replica = _Replica(cfg)

        def check_health(self):
            """Ray's health check: the pipeline is loaded and its guard is installed."""
            self.replica.check()

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=max_wait_ms / 1000.0)
        async def _batch(self, bodies: list) -> list:
            return await self.replica.run(bodies)

        @api.post("/generate", response_model=GenerateResponse, responses=ERRORS)
        async def generate(self, req: GenerateRequest, request: Request) -> GenerateResponse:
            return await self.replica.generate(req, self._batch)

        @api.get("/health")
        async def health(self) -> dict:
            return self.replica.health()

        @api.get("/metrics", responses={401: ERRORS[401]})
        async def metrics(self):
            return await self.replica.metrics()

    return SharpfastReplica


class _Replica:
    """What one replica does, apart from Ray's decorators (so it can be tested without Ray)."""

    def __init__(self, cfg: dict):
        from .adapters import ScoreModel, pipeline_defaults
        from .cli.common import device_dtype, load_model
        from .server import Runner, _guard, _ServerMetrics
        from .server_api import Limits

        device, dtype = device_dtype(cfg["device"], cfg["dtype"])
        self.pipe = load_model(cfg["model"], device, dtype)
        model = ScoreModel(self.pipe)
        h, w = model.default_size()
        self.defaults = {**pipeline_defaults(self.pipe), "num_images_per_prompt": 1, "height": h, "width": w,
                         **cfg["defaults"]}
        self.limits = cfg["limits"] or Limits.for_model((h, w), cfg["max_batch_size"], self.pipe.scheduler)
        self.needs_cfg = not model.distilled
        self.guard = _guard(self.pipe, cfg["guarded"], cfg["metric"], cfg["threshold"], cfg["mitigation"], None,
                            cfg["model"], cfg["calibrate_for"], self.defaults)
        self.threshold = None if self.guard is None else self.guard.calibrate(
            self.defaults["num_inference_steps"], self.defaults["guidance_scale"])
        self.series = _ServerMetrics(self.guard)
        self.runner = Runner(self.pipe, self.guard)
        self.max_images = cfg["max_batch_size"]
        self.name = f"{os.uname().nodename}:{os.getpid()}"
        self.started = time.time()
        self.board = _board()

    def check(self):
        from .errors import UsageError

        if self.guard is not None and not self.guard._handle:
            raise UsageError("the guard's hook is gone")

    async def run(self, bodies: list) -> list:
        """One `@serve.batch`: a pipeline call per settings group; each request its own answer or error."""
        out: list = [None] * len(bodies)
        for group in _groups(bodies, self.max_images):
            self.series.observe(requests=len(group), images=sum(len(bodies[i]["prompts"]) *
                                                                  bodies[i]["num_images_per_prompt"] for i in group),
                                 waits=[])
            try:
                res = await asyncio.to_thread(self.runner, [bodies[i] for i in group])
            except Exception as err:  # noqa: BLE001 (the request's own answer, not the replica's death)
                res = [err] * len(group)  # type: ignore[list-item]
            for i, r in zip(group, res):
                out[i] = r
        self.board.put.remote(self.name, self._text())
        return out

    async def generate(self, req, batch):
        from fastapi.responses import JSONResponse

        from .errors import SharpfastError
        from .server import _not_served, parse_request

        def fail(status, message, rid=None):
            self.series.http.labels(str(status)).inc()
            return JSONResponse({"error": message, **({} if rid is None else {"request_id": rid})}, status_code=status)

        try:
            body = parse_request(req.model_dump(exclude_none=True), self.defaults, self.needs_cfg, self.limits)
        except SharpfastError as err:
            return fail(400, str(err))
        why = _not_served(self.guard, body, self.defaults)
        if why:
            return fail(400, why, body["request_id"])
        result = await batch(body)
        if isinstance(result, SharpfastError):
            return fail(400, str(result), body["request_id"])
        if isinstance(result, BaseException):
            return fail(500, f"{type(result).__name__}: {result}", body["request_id"])
        self.series.http.labels("200").inc()
        return {**result, "replica": self.name}

    def health(self) -> dict:
        g = self.guard
        return {"status": "ok", "replica": self.name, "guarded": g is not None, "threshold": self.threshold,
                "serves": [list(k) for k in g.served_settings()] if g else None, "up_s": time.time() - self.started}

    def _text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.series.registry).decode("utf-8")

    async def metrics(self):
        import ray
        from fastapi.responses import PlainTextResponse
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        texts = await asyncio.to_thread(ray.get, self.board.all.remote())
        texts[self.name] = self._text()  # this replica's, current
        return PlainTextResponse(merge_metrics(texts), media_type=CONTENT_TYPE_LATEST)
