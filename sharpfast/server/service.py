"""The serving core, which knows nothing of HTTP transports: a request body parsed and checked
against the limits and the settings the guard serves, the pipeline call for a batch of requests
(guarded or plain) split back per request, the guard built with its thresholds resolved at
start, and the ONE mapping from an outcome (an answer or an exception) to a status and a body.
Both transports (sharpfast.server.app: uvicorn; sharpfast.server.ray_serve: Ray Serve) answer
through it, so the same failure gets the same status and body on either."""
import base64
import io
import logging
import os
import re
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any, Optional

import torch

from .. import validate
from ..adapters import ScoreModel, pipeline_defaults
from ..errors import BadArgument, NotCalibrated, SharpfastError, UsageError
from ..monitoring import ServerMetrics

log = logging.getLogger("sharpfast.server")


class Stopped(Exception):
    """Raised in a step callback: every request of the batch was withdrawn, or the server stops."""


def png_base64(image: Any) -> str:
    """A PIL image as base64 PNG text."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


_PATH = re.compile(r"(?:[A-Za-z]:)?[\\/][^\s()]*")


def public_source(source: str) -> str:
    """Where a threshold came from, as a client may read it: each file path cut to its file name
    (shipped calibration.json, a cache file, calibrated now), never the server's file system."""
    return _PATH.sub(lambda m: os.path.basename(m.group(0).rstrip("/\\")) or m.group(0), source)


def error_status(err: BaseException) -> int:
    """The one mapping from an exception to an HTTP status: 503 when another replica could take
    the request (the server is stopping, or the request was withdrawn), 422 for every other
    sharpfast error (a value of the request the server refuses, named: as the schema's own
    refusals), 500 for anything else (a bug or the model's failure; the server lives on). A body
    that is not JSON text at all is a 400 before it gets here (middleware.BodyGuard)."""
    if isinstance(err, (Stopped, UsageError)) and not isinstance(err, (NotCalibrated, BadArgument)):
        return 503
    if isinstance(err, SharpfastError):
        return 422
    return 500


def error_body(err: BaseException, request_id: Optional[str] = None) -> tuple[int, dict]:
    """(status, body) of a failed request; a 500's body names an incident id, its exception is
    logged under that id (a model's exception text does not reach the client)."""
    status = error_status(err)
    if status == 500:
        incident = uuid.uuid4().hex[:12]
        log.error("sharpfast server: incident %s: %s: %s", incident, type(err).__name__, err, exc_info=err)
        message = f"internal error (incident {incident}; the server's log has the details)"
    else:
        message = str(err)
    return status, {"error": message, **({} if request_id is None else {"request_id": request_id})}


def parse_request(body: dict, defaults: dict, needs_cfg: bool = True, limits: Any = None) -> dict:
    """A /generate body checked and completed with the server's defaults (BadArgument names the
    field and the limit; sharpfast.server.protocol.Limits)."""
    from .protocol import MAX_GUIDANCE, MAX_SEED, MAX_STEPS, Limits

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
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise BadArgument(f"seed must be an integer in [0, 2**53), got {seed!r}")
    rid = body.get("request_id")
    if rid is not None and (not isinstance(rid, str) or len(rid) > 200):
        raise BadArgument("request_id must be a string of at most 200 characters")
    return {"prompts": prompts, "num_inference_steps": steps, "guidance_scale": guidance, "seed": seed,
            "num_images_per_prompt": n, "request_id": rid, **size}


def _size(body: dict, defaults: dict, lim: Any, images: int) -> dict:
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

    def __init__(self, pipe: Any, model: ScoreModel, guard: Any = None) -> None:
        from ..guarding import pipeline_lock

        self.pipe, self.guard, self.model = pipe, guard, model
        self._lock = pipeline_lock(pipe)  # the guard's own lock too: one pipeline call at a time

    def __call__(self, bodies: list[dict], should_stop: Optional[Callable[[], bool]] = None) -> list[dict]:
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
            def check(pipe: Any, i: int, t: Any, cb_kwargs: dict) -> dict:
                if should_stop():
                    raise Stopped("the request was withdrawn (client gone) or the server is stopping")
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

    def _split(self, bodies: list, out, report: dict, images: Any, seconds) -> list[dict]:
        n = bodies[0]["num_images_per_prompt"]
        results, row = [], 0
        for b in bodies:
            k = len(b["prompts"])
            warn = [self.model.truncation(p) for p in b["prompts"]]
            results.append({
                "request_id": b["request_id"], "seed": b["seed"],
                "images": [{"prompt": b["prompts"][i // n][:200], "png_base64": png_base64(im),
                            "warnings": warn[i // n]} for i, im in enumerate(out.images[row * n:(row + k) * n])],
                "memorization": None if report is None else [
                    {**r, "prompt": r["prompt"][:200], "threshold_source": public_source(r["threshold_source"])}
                    for r in report[row:row + k]],
                "batch_images": images, "batch_requests": len(bodies), "seconds": seconds})
            row += k
        return results


def not_served(guard: Any, body: dict, defaults: dict) -> Optional[str]:
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


def build_guard(pipe: Any, guarded: bool, metric: Optional[str], threshold: Any, mitigation: Any,
                sail_kwargs: Optional[dict], name: str, calibrate_for: Optional[list], defaults: dict) -> Any:
    """The server's guard, its thresholds resolved now for every setting it serves (the defaults and
    `calibrate_for`): no request waits for a calibration, and one at another setting is refused."""
    if not guarded:
        return None
    from ..guarding import DEFAULT_METRIC, guard

    g = guard(pipe, metric=metric or DEFAULT_METRIC, threshold=threshold, mitigation=mitigation,
              sail_kwargs=sail_kwargs, name=name, calibrate_new=False)
    for s in [{}, *(calibrate_for or [])]:
        bad = set(s) - {"num_inference_steps", "guidance_scale", "height", "width"}
        if bad:
            raise BadArgument(f"calibrate_for takes num_inference_steps, guidance_scale, height, width; got {bad}")
        g.calibrate(s.get("num_inference_steps", defaults["num_inference_steps"]),
                    s.get("guidance_scale", defaults["guidance_scale"]), s.get("height"), s.get("width"))
    return g




class Service:
    """One served pipeline: its adapter (made once), the request defaults, the limits, the guard
    (thresholds resolved now for every setting it serves), the runner and the server's series.

    Args:
        pipe: a supported diffusers pipeline.
        guarded: False serves the plain pipeline.
        metric, threshold, mitigation, sail_kwargs, name: the guard's (sharpfast.guard).
        calibrate_for: extra settings to serve besides the defaults (dicts of some of
            num_inference_steps, guidance_scale, height, width).
        defaults: request defaults over the pipeline's own.
        limits: a sharpfast.server.protocol.Limits (default: Limits.for_model).
        max_batch_size: images per pipeline call at most.
        api_key: the key the default limits require (ignored when limits are given).
        docs: whether the default limits serve /docs (None: only without api_key; Limits.docs).
    """

    def __init__(self, pipe: Any, *, guarded: bool = True, metric: Optional[str] = None, threshold: Any = "auto",
                 mitigation: Any = "auto", sail_kwargs: Optional[dict] = None, name: str = "default",
                 calibrate_for: Optional[list] = None, defaults: Optional[dict] = None, limits: Any = None,
                 max_batch_size: int = 8, api_key: Optional[str] = None, docs: Optional[bool] = None) -> None:
        from .protocol import Limits

        self.pipe, self.model = pipe, ScoreModel(pipe)
        self.max_batch_size = validate.integer(max_batch_size, "max_batch_size")
        h, w = self.model.default_size()
        self.defaults = {**pipeline_defaults(pipe), "num_images_per_prompt": 1, "height": h, "width": w,
                         **(defaults or {})}
        self.limits = limits or Limits.for_model((h, w), self.max_batch_size, self.model, api_key=api_key,
                                                 docs=docs)
        self.needs_cfg = not self.model.distilled  # Flux: any finite guidance
        self.guard = build_guard(pipe, guarded, metric, threshold, mitigation, sail_kwargs, name, calibrate_for,
                                 self.defaults)
        self.threshold = None if self.guard is None else self.guard.calibrate(
            self.defaults["num_inference_steps"], self.defaults["guidance_scale"])
        self.metric = None if self.guard is None else self.guard.metric
        self.metrics = ServerMetrics(self.guard)
        self.runner = Runner(pipe, self.model, self.guard)

    def parse(self, body: dict) -> dict:
        """A request body checked and completed (BadArgument naming the problem, or the settings
        served when the guard has no threshold at the request's)."""
        parsed = parse_request(body, self.defaults, self.needs_cfg, self.limits)
        why = not_served(self.guard, parsed, self.defaults)
        if why:
            raise BadArgument(why)
        return parsed

    def health(self) -> dict:
        """What /health shows of the served pipeline."""
        g = self.guard
        return {"guarded": g is not None, "metric": self.metric, "threshold": self.threshold,
                "serves": [list(k) for k in g.served_settings()] if g else None}

    def answer(self, outcome: Any, request_id: Optional[str]) -> tuple[int, dict]:
        """(status, body) of a request's outcome: its answer, or the exception it ended with."""
        if isinstance(outcome, BaseException):
            status, body = error_body(outcome, request_id)
        else:
            status, body = 200, outcome
        self.metrics.http.labels(str(status)).inc()
        return status, body

    def refused(self, status: int) -> None:
        """Count a request the middleware or the schema refused."""
        self.metrics.http.labels(str(status)).inc()
