"""sharpfast.guard (this module: serving): score every request from the CFG batch the pipeline computes anyway.

    guarded = sharpfast.guard(pipe, metric="wen", threshold=...)
    out = guarded(prompts, generator=g, ...)          # pipe's own output, plus out.memorization
    guarded.remove()                                   # or: with sharpfast.guard(pipe) as guarded: ...

A forward hook on pipe.unet captures the first UNet call of each guarded request (its CFG batch
[null; cond]) into that request's own state (thread-local: requests on other threads never see
it); after the call, every image is scored from the capture with the metric registry of
sharpfast.metrics, the same function detect uses: metric="wen" costs no extra UNet call,
"sharpness" one extra CFG call at that step (the finite difference of sharpfast.detect), made
outside the UNet's own hook. The hook never changes a UNet output, so the images of prompts that
are not flagged are exactly those of pipe(...). Flagged prompts are regenerated with sharpfast.sail from the same initial noise
(mitigation="sail") or only reported (mitigation=None).
"""
from __future__ import annotations

import threading
import weakref

import torch

from . import validate
from .errors import BadArgument, MissingCalibration, NonFiniteOutput
from .metrics import REGISTRY, Step
from .score import Conditioning, ScoreModel

GUARD_METRICS = tuple(REGISTRY)  # costs: REGISTRY[name].cost (wen and score_norm: no extra UNet call)

# One lock per pipeline object, shared by every guard on it. A diffusers pipeline call is not
# thread-safe: measured here, 4 threads calling one StableDiffusionPipeline raised shape errors
# from its text encoding (the fast tokenizer's padding state is shared) within 30 rounds. So the
# pipeline's own work (generation, SAIL's re-generation and its prompt encoding) runs one request
# at a time; capturing is per thread and scoring runs outside the lock.
_PIPE_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PIPE_LOCKS_GUARD = threading.Lock()


def pipeline_lock(pipe) -> threading.RLock:
    with _PIPE_LOCKS_GUARD:
        lock = _PIPE_LOCKS.get(pipe)
        if lock is None:
            lock = _PIPE_LOCKS[pipe] = threading.RLock()
        return lock


class Guard:
    """A stock pipeline wrapped for serving; see sharpfast.guard."""

    def __init__(self, pipe, metric="wen", threshold="auto", mitigation="sail", sail_kwargs=None):
        ScoreModel(pipe)  # raises UnsupportedPipeline now, not at the first request
        if metric not in GUARD_METRICS:
            raise BadArgument(f"metric must be one of {GUARD_METRICS}, got {metric!r}")
        if mitigation not in ("sail", None):
            raise BadArgument(f"mitigation must be 'sail' or None, got {mitigation!r}")
        if threshold == "auto":
            from .mitigation import shipped_threshold

            threshold = shipped_threshold(pipe, metric)
            if threshold is None:
                raise MissingCalibration(f"threshold='auto' needs the model's calibration.json; pass threshold=<float> "
                                 f"(sharpfast.calibrate on the {metric} scores of normal prompts)")
        # +inf is allowed (score only, never flag); NaN would silently flag nothing
        threshold = validate.finite(threshold, "threshold", allow_inf=True)
        self.pipe, self.metric, self.threshold, self.mitigation = pipe, metric, threshold, mitigation
        self.sail_kwargs = dict(sail_kwargs or {})
        if mitigation == "sail" and "threshold" not in self.sail_kwargs:
            from .mitigation import shipped_threshold

            # SAIL's own "auto" (the model's shipped target), checked now rather than at the first flagged request
            if shipped_threshold(pipe, key="target") is None:
                raise MissingCalibration("mitigation='sail' needs SAIL's stopping level: the model has no calibration.json "
                                 "with sharpness/target; pass sail_kwargs={'threshold': <float>} (e.g. "
                                 "sharpfast.calibrate(sharpness of normal prompts, fpr=0.9)) or mitigation=None")
        self._local = threading.local()  # per-request capture: one per thread
        self._lock = pipeline_lock(pipe)
        self._handle = pipe.unet.register_forward_hook(self._hook, with_kwargs=True)

    # -- the hook: capture only ---------------------------------------------------------------
    def _hook(self, unet, args, kwargs, output):
        cap = getattr(self._local, "capture", None)
        if cap is None or "pred" in cap:  # not a guarded request, or its first call is captured
            return None
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        pred = output[0] if isinstance(output, tuple) else output.sample
        if sample.shape[0] % 2:
            raise RuntimeError("sharpfast.guard expects the CFG batch [null; cond]: call with guidance_scale > 1")
        # alpha_bar now: Euler-type schedulers read it from their step index, which moves on
        cap.update(sample=sample.detach(), t=t, pred=pred.detach(), hidden=kwargs["encoder_hidden_states"].detach(),
                   added=kwargs.get("added_cond_kwargs"), alpha_bar=cap["model"].alpha_bar(self.pipe.scheduler, t))
        return None

    def _score(self, cap):
        """The metric of every image of the captured CFG batch (outside the hook)."""
        split = lambda d, i: None if d is None else {k: v.chunk(2)[i] for k, v in d.items()}  # noqa: E731
        hidden, added = cap["hidden"], cap["added"]
        cond = Conditioning(hidden.chunk(2)[1], hidden.chunk(2)[0], split(added, 1), split(added, 0))
        u, c = cap["pred"].chunk(2)
        step = Step(cap["model"], cap["sample"].chunk(2)[1], cap["t"], cap["alpha_bar"], cond, u, c,
                    names=cap["prompts"], n=cap["n"])
        step.check(u, "null branch at the first step")  # NaN > threshold is False: it would pass unflagged
        step.check(c, "conditional branch at the first step")
        with torch.no_grad():
            return REGISTRY[self.metric].fn(step)

    # -- serving -------------------------------------------------------------------------------
    def __call__(self, prompt, **kwargs):
        if self._handle is None:
            raise RuntimeError("this guard was removed; create a new one with sharpfast.guard(pipe)")
        model = ScoreModel(self.pipe)  # per request: the pipeline may have moved since the guard was made
        if "prompt_embeds" in kwargs:
            raise BadArgument("sharpfast.guard scores text prompts: pass prompt, not prompt_embeds")
        prompts = validate.prompts(prompt, "prompt")
        validate.guidance_scale(kwargs.get("guidance_scale", 7.5), needs_cfg=True)
        n = kwargs.get("num_images_per_prompt")
        n = 1 if n is None else validate.integer(n, "num_images_per_prompt")
        validate.generators(kwargs.get("generator"), len(prompts) * n)
        noise = None
        if self.mitigation == "sail":
            noise = self._noise(model, len(prompts) * n, kwargs)
        self._local.capture = cap = {"model": model, "prompts": prompts, "n": n}
        try:
            with self._lock:
                out = self.pipe(prompts, **kwargs)
        finally:
            self._local.capture = None
        if "pred" not in cap:
            raise RuntimeError("the pipeline made no UNet call; nothing was scored")
        scores = self._score(cap)
        per_prompt = scores.float().view(len(prompts), n).mean(dim=1).cpu()
        bad = ~torch.isfinite(per_prompt)
        if bool(bad.any()):  # finite predictions, yet no finite score (an overflow in the metric)
            raise NonFiniteOutput(f"the {self.metric} score of prompt {prompts[int(bad.nonzero()[0])]!r} is not "
                                  f"finite")
        flagged = per_prompt > self.threshold
        report = [{"prompt": p, "score": float(s), "metric": self.metric, "flagged": bool(f), "mitigated": False}
                  for p, s, f in zip(prompts, per_prompt, flagged)]
        if self.mitigation == "sail" and bool(flagged.any()):
            with self._lock:
                self._mitigate(out, prompts, n, flagged, noise, kwargs, report)
        out.memorization = report
        return out

    def _noise(self, model, count, kwargs):
        """The noise pipe(...) will draw (the user's latents, or a draw from a copy of the generator state)."""
        if kwargs.get("latents") is not None:
            return kwargs["latents"].detach().clone()
        g = kwargs.get("generator")
        if g is None:
            return None  # the pipeline draws from the global RNG: mitigation draws afresh
        gens = g if isinstance(g, list) else [g]
        states = [x.get_state() for x in gens]
        dh, dw = model.default_size()
        try:
            return model.noise(count, kwargs.get("height") or dh, kwargs.get("width") or dw, g)
        finally:
            for x, s in zip(gens, states):
                x.set_state(s)

    def _mitigate(self, out, prompts, n, flagged, noise, kwargs, report):
        from .mitigation import sail

        idx = flagged.nonzero().view(-1).tolist()
        rows = [i * n + j for i in idx for j in range(n)]
        kw = {k: v for k, v in kwargs.items() if k not in ("latents", "generator", "num_images_per_prompt")}
        lat = noise[rows] if noise is not None else None
        gen = kwargs.get("generator")
        if isinstance(gen, list):
            gen = [gen[r] for r in rows]
        res = sail(self.pipe, [prompts[i] for i in idx], num_images_per_prompt=n, latents=lat, generator=gen,
                   **self.sail_kwargs, **kw)
        for k, r in enumerate(rows):
            out.images[r] = res.images[k]
        for i in idx:
            report[i]["mitigated"] = True

    # -- lifetime -------------------------------------------------------------------------------
    def remove(self) -> None:
        """Take the hook off pipe.unet: the pipeline is exactly as before."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def guard(pipe, *, metric: str = "wen", threshold="auto", mitigation="sail", sail_kwargs=None) -> Guard:
    """Wrap a stock pipeline for serving: guard(pipe)(prompt, **pipe_kwargs) returns pipe's output with
    `.memorization` (per prompt: score, flagged, mitigated). threshold="auto" uses the model's shipped
    calibration (calibration.json beside it); else pass a number from sharpfast.calibrate.
    sail_kwargs go to sharpfast.sail for flagged prompts; without a "threshold" there, SAIL stops at
    the model's shipped target (threshold="auto" of sail), and a model without one is refused here."""
    return Guard(pipe, metric, threshold, mitigation, sail_kwargs)
