"""The state of one guarded request: its settings checked before the pipeline runs, the capture
of its first denoiser call, the decision (per-prompt scores and flags), the NaN/inf watch, the
step callbacks chained before the user's own, and its report."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .. import mitigations, validate
from ..adapters import ScoreModel
from ..errors import BadArgument, NonFiniteOutput, UsageError
from ..mitigations.hooks import HookRegistry
from ..scores import REGISTRY, Step
from .policy import DEFAULT_POLICY, Policy
from .thresholds import Thresholds

NOT_SELECTED = "not selected by the policy"  # the check of a prompt the policy left alone


class FlaggedAtFirstStep(Exception):
    """Raised from the step callback: the request holds a flagged prompt; stop after step 1."""


@dataclass
class RequestState:
    """The state of one guarded request (one per call, on its own thread)."""

    model: ScoreModel
    prompts: list
    n: int
    size: tuple[int, int]
    threshold: float
    guidance: float
    steps: int
    threshold_source: str = "given"
    user_cb: Optional[Callable[..., dict]] = None
    added_s: float = 0.0
    capture: Optional[tuple] = None  # the first call: (sample, t, pred, hidden, added) from model.read_call
    alpha_bar: float = 0.0
    schedule: object = None
    # per image: NaN/inf seen in any call of the request (kept on the device: no sync per step)
    bad: Optional[torch.Tensor] = None
    decision: Optional[dict] = None
    reports: Optional[list] = None  # per prompt: (mitigated, check) of the mitigation
    sail_steps: Optional[int] = None
    policy: Policy = DEFAULT_POLICY
    cuts: Optional[dict] = None  # {share of normal captions: the score cut there} the policy reads
    setting: Any = None  # the guard's own setting of its mitigation (a tier may raise it)
    on_decision: Optional[Callable[[dict, float], None]] = None  # called with the decision and step 1's t

    @property
    def images(self) -> int:
        """Images of the request: prompts x num_images_per_prompt."""
        return len(self.prompts) * self.n

    def note_finite(self, pred: torch.Tensor) -> None:
        """Note which images' rows of a call hold NaN/inf (kept on the device)."""
        rows = pred.shape[0]
        if rows % self.images:
            return
        ok = torch.isfinite(pred.reshape(rows, -1)).all(dim=1).view(-1, self.images).all(dim=0)
        self.bad = ~ok if self.bad is None else self.bad | ~ok

    def check_finite(self) -> None:
        """NonFiniteOutput naming the first prompt whose images met NaN/inf."""
        if self.bad is not None and bool(self.bad.any()):
            i = int(self.bad.nonzero()[0]) // self.n
            raise NonFiniteOutput(f"the denoiser returned NaN/inf during the guarded generation of prompt "
                                  f"{self.prompts[i]!r}")

    def capture_call(self, args: Any, kwargs: Any, pred: torch.Tensor, scheduler) -> None:
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
        # under "always" the mitigation's hooks are on from the first step: the score must read the
        # model, not the mitigated model. Hooks that edit outputs run after the capture (it saw the
        # model's own), and stand aside for the metric's own calls (wen_low's low-noise call,
        # sharpness's second); a method that edits the layers (attention) made the captured call
        # itself, so the first step is predicted again, unedited (one extra CFG call, only then).
        # Standing aside changes hooks on the shared network: the caller holds the pipeline's lock.
        registry = HookRegistry.of(self.model.unet)
        edited = registry.edits_inside()
        with torch.no_grad(), registry.unedited():
            if edited:
                u, c = self.model.predict(x, t, cond)
            step = Step(self.model, x, t, self.alpha_bar, cond, u, c, names=self.prompts, n=self.n,
                        schedule=self.schedule)
            step.check(u, "null branch at the first step")  # NaN > threshold is False: it would pass unflagged
            step.check(c, "conditional branch at the first step")
            scores = REGISTRY[metric].fn(step).float().view(len(self.prompts), self.n).mean(dim=1).cpu()
        self.added_s += time.perf_counter() - start
        bad = ~torch.isfinite(scores)
        if bool(bad.any()):  # finite predictions, yet no finite score (an overflow in the metric)
            raise NonFiniteOutput(f"the {metric} score of prompt {self.prompts[int(bad.nonzero()[0])]!r} is not finite")
        cuts = dict(self.cuts or {})
        if not self.policy.always:
            cuts[float(self.policy.gate)] = self.threshold
        picks = [self.policy.decide(float(v), cuts, self.setting) for v in scores.tolist()]
        # flagged: the detector's verdict at the threshold the report states; selected: the policy's
        # choice (the same under a gate; under "always" every prompt is selected, not every one flagged)
        return {"scores": scores, "flagged": scores > self.threshold,
                "selected": torch.tensor([m for m, _, _ in picks], dtype=torch.bool),
                "settings": [st for _, st, _ in picks], "why": [w for _, _, w in picks]}

    def report(self, metric: str, mitigation: Any) -> list:
        """The per-prompt report the guard attaches to the output."""
        d = self.decision
        assert d is not None, "report() before decide()"
        reports = self.reports or [(False, NOT_SELECTED if not f else "report only (mitigation=None)")
                                   for f in d["selected"].tolist()]
        return [{"prompt": p, "score": float(s), "metric": metric, "threshold": self.threshold,
                 "threshold_source": self.threshold_source, "flagged": bool(f),
                 "selected": bool(sel), "mitigated": bool(sel) and m, "mitigation": mitigation if sel else None,
                 "setting": st if sel and mitigation is not None else None, "policy": self.policy.text(),
                 "decision": why, "check": c}
                for p, s, f, sel, (m, c), st, why in zip(self.prompts, d["scores"], d["flagged"], d["selected"],
                                                         reports, d["settings"], d["why"])]

    def take_callback(self, call: dict) -> dict:
        """Take the user's step callback out of the call (it is chained after the guard's own)."""
        self.user_cb = call.pop("callback_on_step_end", None)
        inputs = call.pop("callback_on_step_end_tensor_inputs", None) or getattr(self.user_cb, "tensor_inputs", None)
        call["callback_on_step_end_tensor_inputs"] = list(dict.fromkeys([*(inputs or ["latents"]), "latents"]))
        return call

    def watch_callback(self) -> Callable[..., dict]:
        """A step callback that watches the latents for NaN/inf (the sampler's own arithmetic, a
        huge guidance), then runs the user's."""
        def watch(pipe: Any, i: int, t: Any, cb_kwargs: dict) -> dict:
            self.note_finite(cb_kwargs["latents"].detach())
            return self.user_cb(pipe, i, t, cb_kwargs) if self.user_cb is not None else {}
        return watch

    def step_callback(self, metric: str, stop_if_flagged: bool) -> Callable[..., dict]:
        """watch_callback, plus the decision at the first step (outside the denoiser's hook): a
        request with a flagged prompt stops there (FlaggedAtFirstStep) when it is to be mitigated."""
        def on_step_end(pipe: Any, i: int, t: Any, cb_kwargs: dict) -> dict:
            self.note_finite(cb_kwargs["latents"].detach())  # once per step, also before a FlaggedAtFirstStep
            if self.decision is None:
                self.decision = self.decide(metric)
                if stop_if_flagged and bool(self.decision["selected"].any()):
                    raise FlaggedAtFirstStep()
                if self.on_decision is not None:  # an online switch (mitigate_all with tiers); it may
                    self.on_decision(self.decision, float(t))  # raise FlaggedAtFirstStep itself
            return self.user_cb(pipe, i, t, cb_kwargs) if self.user_cb is not None else {}
        return on_step_end

    def context(self, pipe: Any, noise, generator: Any, metric: str,
                prompts: Optional[list] = None) -> mitigations.Context:
        """The mitigation context of the flagged rows (or of those of `prompts`, indices)."""
        if prompts is None:
            assert self.decision is not None, "context() before decide()"
            prompts = self.decision["selected"].nonzero().view(-1).tolist()
        rows = [i * self.n + j for i in prompts for j in range(self.n)]
        return mitigations.Context(pipe, self.model, self.prompts, self.n, noise, self.size[0], self.size[1],
                                   self.steps, self.guidance, generator, rows=rows,
                                   guard={"metric": metric, "threshold": self.threshold})


def new_request(pipe: Any, thresholds: Thresholds, prompt: Any, kwargs: Any, policy: Policy = DEFAULT_POLICY,
                setting: Any = None) -> RequestState:
    """The request's state, every argument checked before the pipeline runs (the policy's cuts
    at the request's settings resolved too)."""
    model = ScoreModel(pipe, kwargs.get("max_sequence_length"))  # per request: the pipeline may have moved
    if "prompt_embeds" in kwargs:
        raise BadArgument("sharpfast.guard scores text prompts: pass prompt, not prompt_embeds")
    prompts = validate.prompts(prompt, "prompt")
    st = model.resolve(needs_cfg=True, **kwargs)
    guidance, n, steps = st.guidance_scale, st.num_images_per_prompt, st.num_inference_steps
    size = (st.height, st.width)
    validate.generators(kwargs.get("generator"), len(prompts) * n)
    validate.latents(kwargs.get("latents"), (len(prompts) * n, *model.latent_shape(*size)), size)
    gate = policy.threshold_share
    threshold = thresholds.at(steps, guidance, size, share=gate)
    cuts = {share: thresholds.at(steps, guidance, size, share=share)
            for share in policy.calibrated_shares() if share != gate}  # the gate's own: the threshold
    source = thresholds.source(steps, guidance, size, share=gate)
    if gate is not None:
        source = f"the cut of {gate:g} of normal captions; {source}"
    return RequestState(model, prompts, n, size, threshold, guidance, steps, threshold_source=source,
                        policy=policy, cuts=cuts, setting=setting)

