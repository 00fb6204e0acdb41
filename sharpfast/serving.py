"""sharpfast.guard (this module: serving): score every request from the CFG batch the pipeline computes anyway.

    guarded = sharpfast.guard(pipe, metric="wen", threshold=...)
    out = guarded(prompts, generator=g, ...)          # pipe's own output, plus out.memorization
    guarded.remove()                                   # or: with sharpfast.guard(pipe) as guarded: ...

A forward hook on pipe.unet (pipe.transformer for SD3 / Flux) captures the first call of each
guarded request (its CFG batch [null; cond]; Flux, guidance-distilled, has only the conditional
rows, and its null branch costs one extra call on them) into that request's own state
(thread-local: requests on other threads never see
it); after the call, every image is scored from the capture with the metric registry of
sharpfast.metrics, the same function detect uses: metric="wen" costs no extra UNet call,
"sharpness" one extra CFG call at that step (the finite difference of sharpfast.detect), made
outside the UNet's own hook. The hook never changes a UNet output, so the images of prompts that
are not flagged are exactly those of pipe(...).

The decision is made at the first step (a step callback, chained before the user's own
callback_on_step_end): a request without a flagged prompt simply runs on. A request with one
stops right after its first UNet call; SAIL optimizes the flagged rows' noise (sail_latents,
from the noise that call used), and the whole batch is generated ONCE from the mixed noise: the
unflagged rows keep their own noise (and the generators their state), so their images equal
pipe(...)'s. mitigation=None only reports.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from . import mitigations, validate
from .errors import BadArgument, NonFiniteOutput, NotCalibrated, UsageError
from .metrics import REGISTRY, Step
from .mitigations import generator_states, restore_generators
from .monitoring import GuardStats
from .score import ScoreModel, denoiser, pipeline_defaults

log = logging.getLogger("sharpfast.guard")

GUARD_METRICS = tuple(REGISTRY)  # costs: REGISTRY[name].cost (wen and score_norm: no extra UNet call)
# chosen on the tuning half of the digits model's memorized prompts (docs/mitigation.md; the
# held-out half reports it)
DEFAULT_METRIC = mitigations.GUARD_METRIC
DEFAULT_MITIGATION = "auto"
# mitigation="auto": the chosen (method, setting) where the method is defined for the family, else
# SAIL on the guard's metric (Flux). transition s0t450 (no guidance above t = 450): the fewest
# copies at fidelity >= 0.95 with no extra UNet call on half A of the digits memorized prompts
AUTO_MITIGATION = (("transition", "s0t450"), ("sail_guard", 1.0))

# One lock per pipeline object, shared by every guard on it. A diffusers pipeline call is not
# thread-safe: measured here, 4 threads calling one StableDiffusionPipeline raised shape errors
# from its text encoding (the fast tokenizer's padding state is shared) within 30 rounds. So the
# pipeline's own work (generation, SAIL's re-generation and its prompt encoding) runs one request
# at a time; capturing is per thread and scoring runs outside the lock.
_PIPE_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PIPE_LOCKS_GUARD = threading.Lock()


class _Mitigate(Exception):
    """Raised from the step callback: the request holds a flagged prompt; stop after step 1."""


def pipeline_lock(pipe) -> threading.RLock:
    """The one lock of a pipeline object, shared by every guard on it."""
    with _PIPE_LOCKS_GUARD:
        lock = _PIPE_LOCKS.get(pipe)
        if lock is None:
            lock = _PIPE_LOCKS[pipe] = threading.RLock()
        return lock


@dataclass(frozen=True)
class GuardConfig:
    """What a guard does, checked once: the metric, the threshold ("auto" or a number), the
    mitigation (its registry entry and setting) and SAIL's extra keywords."""

    metric: str
    threshold: object
    mitigation: Optional[str]
    method: Optional[mitigations.Mitigation]
    setting: object
    sail_kwargs: dict
    name: str
    calibrate_new: bool = True  # False: a request at a setting not calibrated before is refused (NotCalibrated)

    @classmethod
    def build(cls, model, metric, threshold, mitigation, setting, sail_kwargs, name,
              calibrate_new: bool = True) -> GuardConfig:
        """The checked configuration (BadArgument / UnsupportedPipeline naming what is wrong)."""
        if metric not in GUARD_METRICS:
            raise BadArgument(f"metric must be one of {GUARD_METRICS}, got {metric!r}")
        if mitigation == "auto":
            mitigation, auto_setting = next((m, st) for m, st in AUTO_MITIGATION
                                            if mitigations.get(m).supports(model))
            setting = auto_setting if setting is None else setting
        method = None if mitigation is None else mitigations.get(mitigation)
        if method is not None:
            mitigations.check_family(method, model)
            if method.kind == "prompt":
                raise BadArgument(f"the guard mitigates single images; {mitigation!r} changes whole prompts")
            setting = method.default if setting is None else setting
        sail_kwargs = dict(sail_kwargs or {})
        if "threshold" in sail_kwargs or "stop" in sail_kwargs:
            raise BadArgument("SAIL inside the guard stops on the guard's own metric and threshold: drop sail_kwargs' "
                              "threshold (mitigation='sail_guard', setting=margin stops under margin x threshold)")
        if threshold != "auto":  # +inf is allowed (score only, never flag); NaN would silently flag nothing
            threshold = validate.finite(threshold, "threshold", allow_inf=True)
        return cls(metric, threshold, mitigation, method, setting, sail_kwargs, str(name), bool(calibrate_new))


class _Thresholds:
    """The threshold at a request's (num_inference_steps, guidance_scale, height, width): the given
    number, or for "auto" the model's calibration at that setting, resolved once each, when first
    needed (the first timestep, the guidance and the latent's size change the scores' scale; see
    sharpfast.calibration). With calibrate_new=False only settings resolved before (calibrate())
    are served: another raises NotCalibrated instead of calibrating inside a request."""

    def __init__(self, pipe, metric: str, given, defaults: dict, default_size: tuple, calibrate_new: bool = True):
        self.pipe, self.metric, self.given, self.defaults = pipe, metric, given, defaults
        self.default_size, self.calibrate_new = tuple(default_size), calibrate_new
        self.sources: dict = {}
        self._table: dict = {}
        self._lock = threading.Lock()

    def key(self, steps=None, guidance=None, size=None) -> tuple:
        h, w = size or self.default_size
        return (int(steps or self.defaults["num_inference_steps"]),
                float(self.defaults["guidance_scale"] if guidance is None else guidance), int(h), int(w))

    def at(self, steps=None, guidance=None, size=None, *, allow_new: Optional[bool] = None) -> float:
        if self.given != "auto":
            return float(self.given)
        key = self.key(steps, guidance, size)
        with self._lock:
            if key not in self._table:
                if not (self.calibrate_new if allow_new is None else allow_new):
                    raise NotCalibrated(f"no calibrated threshold at {_describe(key)}; this guard serves "
                                        f"{', '.join(_describe(k) for k in self._table) or 'no setting yet'}")
                from .calibration import resolve

                found = resolve(self.pipe, self.metric, "threshold", num_inference_steps=key[0], guidance_scale=key[1],
                                height=key[2], width=key[3])
                value = validate.finite(found.value, f"the calibrated threshold ({found.source})", allow_inf=True)
                self._table[key], self.sources[key] = value, f"{found.source} ({_describe(key)})"
                log.info("sharpfast.guard: %s > %.4g at %s (%s)", self.metric, value, _describe(key), found.source)
            return self._table[key]

    def source(self, steps=None, guidance=None, size=None) -> str:
        if self.given != "auto":
            return "given"
        self.at(steps, guidance, size)
        return self.sources[self.key(steps, guidance, size)]

    def size(self, height, width) -> tuple:
        dh, dw = self.default_size
        return (validate.integer(height or dh, "height"), validate.integer(width or dw, "width"))

    def settings(self) -> list:
        """The (steps, guidance, height, width) resolved so far."""
        with self._lock:
            return list(self._table)


def _describe(key: tuple) -> str:
    return f"{key[0]} steps, guidance {key[1]:g}, {key[2]}x{key[3]}"


@dataclass
class _Request:
    """The state of one guarded request (one per call, on its own thread)."""

    model: ScoreModel
    prompts: list
    n: int
    size: tuple[int, int]
    threshold: float
    guidance: float
    steps: int
    threshold_source: str = "given"
    user_cb: object = None
    added_s: float = 0.0
    capture: Optional[tuple] = None  # the first call: (sample, t, pred, hidden, added) from model.read_call
    alpha_bar: float = 0.0
    schedule: object = None
    # per image: NaN/inf seen in any call of the request (kept on the device: no sync per step)
    bad: Optional[torch.Tensor] = None
    decision: Optional[dict] = None
    reports: Optional[list] = None  # per prompt: (mitigated, check) of the mitigation
    sail_steps: Optional[int] = None

    @property
    def images(self) -> int:
        return len(self.prompts) * self.n

    def note_finite(self, pred) -> None:
        rows = pred.shape[0]
        if rows % self.images:
            return
        ok = torch.isfinite(pred.reshape(rows, -1)).all(dim=1).view(-1, self.images).all(dim=0)
        self.bad = ~ok if self.bad is None else self.bad | ~ok

    def check_finite(self) -> None:
        if self.bad is not None and bool(self.bad.any()):
            i = int(self.bad.nonzero()[0]) // self.n
            raise NonFiniteOutput(f"the denoiser returned NaN/inf during the guarded generation of prompt "
                                  f"{self.prompts[i]!r}")

    def capture_call(self, args, kwargs, pred, scheduler) -> None:
        """Keep the first denoiser call (read back by the adapter) and alpha_bar now: Euler-type
        schedulers read it from their step index, which moves on."""
        sample, t, hidden, added = self.model.read_call(args, kwargs)
        if sample.shape[0] % 2 and not self.model.distilled:
            raise BadArgument("sharpfast.guard expects the CFG batch [null; cond]: call with guidance_scale > 1")
        self.capture = (sample.detach(), t, pred.detach(), hidden.detach(), added)
        self.alpha_bar, self.schedule = self.model.alpha_bar(scheduler, t), scheduler

    def decide(self, metric: str) -> dict:
        """Per-prompt scores (mean over its images) and flags, from the captured first call."""
        if self.capture is None:
            raise UsageError("the pipeline made no UNet call; nothing was scored")
        start = time.perf_counter()
        sample, t, pred, hidden, added = self.capture
        x, cond, u, c = self.model.split_capture(sample, t, pred, hidden, added, self.prompts, self.n, self.size)
        step = Step(self.model, x, t, self.alpha_bar, cond, u, c, names=self.prompts, n=self.n, schedule=self.schedule)
        step.check(u, "null branch at the first step")  # NaN > threshold is False: it would pass unflagged
        step.check(c, "conditional branch at the first step")
        with torch.no_grad():
            scores = REGISTRY[metric].fn(step).float().view(len(self.prompts), self.n).mean(dim=1).cpu()
        self.added_s += time.perf_counter() - start
        bad = ~torch.isfinite(scores)
        if bool(bad.any()):  # finite predictions, yet no finite score (an overflow in the metric)
            raise NonFiniteOutput(f"the {metric} score of prompt {self.prompts[int(bad.nonzero()[0])]!r} is not finite")
        return {"scores": scores, "flagged": scores > self.threshold}

    def report(self, metric: str, mitigation) -> list:
        """The per-prompt report the guard attaches to the output."""
        d = self.decision
        assert d is not None, "report() before decide()"
        reports = self.reports or [(False, "not flagged" if not f else "report only (mitigation=None)")
                                   for f in d["flagged"].tolist()]
        return [{"prompt": p, "score": float(s), "metric": metric, "threshold": self.threshold,
                 "threshold_source": self.threshold_source, "flagged": bool(f),
                 "mitigated": bool(f) and m, "mitigation": mitigation if f else None, "check": c}
                for p, s, f, (m, c) in zip(self.prompts, d["scores"], d["flagged"], reports)]

    def take_callback(self, call: dict) -> dict:
        """Take the user's step callback out of the call (it is chained after the guard's own)."""
        self.user_cb = call.pop("callback_on_step_end", None)
        inputs = call.pop("callback_on_step_end_tensor_inputs", None) or getattr(self.user_cb, "tensor_inputs", None)
        call["callback_on_step_end_tensor_inputs"] = list(dict.fromkeys([*(inputs or ["latents"]), "latents"]))
        return call

    def watch_callback(self):
        """A step callback that watches the latents for NaN/inf (the sampler's own arithmetic, a
        huge guidance), then runs the user's."""
        def watch(pipe, i, t, cb_kwargs):
            self.note_finite(cb_kwargs["latents"].detach())
            return self.user_cb(pipe, i, t, cb_kwargs) if self.user_cb is not None else {}
        return watch

    def step_callback(self, metric: str, stop_if_flagged: bool):
        """watch_callback, plus the decision at the first step (outside the denoiser's hook): a
        request with a flagged prompt stops there (_Mitigate) when it is to be mitigated."""
        def on_step_end(pipe, i, t, cb_kwargs):
            self.note_finite(cb_kwargs["latents"].detach())  # once per step, also before a _Mitigate
            if self.decision is None:
                self.decision = self.decide(metric)
                if stop_if_flagged and bool(self.decision["flagged"].any()):
                    raise _Mitigate()
            return self.user_cb(pipe, i, t, cb_kwargs) if self.user_cb is not None else {}
        return on_step_end

    def context(self, pipe, noise, generator, metric: str):
        """The mitigation context of the flagged rows."""
        assert self.decision is not None, "context() before decide()"
        flagged = self.decision["flagged"].nonzero().view(-1).tolist()
        rows = [i * self.n + j for i in flagged for j in range(self.n)]
        return mitigations.Context(pipe, self.model, self.prompts, self.n, noise, self.size[0], self.size[1],
                                   self.steps, self.guidance, generator, rows=rows,
                                   guard={"metric": metric, "threshold": self.threshold})


def _new_request(pipe, thresholds: _Thresholds, prompt, kwargs) -> _Request:
    """The request's state, every argument checked before the pipeline runs."""
    model = ScoreModel(pipe, kwargs.get("max_sequence_length"))  # per request: the pipeline may have moved
    if "prompt_embeds" in kwargs:
        raise BadArgument("sharpfast.guard scores text prompts: pass prompt, not prompt_embeds")
    prompts = validate.prompts(prompt, "prompt")
    guidance = kwargs.get("guidance_scale", thresholds.defaults["guidance_scale"])
    guidance = validate.guidance_scale(guidance, needs_cfg=not model.distilled)
    n = kwargs.get("num_images_per_prompt")
    n = 1 if n is None else validate.integer(n, "num_images_per_prompt")
    validate.generators(kwargs.get("generator"), len(prompts) * n)
    dh, dw = model.default_size()
    size = (kwargs.get("height") or dh, kwargs.get("width") or dw)
    validate.latents(kwargs.get("latents"), (len(prompts) * n, *model.latent_shape(*size)), size)
    steps = int(kwargs.get("num_inference_steps") or thresholds.defaults["num_inference_steps"])
    threshold = thresholds.at(steps, guidance, size)
    return _Request(model, prompts, n, size, threshold, guidance, steps,
                    threshold_source=thresholds.source(steps, guidance, size))


class Guard:
    """A stock pipeline wrapped for serving; see sharpfast.guard."""

    def __init__(self, pipe, config: GuardConfig):
        self.pipe, self.config = pipe, config
        self.metric, self.mitigation, self.method, self.setting = (config.metric, config.mitigation, config.method,
                                                                   config.setting)
        self._thresholds = _Thresholds(pipe, config.metric, config.threshold, pipeline_defaults(pipe),
                                       ScoreModel(pipe).default_size(), config.calibrate_new)
        self._local = threading.local()  # per-request state: one per thread
        self._stats = GuardStats(config.name, config.metric, None if config.threshold == "auto" else config.threshold)
        self._lock = pipeline_lock(pipe)
        self._handle = denoiser(pipe).register_forward_hook(self._hook, with_kwargs=True)
        log.info("sharpfast.guard: %s > %s, mitigation %s", config.metric, config.threshold, config.mitigation)

    @property
    def threshold(self) -> float:
        """The threshold at the pipeline's default settings (threshold="auto": calibrated on first use)."""
        return self._thresholds.at()

    @property
    def threshold_source(self) -> str:
        """Where that threshold came from ("given", a calibration file, the cache, calibrated now)."""
        return self._thresholds.source()

    def calibrate(self, num_inference_steps=None, guidance_scale=None, height=None, width=None) -> float:
        """Resolve the threshold at these request settings now (default: the pipeline's own), so
        that no request waits for it; with calibrate_new=False, the settings the guard serves.

        Returns:
            The threshold the guard flags above at those settings.
        """
        size = None if height is None and width is None else self._thresholds.size(height, width)
        return self._thresholds.at(num_inference_steps, guidance_scale, size, allow_new=True)

    def served_settings(self) -> list:
        """The (num_inference_steps, guidance_scale, height, width) the guard has thresholds for."""
        return self._thresholds.settings()

    def _hook(self, unet, args, kwargs, output):
        """The denoiser's forward hook: capture the first call, watch every call for NaN/inf."""
        req = getattr(self._local, "request", None)
        if req is not None:  # else not a guarded request
            pred = output[0] if isinstance(output, tuple) else output.sample
            req.note_finite(pred.detach())
            if req.capture is None:
                req.capture_call(args, kwargs, pred, self.pipe.scheduler)
        return None

    def __call__(self, prompt, **kwargs):
        """pipe(prompt, **kwargs) with `.memorization`: the per-prompt report (see sharpfast.guard)."""
        start = time.perf_counter()
        try:
            out, req = self._call(prompt, kwargs)
        except BaseException:
            self._stats.record_error()
            raise
        d = req.decision
        self._stats.record(scores=d["scores"].tolist(), flagged=d["flagged"].tolist(),
                           mitigated=[m for m, _ in req.reports or []], images=req.images, threshold=req.threshold,
                           sail_steps=req.sail_steps, added_s=req.added_s, request_s=time.perf_counter() - start)
        return out

    @property
    def stats(self) -> dict:
        """A snapshot of the counters and histograms (see sharpfast.monitoring)."""
        return self._stats.snapshot()

    def register_prometheus(self, registry=None):
        """Export the stats through prometheus_client (into `registry`, default its global one);
        returns the collector (registry.unregister(it) takes it off)."""
        if registry is None:
            from prometheus_client import REGISTRY as registry  # noqa: N811 (collector() names the extra)
        collector = self._stats.collector()
        registry.register(collector)
        return collector

    def _call(self, prompt, kwargs):
        if self._handle is None:
            raise UsageError("this guard was removed; create a new one with sharpfast.guard(pipe)")
        req = _new_request(self.pipe, self._thresholds, prompt, kwargs)
        call = req.take_callback(dict(kwargs))
        call["callback_on_step_end"] = req.step_callback(self.metric, stop_if_flagged=self.method is not None)
        self._local.request = req
        try:
            with self._lock:
                if self.method is not None and call.get("latents") is None and call.get("generator") is None:
                    call["latents"] = req.model.noise(req.images, *req.size)  # the global RNG's draw, reusable
                states = generator_states(call.get("generator"))
                try:
                    out = self.pipe(req.prompts, **call)
                except _Mitigate:
                    out = _regenerate(self.pipe, self.config, req, call, states)
            req.check_finite()
        finally:
            self._local.request = None
        req.decision = req.decision or req.decide(self.metric)  # a pipeline that never called back
        report = req.report(self.metric, self.mitigation)
        if isinstance(out, tuple):  # return_dict=False: the pipeline's tuple, then the report
            return (*out, report), req
        out.memorization = report
        return out, req

    def remove(self) -> None:
        """Take the hook off pipe.unet / pipe.transformer: the pipeline is exactly as before."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def _regenerate(pipe, config: GuardConfig, req: _Request, call: dict, states):
    """The flagged rows mitigated, the others as they were, in ONE generation of the batch."""
    assert config.method is not None, "regenerating needs a mitigation"
    gens = call.get("generator")
    restore_generators(gens, states)
    noise = call.get("latents")
    if noise is None:  # the draw prepare_latents made, which also advances the generators as it did
        noise = req.model.noise(req.images, *req.size, gens)
    start = time.perf_counter()
    ctx = req.context(pipe, noise.to(req.model.device), gens, config.metric)
    out, req.reports, info = mitigations.regenerate(config.method, ctx, config.setting, config.sail_kwargs,
                                                    dict(call, callback_on_step_end=req.watch_callback()),
                                                    on_planned=lambda: time.perf_counter() - start)
    req.added_s += info.pop("_planning_s", 0.0)
    req.sail_steps = info["sail"]["adam_steps"] if "sail" in info else None
    return out


def guard(pipe, *, metric: str = DEFAULT_METRIC, threshold="auto", mitigation: Optional[str] = DEFAULT_MITIGATION,
          setting=None, sail_kwargs=None, name: str = "default", calibrate_new: bool = True) -> Guard:
    """Wrap a stock pipeline for serving.

    guard(pipe)(prompt, **pipe_kwargs) returns pipe's own output with `.memorization`: per prompt
    its score, the threshold, flagged, mitigated, the mitigation and its check. A prompt is
    `mitigated: True` only when the mitigation ran on it and passed the check the report states:
    for noise methods (sail, sail_guard, sail+transition) the guard's own metric at the new initial
    noise is under the guard's threshold (SAIL stops on that metric and threshold); for trajectory
    methods (transition, attention_rescale, attract_repel) the method was applied to its images.
    Otherwise `mitigated: False` and `check` says why; both are counted in `guarded.stats`.

    Args:
        pipe: a supported diffusers pipeline; it stays the user's object (remove() takes the hook off).
        metric: the registry metric scored at the first step (sharpfast.metrics.REGISTRY).
        threshold: "auto" (the model's calibration at each request's num_inference_steps,
            guidance_scale and image size: calibration.json beside it, the per-user cache, or
            calibrated once on the built-in generic captions; each report's `threshold_source`
            says which), a number, or inf (score only).
        mitigation: "auto" (the default chosen on the digits model's frontier, see docs/mitigation.md,
            where the model family has it, else sail_guard), a registry name of
            sharpfast.mitigations (not the prompt-changing ones), or None to only report.
        setting: the mitigation's knob (default: its registry default).
        sail_kwargs: extra keywords for SAIL (candidates, max_steps, lr, ...), noise methods only.
        name: the label of this guard's monitoring series.
        calibrate_new: with threshold="auto", calibrate a setting the first time a request needs
            it (default); False serves only the settings resolved by `guarded.calibrate(...)`
            before, and refuses others with NotCalibrated (a server's request never waits for a
            calibration).

    Returns:
        A Guard: call it as the pipeline; `.stats`, `.register_prometheus()`, `.remove()`.

    Raises:
        BadArgument: an unknown metric or mitigation, a NaN threshold.
        UnsupportedPipeline: the pipeline, or the mitigation for its family, is not supported.
        NotCalibrated: (at a call) a setting not calibrated before, with calibrate_new=False.
    """
    model = ScoreModel(pipe)  # raises UnsupportedPipeline now, not at the first request
    return Guard(pipe, GuardConfig.build(model, metric, threshold, mitigation, setting, sail_kwargs, name,
                                         calibrate_new))
