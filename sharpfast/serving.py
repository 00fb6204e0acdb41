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

import torch

from . import validate
from .errors import BadArgument, NonFiniteOutput
from .metrics import REGISTRY, Step
from .monitoring import GuardStats
from .score import Conditioning, ScoreModel, denoiser, pipeline_defaults

log = logging.getLogger("sharpfast.guard")

GUARD_METRICS = tuple(REGISTRY)  # costs: REGISTRY[name].cost (wen and score_norm: no extra UNet call)

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


class Guard:
    """A stock pipeline wrapped for serving; see sharpfast.guard."""

    def __init__(self, pipe, metric="wen", threshold="auto", mitigation="sail", sail_kwargs=None, name="default"):
        ScoreModel(pipe)  # raises UnsupportedPipeline now, not at the first request
        if metric not in GUARD_METRICS:
            raise BadArgument(f"metric must be one of {GUARD_METRICS}, got {metric!r}")
        if mitigation not in ("sail", None):
            raise BadArgument(f"mitigation must be 'sail' or None, got {mitigation!r}")
        self.pipe, self.metric = pipe, metric
        self._defaults = pipeline_defaults(pipe)
        self._auto = threshold == "auto"
        self._thresholds = {}  # (num_inference_steps, guidance_scale) -> threshold, for "auto"
        self._auto_lock = threading.Lock()
        if self._auto:  # the model's calibration (beside it, cached, or made now); see sharpfast.calibration
            threshold = self._auto_threshold(self._defaults["num_inference_steps"], self._defaults["guidance_scale"])
        else:
            self.threshold_source = "given"
        # +inf is allowed (score only, never flag); NaN would silently flag nothing
        threshold = validate.finite(threshold, "threshold", allow_inf=True)
        self.threshold, self.mitigation = threshold, mitigation
        self.sail_kwargs = dict(sail_kwargs or {})
        if mitigation == "sail" and "threshold" not in self.sail_kwargs:
            from .calibration import resolve

            # SAIL's own "auto" target, found (or calibrated) now rather than at the first flagged request
            resolve(pipe, "sharpness", "target", **self._defaults)
        log.info("sharpfast.guard: %s > %.4g (%s)", metric, threshold, self.threshold_source)
        self._local = threading.local()  # per-request capture: one per thread
        self._stats = GuardStats(str(name), metric, threshold)
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

    # -- the hook: capture only ---------------------------------------------------------------
    def _hook(self, unet, args, kwargs, output):
        cap = getattr(self._local, "capture", None)
        if cap is None or "pred" in cap:  # not a guarded request, or its first call is captured
            return None
        model = cap["model"]
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
        pred = output[0] if isinstance(output, tuple) else output.sample
        if sample.shape[0] % 2 and not model.distilled:
            raise RuntimeError("sharpfast.guard expects the CFG batch [null; cond]: call with guidance_scale > 1")
        # alpha_bar now: Euler-type schedulers read it from their step index, which moves on
        cap.update(sample=sample.detach(), t=t, pred=pred.detach(), hidden=kwargs["encoder_hidden_states"].detach(),
                   added=added, alpha_bar=model.alpha_bar(self.pipe.scheduler, t), schedule=self.pipe.scheduler)
        return None

    def _score(self, cap):
        """The metric of every image of the captured CFG batch (outside the hook)."""
        model = cap["model"]
        if model.distilled:
            # Flux: the pipeline's call holds the conditional branch only (its embeddings are the
            # capture's); the null branch, the empty prompt, costs one call on the N rows
            model.latent_shape(*cap["size"])  # the packed latents' grid, for the position ids
            null, null_pooled = model.prompts.flux_null(len(cap["prompts"]), cap["n"])
            ca = dict(cap["added"])
            na = {**ca, "pooled_projections": null_pooled}
            cond = Conditioning(cap["hidden"], null, ca, na)
            x, c = cap["sample"], cap["pred"]
            with torch.no_grad():
                u = model.predict_branch(x, cap["t"], cond, "null")
        else:
            split = lambda d, i: None if d is None else {k: v.chunk(2)[i] for k, v in d.items()}  # noqa: E731
            hidden, added = cap["hidden"], cap["added"]
            cond = Conditioning(hidden.chunk(2)[1], hidden.chunk(2)[0], split(added, 1), split(added, 0))
            u, c = cap["pred"].chunk(2)
            x = cap["sample"].chunk(2)[1]
        step = Step(model, x, cap["t"], cap["alpha_bar"], cond, u, c,
                    names=cap["prompts"], n=cap["n"], schedule=cap["schedule"])
        step.check(u, "null branch at the first step")  # NaN > threshold is False: it would pass unflagged
        step.check(c, "conditional branch at the first step")
        with torch.no_grad():
            return REGISTRY[self.metric].fn(step)

    # -- serving -------------------------------------------------------------------------------
    def __call__(self, prompt, **kwargs):
        start = time.perf_counter()
        try:
            out, cap = self._call(prompt, kwargs)
        except BaseException:
            self._stats.record_error()
            raise
        d = cap["decision"]
        self._stats.record(scores=d["scores"].tolist(), flagged=d["flagged"].tolist(), mitigated=cap["mitigated"],
                           images=len(cap["prompts"]) * cap["n"], sail_steps=cap.get("sail_steps"),
                           added_s=cap["added_s"], request_s=time.perf_counter() - start)
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
            raise RuntimeError("this guard was removed; create a new one with sharpfast.guard(pipe)")
        # per request: the pipeline may have moved since the guard was made
        model = ScoreModel(self.pipe, kwargs.get("max_sequence_length"))
        if "prompt_embeds" in kwargs:
            raise BadArgument("sharpfast.guard scores text prompts: pass prompt, not prompt_embeds")
        prompts = validate.prompts(prompt, "prompt")
        guidance = kwargs.get("guidance_scale", self._defaults["guidance_scale"])
        validate.guidance_scale(guidance, needs_cfg=not model.distilled)
        n = kwargs.get("num_images_per_prompt")
        n = 1 if n is None else validate.integer(n, "num_images_per_prompt")
        count = len(prompts) * n
        validate.generators(kwargs.get("generator"), count)
        kwargs = dict(kwargs)
        user_cb = kwargs.pop("callback_on_step_end", None)
        user_inputs = kwargs.pop("callback_on_step_end_tensor_inputs", None) or getattr(user_cb, "tensor_inputs", None)
        steps = kwargs.get("num_inference_steps") or self._defaults["num_inference_steps"]
        cap = {"model": model, "prompts": prompts, "n": n, "user_cb": user_cb, "added_s": 0.0,
               "size": self._size(model, kwargs),
               "threshold": self._auto_threshold(steps, guidance) if self._auto else self.threshold}

        def on_step_end(pipe, i, t, cb_kwargs):
            # the decision at the first step: scored here, outside the UNet's hook; a request
            # with a flagged prompt stops now and is generated once, from mixed noise
            if "decision" not in cap:
                cap["decision"] = self._decide(cap)
                if self.mitigation == "sail" and bool(cap["decision"]["flagged"].any()):
                    raise _Mitigate()
            return user_cb(pipe, i, t, cb_kwargs) if user_cb is not None else {}

        call = dict(kwargs, callback_on_step_end=on_step_end)
        if user_inputs is not None:
            call["callback_on_step_end_tensor_inputs"] = list(user_inputs)
        self._local.capture = cap
        try:
            with self._lock:
                if self.mitigation == "sail" and kwargs.get("latents") is None and kwargs.get("generator") is None:
                    # the global RNG: draw the noise pipe(...) would draw, so it can be reused
                    call["latents"] = model.noise(count, *self._size(model, kwargs))
                states = _generator_states(kwargs.get("generator"))
                try:
                    out = self.pipe(prompts, **call)
                except _Mitigate:
                    out = self._generate_mitigated(model, prompts, n, cap, call, states)
        finally:
            self._local.capture = None
        if "decision" not in cap:  # a pipeline that never called back: decide from the capture
            if "pred" not in cap:
                raise RuntimeError("the pipeline made no UNet call; nothing was scored")
            cap["decision"] = self._decide(cap)
        per_prompt, flagged = cap["decision"]["scores"], cap["decision"]["flagged"]
        mitigated = cap["mitigated"] = self.mitigation == "sail" and bool(flagged.any())
        report = [{"prompt": p, "score": float(s), "metric": self.metric, "flagged": bool(f),
                   "mitigated": bool(f) and mitigated} for p, s, f in zip(prompts, per_prompt, flagged)]
        if isinstance(out, tuple):  # return_dict=False: the pipeline's tuple, then the report
            return (*out, report), cap
        out.memorization = report
        return out, cap

    def _decide(self, cap) -> dict:
        """Per-prompt scores (mean over its images) and flags, from the captured first call."""
        if "pred" not in cap:
            raise RuntimeError("the pipeline made no UNet call; nothing was scored")
        prompts, n = cap["prompts"], cap["n"]
        start = time.perf_counter()
        per_prompt = self._score(cap).float().view(len(prompts), n).mean(dim=1).cpu()
        cap["added_s"] += time.perf_counter() - start
        bad = ~torch.isfinite(per_prompt)
        if bool(bad.any()):  # finite predictions, yet no finite score (an overflow in the metric)
            raise NonFiniteOutput(f"the {self.metric} score of prompt {prompts[int(bad.nonzero()[0])]!r} is not "
                                  f"finite")
        return {"scores": per_prompt, "flagged": per_prompt > cap["threshold"]}

    @staticmethod
    def _size(model, kwargs):
        dh, dw = model.default_size()
        return kwargs.get("height") or dh, kwargs.get("width") or dw

    def _generate_mitigated(self, model, prompts, n, cap, call, states):
        """SAIL's noise for the flagged rows, the request's own noise for the others, and ONE
        generation of the whole batch: the unflagged rows come out exactly as pipe(...) makes them."""
        from .mitigation import sail_latents

        gens = call.get("generator")
        _restore(gens, states)
        height, width = self._size(model, call)
        count = len(prompts) * n
        noise = call.get("latents")
        if noise is None:  # the draw prepare_latents made, which also advances the generators as it did
            noise = model.noise(count, height, width, gens)
        else:
            noise = noise.to(model.device)
        idx = cap["decision"]["flagged"].nonzero().view(-1).tolist()
        rows = [i * n + j for i in idx for j in range(n)]
        sub_gens = [gens[r] for r in rows] if isinstance(gens, list) else gens
        kw = {k: v for k, v in call.items()
              if k not in ("latents", "generator", "num_images_per_prompt", "callback_on_step_end",
                           "callback_on_step_end_tensor_inputs", "output_type", "return_dict")}
        inner_states = _generator_states(sub_gens)
        start = time.perf_counter()
        opt, info = sail_latents(self.pipe, [prompts[i] for i in idx], num_images_per_prompt=n, latents=noise[rows],
                              generator=sub_gens, **self.sail_kwargs, **kw)
        cap["added_s"] += time.perf_counter() - start
        cap["sail_steps"] = info["adam_steps"]
        _restore(sub_gens, inner_states)  # SAIL's extra candidates must not move the request's generators
        mixed = noise.clone()
        mixed[rows] = opt.to(mixed)
        final = {k: v for k, v in call.items() if k != "callback_on_step_end"}
        if cap["user_cb"] is not None:
            final["callback_on_step_end"] = cap["user_cb"]
        final["latents"] = mixed
        return self.pipe(prompts, **final)

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


def guard(pipe, *, metric: str = "wen", threshold="auto", mitigation="sail", sail_kwargs=None,
          name: str = "default") -> Guard:
    """Wrap a stock pipeline for serving: guard(pipe)(prompt, **pipe_kwargs) returns pipe's output with
    `.memorization` (per prompt: score, flagged, mitigated). threshold="auto" uses the model's
    calibration at each request's num_inference_steps and guidance_scale (calibration.json beside
    it, the per-user cache, or calibrated once on the built-in generic captions: see
    sharpfast.calibration; `guarded.threshold_source` says which); else pass a number.
    sail_kwargs go to sharpfast.sail for flagged prompts; without a "threshold" there, SAIL stops at
    the model's calibrated target (threshold="auto" of sail).
    `guarded.stats` counts requests, flags, mitigations and latencies; `guarded.register_prometheus()`
    exports them (series labelled guard=name)."""
    return Guard(pipe, metric, threshold, mitigation, sail_kwargs, name)
