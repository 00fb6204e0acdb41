"""sharpfast.guard (this module: serving): score every request from the CFG batch the pipeline computes anyway.

    guarded = sharpfast.guard(pipe, metric="wen", threshold=...)
    out = guarded(prompts, generator=g, ...)          # pipe's own output, plus out.memorization
    guarded.remove()                                   # or: with sharpfast.guard(pipe) as guarded: ...

A forward hook on pipe.unet (pipe.transformer for SD3 / Flux) captures the first call of each
guarded request (its CFG batch [null; cond]; Flux, guidance-distilled, has only the conditional
rows, and its null branch costs one extra call on them) into that request's own state (thread-local: requests on other threads never see
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
from .errors import BadArgument, NonFiniteOutput
from .metrics import REGISTRY, Step
from .monitoring import GuardStats
from .score import Conditioning, ScoreModel, denoiser, pipeline_defaults

log = logging.getLogger("sharpfast.guard")

GUARD_METRICS = tuple(REGISTRY)  # costs: REGISTRY[name].cost (wen and score_norm: no extra UNet call)
# chosen on the tuning half of the digits model's memorized prompts (README, "Mitigation"; the
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
_PIPE_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PIPE_LOCKS_GUARD = threading.Lock()


class _Mitigate(Exception):
    """Raised from the step callback: the request holds a flagged prompt; stop after step 1."""


def _generator_states(gens):
    if gens is None:
        return None
    return [g.get_state() for g in (gens if isinstance(gens, list) else [gens])]


def _restore(gens, states):
    if gens is not None:
        for g, st in zip(gens if isinstance(gens, list) else [gens], states):
            g.set_state(st)


def pipeline_lock(pipe) -> threading.RLock:
    with _PIPE_LOCKS_GUARD:
        lock = _PIPE_LOCKS.get(pipe)
        if lock is None:
            lock = _PIPE_LOCKS[pipe] = threading.RLock()
        return lock


@dataclass
class _Request:
    """The state of one guarded request (one per call, on its own thread)."""

    model: object
    prompts: list
    n: int
    size: tuple
    threshold: float
    guidance: float
    steps: int
    user_cb: object = None
    added_s: float = 0.0
    # the first UNet call's capture
    sample: object = None
    t: object = None
    pred: object = None
    hidden: object = None
    added: object = None
    alpha_bar: float = 0.0
    schedule: object = None
    bad: object = None  # per image: NaN/inf seen in any call of the request (on the device: no sync per step)
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


class Guard:
    """A stock pipeline wrapped for serving; see sharpfast.guard."""

    def __init__(self, pipe, metric=DEFAULT_METRIC, threshold="auto", mitigation=DEFAULT_MITIGATION, sail_kwargs=None,
                 name="default", setting=None):
        model = ScoreModel(pipe)  # raises UnsupportedPipeline now, not at the first request
        if metric not in GUARD_METRICS:
            raise BadArgument(f"metric must be one of {GUARD_METRICS}, got {metric!r}")
        if mitigation == "auto":
            mitigation, auto_setting = next((m, st) for m, st in AUTO_MITIGATION
                                            if model.family in mitigations.get(m).families)
            setting = auto_setting if setting is None else setting
        self.method = None if mitigation is None else mitigations.get(mitigation)
        if self.method is not None:
            mitigations.check_family(self.method, model)
            if self.method.kind == "prompt":
                raise BadArgument(f"the guard mitigates single images; {mitigation!r} changes whole prompts")
        self.pipe, self.metric, self.mitigation = pipe, metric, mitigation
        self.setting = self.method.default if setting is None and self.method is not None else setting
        self.sail_kwargs = dict(sail_kwargs or {})
        if "threshold" in self.sail_kwargs or "stop" in self.sail_kwargs:
            raise BadArgument("SAIL inside the guard stops on the guard's own metric and threshold: drop sail_kwargs' "
                              "threshold (mitigation='sail_guard', setting=margin stops under margin x threshold)")
        self._defaults = pipeline_defaults(pipe)
        self._auto = threshold == "auto"
        self._thresholds = {}  # (num_inference_steps, guidance_scale) -> threshold, for "auto"
        self._auto_lock = threading.Lock()
        if self._auto:  # the model's calibration (beside it, cached, or made now); see sharpfast.calibration
            threshold = self._auto_threshold(self._defaults["num_inference_steps"], self._defaults["guidance_scale"])
        else:
            self.threshold_source = "given"
        # +inf is allowed (score only, never flag); NaN would silently flag nothing
        self.threshold = validate.finite(threshold, "threshold", allow_inf=True)
        log.info("sharpfast.guard: %s > %.4g (%s), mitigation %s", metric, self.threshold, self.threshold_source,
                 mitigation)
        self._local = threading.local()  # per-request state: one per thread
        self._stats = GuardStats(str(name), metric, self.threshold)
        self._lock = pipeline_lock(pipe)
        self._handle = denoiser(pipe).register_forward_hook(self._hook, with_kwargs=True)

    def _auto_threshold(self, steps, guidance):
        """threshold="auto" at a request's settings: the first timestep (num_inference_steps) and the
        guidance change the scores' scale, so each setting has its own calibration."""
        key = (int(steps), float(guidance))
        with self._auto_lock:
            if key not in self._thresholds:
                from .calibration import resolve

                found = resolve(self.pipe, self.metric, "threshold", num_inference_steps=key[0],
                                guidance_scale=key[1])
                self._thresholds[key] = found.value
                if key == (self._defaults["num_inference_steps"], float(self._defaults["guidance_scale"])):
                    self.threshold_source = found.source
                else:
                    log.info("sharpfast.guard: %s > %.4g at %d steps, guidance %g (%s)", self.metric,
                             found.value, key[0], key[1], found.source)
            return self._thresholds[key]

    def calibrate(self, num_inference_steps=None, guidance_scale=None) -> float:
        """The threshold at these request settings (default: the pipeline's own), calibrating now if
        threshold="auto" has none yet, so that no request waits for it.

        Args:
            num_inference_steps: the requests' steps (default the pipeline's).
            guidance_scale: the requests' guidance (default the pipeline's).

        Returns:
            The threshold the guard flags above at those settings.
        """
        steps = num_inference_steps or self._defaults["num_inference_steps"]
        guidance = self._defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        return self._auto_threshold(steps, guidance) if self._auto else self.threshold

    # -- the hook: capture the first call, watch every call for NaN/inf --------------------------
    def _hook(self, unet, args, kwargs, output):
        req = getattr(self._local, "request", None)
        if req is None:  # not a guarded request
            return None
        pred = output[0] if isinstance(output, tuple) else output.sample
        req.note_finite(pred.detach())
        if req.pred is not None:  # its first call is captured
            return None
        model = req.model
        if model.flow:  # SD3 / Flux transformers: keyword arguments of their own
            sample, t = kwargs["hidden_states"], kwargs["timestep"]
            if model.family == "flux":
                t = t * 1000  # Flux's transformer takes t / 1000
            added = {"pooled_projections": kwargs["pooled_projections"]}
            if kwargs.get("guidance") is not None:  # Flux's embedded guidance, per row
                added["guidance"] = kwargs["guidance"]
        else:
            sample = args[0] if args else kwargs["sample"]
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            added = kwargs.get("added_cond_kwargs")
        t = t.reshape(-1)[0] if torch.is_tensor(t) and t.dim() else t
        if sample.shape[0] % 2 and not model.distilled:
            raise RuntimeError("sharpfast.guard expects the CFG batch [null; cond]: call with guidance_scale > 1")
        # alpha_bar now: Euler-type schedulers read it from their step index, which moves on
        req.sample, req.t, req.pred = sample.detach(), t, pred.detach()
        req.hidden, req.added = kwargs["encoder_hidden_states"].detach(), added
        req.alpha_bar, req.schedule = model.alpha_bar(self.pipe.scheduler, t), self.pipe.scheduler
        return None

    def _score(self, req: _Request):
        """The metric of every image of the captured CFG batch (outside the hook)."""
        model = req.model
        if model.distilled:
            # Flux: the pipeline's call holds the conditional branch only (its embeddings are the
            # capture's); the null branch, the empty prompt, costs one call on the N rows
            model.latent_shape(*req.size)  # the packed latents' grid, for the position ids
            null, null_pooled = model.prompts.flux_null(len(req.prompts), req.n)
            ca = dict(req.added)
            cond = Conditioning(req.hidden, null, ca, {**ca, "pooled_projections": null_pooled})
            x, c = req.sample, req.pred
            with torch.no_grad():
                u = model.predict_branch(x, req.t, cond, "null")
        else:
            split = lambda d, i: None if d is None else {k: v.chunk(2)[i] for k, v in d.items()}  # noqa: E731
            hidden, added = req.hidden, req.added
            cond = Conditioning(hidden.chunk(2)[1], hidden.chunk(2)[0], split(added, 1), split(added, 0))
            u, c = req.pred.chunk(2)
            x = req.sample.chunk(2)[1]
        step = Step(model, x, req.t, req.alpha_bar, cond, u, c, names=req.prompts, n=req.n, schedule=req.schedule)
        step.check(u, "null branch at the first step")  # NaN > threshold is False: it would pass unflagged
        step.check(c, "conditional branch at the first step")
        with torch.no_grad():
            return REGISTRY[self.metric].fn(step)

    # -- serving -------------------------------------------------------------------------------
    def __call__(self, prompt, **kwargs):
        start = time.perf_counter()
        try:
            out, req = self._call(prompt, kwargs)
        except BaseException:
            self._stats.record_error()
            raise
        d = req.decision
        self._stats.record(scores=d["scores"].tolist(), flagged=d["flagged"].tolist(),
                           mitigated=[m for m, _ in req.reports], images=req.images, sail_steps=req.sail_steps,
                           added_s=req.added_s, request_s=time.perf_counter() - start)
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

    def _request(self, prompt, kwargs) -> _Request:
        """The request's state, every argument checked before the pipeline runs."""
        if self._handle is None:
            raise RuntimeError("this guard was removed; create a new one with sharpfast.guard(pipe)")
        # per request: the pipeline may have moved since the guard was made
        model = ScoreModel(self.pipe, kwargs.get("max_sequence_length"))
        if "prompt_embeds" in kwargs:
            raise BadArgument("sharpfast.guard scores text prompts: pass prompt, not prompt_embeds")
        prompts = validate.prompts(prompt, "prompt")
        guidance = kwargs.get("guidance_scale", self._defaults["guidance_scale"])
        guidance = validate.guidance_scale(guidance, needs_cfg=not model.distilled)
        n = kwargs.get("num_images_per_prompt")
        n = 1 if n is None else validate.integer(n, "num_images_per_prompt")
        validate.generators(kwargs.get("generator"), len(prompts) * n)
        dh, dw = model.default_size()
        size = (kwargs.get("height") or dh, kwargs.get("width") or dw)
        lat = kwargs.get("latents")
        shape = (len(prompts) * n, *model.latent_shape(*size))
        if lat is not None and (not isinstance(lat, torch.Tensor) or tuple(lat.shape) != shape):
            raise BadArgument(f"latents must be a tensor of shape {shape} (len(prompts) * num_images_per_prompt, "
                              f"and the latent of height x width {size}), got "
                              f"{tuple(getattr(lat, 'shape', ())) or type(lat).__name__}")
        steps = kwargs.get("num_inference_steps") or self._defaults["num_inference_steps"]
        return _Request(model, prompts, n, size, self._auto_threshold(steps, guidance) if self._auto
                        else self.threshold, guidance, int(steps))

    def _call(self, prompt, kwargs):
        req = self._request(prompt, kwargs)
        kwargs = dict(kwargs)
        req.user_cb = kwargs.pop("callback_on_step_end", None)
        user_inputs = kwargs.pop("callback_on_step_end_tensor_inputs", None) or getattr(req.user_cb, "tensor_inputs",
                                                                                        None)
        inputs = list(dict.fromkeys([*(user_inputs or ["latents"]), "latents"]))

        def on_step_end(pipe, i, t, cb_kwargs):
            # the latents after every step: NaN/inf from the sampler's own arithmetic (a huge guidance)
            req.note_finite(cb_kwargs["latents"].detach())
            # the decision at the first step: scored here, outside the UNet's hook; a request
            # with a flagged prompt stops now and is generated once, from mixed noise
            if req.decision is None:
                req.decision = self._decide(req)
                if self.method is not None and bool(req.decision["flagged"].any()):
                    raise _Mitigate()
            return req.user_cb(pipe, i, t, cb_kwargs) if req.user_cb is not None else {}

        call = dict(kwargs, callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=inputs)
        self._local.request = req
        try:
            with self._lock:
                if self.method is not None and kwargs.get("latents") is None and kwargs.get("generator") is None:
                    # the global RNG: draw the noise pipe(...) would draw, so it can be reused
                    call["latents"] = req.model.noise(req.images, *req.size)
                states = _generator_states(kwargs.get("generator"))
                try:
                    out = self.pipe(req.prompts, **call)
                except _Mitigate:
                    out = self._generate_mitigated(req, call, states)
            req.check_finite()
        finally:
            self._local.request = None
        if req.decision is None:  # a pipeline that never called back: decide from the capture
            req.decision = self._decide(req)
        if req.reports is None:
            req.reports = [(False, "not flagged" if not f else "report only (mitigation=None)")
                           for f in req.decision["flagged"].tolist()]
        report = [{"prompt": p, "score": float(s), "metric": self.metric, "threshold": req.threshold,
                   "flagged": bool(f), "mitigated": bool(f) and m, "mitigation": self.mitigation if f else None,
                   "check": c}
                  for p, s, f, (m, c) in zip(req.prompts, req.decision["scores"], req.decision["flagged"], req.reports)]
        if isinstance(out, tuple):  # return_dict=False: the pipeline's tuple, then the report
            return (*out, report), req
        out.memorization = report
        return out, req

    def _decide(self, req: _Request) -> dict:
        """Per-prompt scores (mean over its images) and flags, from the captured first call."""
        if req.pred is None:
            raise RuntimeError("the pipeline made no UNet call; nothing was scored")
        start = time.perf_counter()
        per_prompt = self._score(req).float().view(len(req.prompts), req.n).mean(dim=1).cpu()
        req.added_s += time.perf_counter() - start
        bad = ~torch.isfinite(per_prompt)
        if bool(bad.any()):  # finite predictions, yet no finite score (an overflow in the metric)
            raise NonFiniteOutput(f"the {self.metric} score of prompt {req.prompts[int(bad.nonzero()[0])]!r} is "
                                  f"not finite")
        return {"scores": per_prompt, "flagged": per_prompt > req.threshold}

    def _generate_mitigated(self, req: _Request, call: dict, states):
        """The method's plan for the flagged rows (their noise, or a hook on their rows), the others
        as they were, and ONE generation of the whole batch: the unflagged rows come out exactly as
        pipe(...) makes them."""
        gens = call.get("generator")
        _restore(gens, states)
        noise = call.get("latents")
        if noise is None:  # the draw prepare_latents made, which also advances the generators as it did
            noise = req.model.noise(req.images, *req.size, gens)
        noise = noise.to(req.model.device)
        flagged = req.decision["flagged"].nonzero().view(-1).tolist()
        start = time.perf_counter()
        inner = _generator_states(gens)
        ctx = mitigations.Context(self.pipe, req.model, req.prompts, req.n, noise, *req.size, req.steps, req.guidance,
                                  gens, rows=[i * req.n + j for i in flagged for j in range(req.n)],
                                  guard={"metric": self.metric, "threshold": req.threshold})
        plan, checker = mitigations.guard_plan(self.method, ctx, self.setting, self.sail_kwargs)
        if "sail" in plan.info:
            req.sail_steps = plan.info["sail"]["adam_steps"]
        _restore(gens, inner)  # SAIL's extra candidates must not move the request's generators
        req.added_s += time.perf_counter() - start
        final = {k: v for k, v in call.items() if k != "callback_on_step_end"}

        def watch(pipe, i, t, cb_kwargs):
            req.note_finite(cb_kwargs["latents"].detach())
            return req.user_cb(pipe, i, t, cb_kwargs) if req.user_cb is not None else {}

        final["callback_on_step_end"] = watch
        final["latents"] = plan.kwargs.get("latents", noise)
        out = mitigations.run_plan(self.pipe, req.prompts, plan, final)
        req.reports = checker()
        return out

    # -- lifetime -------------------------------------------------------------------------------
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


def guard(pipe, *, metric: str = DEFAULT_METRIC, threshold="auto", mitigation: Optional[str] = DEFAULT_MITIGATION,
          setting=None, sail_kwargs=None, name: str = "default") -> Guard:
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
        threshold: "auto" (the model's calibration at each request's num_inference_steps and
            guidance_scale: calibration.json beside it, the per-user cache, or calibrated once on
            the built-in generic captions; `guarded.threshold_source` says which), a number, or
            inf (score only).
        mitigation: "auto" (the default chosen on the digits model's frontier, see README
            "Mitigation", where the model family has it, else sail_guard), a registry name of
            sharpfast.mitigations (not the prompt-changing ones), or None to only report.
        setting: the mitigation's knob (default: its registry default).
        sail_kwargs: extra keywords for SAIL (candidates, max_steps, lr, ...), noise methods only.
        name: the label of this guard's monitoring series.

    Returns:
        A Guard: call it as the pipeline; `.stats`, `.register_prometheus()`, `.remove()`.

    Raises:
        BadArgument: an unknown metric or mitigation, a NaN threshold.
        UnsupportedPipeline: the pipeline, or the mitigation for its family, is not supported.
    """
    return Guard(pipe, metric, threshold, mitigation, sail_kwargs, name, setting)
