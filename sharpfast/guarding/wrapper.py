"""sharpfast.guard: score every request from the CFG batch the pipeline computes anyway.

    guarded = sharpfast.guard(pipe, metric="wen", threshold=...)
    out = guarded(prompts, generator=g, ...)          # pipe's own output, plus out.memorization
    guarded.remove()                                   # or: with sharpfast.guard(pipe) as guarded: ...

A forward hook on pipe.unet (pipe.transformer for SD3 / Flux) captures the first call of each
guarded request (its CFG batch [null; cond]; Flux, guidance-distilled, has only the conditional
rows, and its null branch costs one extra call on them) into that request's own state
(thread-local: requests on other threads never see
it); after the call, every image is scored from the capture with the metric registry of
sharpfast.scores, the same function detect uses: metric="wen" costs no extra UNet call,
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
from typing import Any, Literal, Optional

import torch

from ..adapters import ScoreModel, denoiser, pipeline_defaults
from ..errors import UsageError
from ..mitigations.hooks import DenoiserHook, HookRegistry, prediction_of
from ..monitoring import GuardStats
from .config import DEFAULT_METRIC, DEFAULT_MITIGATION, GuardConfig
from .regenerate import generator_states, mitigate_all, regenerate_flagged
from .request import FlaggedAtFirstStep, new_request
from .thresholds import Thresholds

log = logging.getLogger("sharpfast.guard")

# One lock per pipeline object, shared by every guard on it. A diffusers pipeline call is not
# thread-safe: measured here, 4 threads calling one StableDiffusionPipeline raised shape errors
# from its text encoding (the fast tokenizer's padding state is shared) within 30 rounds. So the
# pipeline's own work (generation, SAIL's re-generation and its prompt encoding) runs one request
# at a time; capturing is per thread and scoring runs outside the lock.
_PIPE_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PIPE_LOCKS_GUARD = threading.Lock()


def pipeline_lock(pipe: Any) -> threading.RLock:
    """The one lock of a pipeline object, shared by every guard on it."""
    with _PIPE_LOCKS_GUARD:
        lock = _PIPE_LOCKS.get(pipe)
        if lock is None:
            lock = _PIPE_LOCKS[pipe] = threading.RLock()
        return lock



class CaptureHook(DenoiserHook):
    """The guard's hook on the denoiser: in a guarded request (its state on this thread), capture
    the first call and watch every call for NaN/inf; it never changes an output."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def post_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Capture / watch (nothing outside a guarded request)."""
        req = getattr(self.guard._local, "request", None)
        if req is not None:
            pred = prediction_of(output)
            req.note_finite(pred.detach())
            if req.capture is None:
                req.capture_call(args, kwargs, pred, self.guard.pipe.scheduler)


class Guard:
    """A stock pipeline wrapped for serving; see sharpfast.guard."""

    def __init__(self, pipe: Any, config: GuardConfig, model: Optional[ScoreModel] = None) -> None:
        self.pipe, self.config = pipe, config
        self.metric, self.mitigation, self.method, self.setting = (config.metric, config.mitigation, config.method,
                                                                   config.setting)
        self._thresholds = Thresholds(pipe, config.metric, config.threshold, pipeline_defaults(pipe),
                                       (model or ScoreModel(pipe)).default_size(), config.calibrate_new)
        self._local = threading.local()  # per-request state: one per thread
        self._stats = GuardStats(config.name, config.metric, None if config.threshold == "auto" else config.threshold)
        self._lock = pipeline_lock(pipe)
        self._capture: Optional[CaptureHook] = CaptureHook(self)
        HookRegistry.of(denoiser(pipe)).add(self._capture)
        log.info("sharpfast.guard: %s > %s, mitigation %s, policy %s (%s)", config.metric, config.threshold,
                 config.mitigation, config.policy.text(), config.policy_source)

    @property
    def threshold(self) -> float:
        """The policy's gate cut (requests flag above it) at the default settings, calibrated on first use."""
        return self._thresholds.at(share=self.config.policy.threshold_share)

    @property
    def threshold_source(self) -> str:
        """Where that threshold came from ("given", a calibration file, the cache, calibrated now)."""
        return self._thresholds.source(share=self.config.policy.threshold_share)

    def calibrate(self, num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                  height: Optional[int] = None, width: Optional[int] = None) -> float:
        """Resolve the threshold and every cut the policy reads (tiers, the median of a multiple
        tier) at these request settings now (default: the pipeline's), so no request waits for
        them; with calibrate_new=False, the settings the guard serves.

        Returns:
            The threshold the guard flags above at those settings.
        """
        size = None if height is None and width is None else self._thresholds.size(height, width)
        for share in [*self.config.policy.calibrated_shares(), self.config.policy.threshold_share]:  # threshold last
            value = self._thresholds.at(num_inference_steps, guidance_scale, size, allow_new=True, share=share)
        return value

    def served_settings(self) -> list:
        """The (num_inference_steps, guidance_scale, height, width) the guard has thresholds for."""
        return self._thresholds.settings()

    @property
    def installed(self) -> bool:
        """Whether the guard's hook is on the denoiser (False after remove())."""
        return self._capture is not None

    def __call__(self, prompt: Any, **kwargs: Any) -> Any:
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

    def register_prometheus(self, registry=None) -> Any:
        """Export the stats through prometheus_client (into `registry`, default its global one);
        returns the collector (registry.unregister(it) takes it off)."""
        if registry is None:
            from prometheus_client import REGISTRY as registry  # noqa: N811 (collector() names the extra)
        collector = self._stats.collector()
        registry.register(collector)
        return collector

    def _call(self, prompt: Any, kwargs: Any) -> tuple:
        if self._capture is None:
            raise UsageError("this guard was removed; create a new one with sharpfast.guard(pipe)")
        req = new_request(self.pipe, self._thresholds, prompt, kwargs, self.config.policy, self.setting)
        call = req.take_callback(dict(kwargs))
        upfront = self.config.upfront
        call["callback_on_step_end"] = req.step_callback(self.metric,
                                                         stop_if_flagged=self.method is not None and not upfront)
        self._local.request = req
        try:
            with self._lock:
                if self.method is not None and call.get("latents") is None and call.get("generator") is None:
                    call["latents"] = req.model.noise(req.images, *req.size)  # the global RNG's draw, reusable
                states = generator_states(call.get("generator"))
                try:
                    out = (mitigate_all(self.pipe, self.config, req, call) if upfront
                           else self.pipe(req.prompts, **call))
                except FlaggedAtFirstStep:
                    out = regenerate_flagged(self.pipe, self.config, req, call, states)
                req.decision = req.decision or req.decide(self.metric)  # no callback came (locked: see decide)
            req.check_finite()
        finally:
            self._local.request = None
        report = req.report(self.metric, self.mitigation)
        if isinstance(out, tuple):  # return_dict=False: the pipeline's tuple, then the report
            return (*out, report), req
        out.memorization = report
        return out, req

    def remove(self) -> None:
        """Take the hook off pipe.unet / pipe.transformer: the pipeline is exactly as before."""
        if self._capture is not None:
            HookRegistry.of(denoiser(self.pipe)).remove(self._capture)
            self._capture = None

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        self.remove()
        return False


def guard(pipe: Any, *, metric: str = DEFAULT_METRIC, threshold: str = "auto",
          mitigation: Optional[str] = DEFAULT_MITIGATION, setting: Any = None, sail_kwargs=None, name: str = "default",
          calibrate_new: bool = True, policy: Any = None) -> Guard:
    """Wrap a stock pipeline for serving.

    guard(pipe)(prompt, **pipe_kwargs) returns pipe's own output with `.memorization`: per prompt
    its score, the threshold, flagged, mitigated, the mitigation and its check. A prompt is
    `mitigated: True` only when the mitigation ran on it and passed the check the report states:
    for noise methods (sail, sail_guard, sail+transition) the guard's own metric at the new initial
    noise is under the guard's threshold (SAIL stops on that metric and threshold); for trajectory
    methods (transition, attention_rescale, zhao_guard) the method was applied to its images.
    Otherwise `mitigated: False` and `check` says why; both are counted in `guarded.stats`.

    Args:
        pipe: a supported diffusers pipeline; it stays the user's object (remove() takes the hook off).
        metric: the registry metric scored at the first step (sharpfast.scores.REGISTRY), or
            "wen_low@n": wen_low averaged over n probe noises (one call on n times the rows).
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
        policy: which prompts are mitigated and how strongly (sharpfast.guarding.Policy, or its
            text): a gate as the share of the model's normal captions mitigated ("0.3": the cut
            above which 30% of them score, from the model's calibration), "always", and tiers
            that raise the setting further above it ("0.3,0.01:s0t300"; "0.01:s1.25t0,x3:s1t500g0.5":
            above 3 times the gate's margin over the normal captions' median). Default: the gate at
            the calibrated false-positive rate (1%). Each report says the decision and why.

    Returns:
        A Guard: call it as the pipeline; `.stats`, `.register_prometheus()`, `.remove()`.

    Raises:
        BadArgument: an unknown metric or mitigation, a NaN threshold.
        UnsupportedPipeline: the pipeline, or the mitigation for its family, is not supported.
        NotCalibrated: (at a call) a setting not calibrated before, with calibrate_new=False.
    """
    model = ScoreModel(pipe)  # raises UnsupportedPipeline now, not at the first request
    return Guard(pipe, GuardConfig.build(model, metric, threshold, mitigation, setting, sail_kwargs, name,
                                         calibrate_new, policy), model)
