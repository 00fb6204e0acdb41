"""The SAIL family in the registry: `sail` (the paper's objective, our loop and defaults),
`sail_alpha` (the paper's alpha ||x||^2 term instead of the projection), `sail_reference` (the
authors' loss and loop), `sail_guard` (ours: SAIL that stops on the serving guard's metric and
threshold) and `sail+transition` (SAIL's noise, then the transition schedule). Each is a noise
method the serving guard may run (guard_plan: it stops on the guard's metric)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..errors import BadArgument
from .base import GUARD_METRIC, Context, MethodConfig, Plan, register
from .grammar import parse
from .transition import TransitionConfig, transition_plan


def sail_plan(ctx: Context, options: dict, stop: Optional[dict] = None) -> Plan:
    """SAIL's optimized initial noise for ctx's rows (whole prompts), the other rows as they were."""
    from .sail import sail_latents

    rows = ctx.row_list()
    n = ctx.n
    by_prompt = sorted({r // n for r in rows})
    if [r for p in by_prompt for r in range(p * n, p * n + n)] != rows:
        raise BadArgument("SAIL mitigates whole prompts: rows must hold every image of each prompt they name")
    gens = ctx.generator
    sub_gens = [gens[r] for r in rows] if isinstance(gens, list) else gens
    kw: dict = dict(num_inference_steps=ctx.num_inference_steps, guidance_scale=ctx.guidance_scale,
                    height=ctx.height, width=ctx.width)
    opt, info = sail_latents(ctx.pipe, [ctx.prompts[p] for p in by_prompt], num_images_per_prompt=n,
                             latents=ctx.latents[rows], generator=sub_gens, stop=stop, **options, **kw)
    mixed = ctx.latents.clone()
    mixed[rows] = opt.to(mixed)
    # what the guard checks of a noise method: the new noise's statistic per image, the optimizer's steps
    names = (("final_statistic", "noise_statistic"), ("adam_steps", "optimizer_steps"))
    checked = {new: info[old] for old, new in names if old in info}
    return Plan({"latents": mixed},
                info={"sail": info, "unet_calls_before": info["unet_calls_optimization"], **checked})


@dataclass(frozen=True)
class SailConfig(MethodConfig):
    """SAIL's knobs: candidates k, Adam steps s, lr (each None: sail's default for its objective,
    sharpfast.settings.SAIL_DEFAULTS), instead of the projection onto the Gaussian shell the
    paper's alpha ||x||^2 term (None: the projection), and any other keyword of sail_latents."""

    candidates: Optional[int] = None
    max_steps: Optional[int] = None
    lr: Optional[float] = None
    alpha: Optional[float] = None
    project: Optional[bool] = None  # the projection onto the Gaussian shell (the grammar: off with alpha)
    extra: tuple = ()  # (name, value) pairs of sail_latents' other keywords

    @classmethod
    def from_setting(cls, setting: Any) -> SailConfig:
        """"k1s3lr0.7" (lr optional), "k1s3lr0.7a3e-5" (alpha); a dict of sail_latents' keywords; a
        config."""
        if isinstance(setting, cls):
            return setting
        if isinstance(setting, dict):
            own = ("candidates", "max_steps", "lr", "alpha", "project")
            return cls(**{k: setting.get(k) for k in own},
                       extra=tuple((k, v) for k, v in setting.items() if k not in own))
        got = parse(setting, {"k": int, "s": int, "lr": float, "a": float}, required=("k", "s"),
                    name="SAIL",
                    example="k1s3lr0.7 (1 candidate, 3 Adam steps, lr 0.7; lr optional) or k1s3lr0.7a1e-4 (alpha "
                            "||x||^2 instead of the projection)")
        return cls(got["k"], got["s"], got.get("lr"), got.get("a"), False if "a" in got else None)

    def options(self) -> dict:
        """sail_latents' keywords."""
        out: dict = {k: v for k, v in (("candidates", self.candidates), ("max_steps", self.max_steps),
                                       ("lr", self.lr), ("alpha", self.alpha), ("project", self.project))
                     if v is not None}
        return {**out, **dict(self.extra)}


def sail_setting(setting: Any) -> dict:
    """sail_latents' keywords of a SAIL setting ("k1s3lr0.7", a dict of SailConfig's fields, a config)."""
    return SailConfig.from_setting(setting).options()


@dataclass(frozen=True)
class SailGuardConfig(MethodConfig):
    """sail_guard's knob: stop once the guard's metric is under margin x its threshold."""

    margin: float = 1.0

    @classmethod
    def from_setting(cls, setting: Any) -> SailGuardConfig:
        """A number (or its text), None (the default) or a config."""
        return cls.from_number(1.0 if setting is None else setting, "sail_guard's setting (margin)")


def _stop_on_guard(ctx: Context, setting: Any, sail_kwargs: dict, stop: dict) -> Plan:
    """In the guard: SAIL at the setting's options (a margin for sail_guard), stopping on the guard's metric."""
    return sail_plan(ctx, {**sail_setting(setting), **sail_kwargs}, stop=stop)


def _guard_default(ctx: Context, setting: Any, sail_kwargs: dict, stop: dict) -> Plan:
    """In the guard: SAIL at its defaults (and the guard's sail_kwargs), stopping on the guard's metric."""
    return sail_plan(ctx, dict(sail_kwargs), stop=stop)


@register("sail", cost="2 CFG calls per evaluation, (s + 1) evaluations and s backwards at most (s Adam steps)",
          knob="candidates k, Adam steps s, lr (default k1 s3 lr 0.7)", default="k1s3",
          sweep=("k4s2lr0.05", "k1s1", "k1s2", "k1s3lr0.3", "k1s3lr0.5", "k1s3", "k1s3lr1"),
          kind="noise", guard_plan=_guard_default, config=SailConfig)
def _sail(ctx: Context, setting: Any) -> Plan:
    return sail_plan(ctx, sail_setting(setting))


@register("sail_alpha", cost="as sail", knob="alpha of the paper's norm term (k1 s3 lr 0.7, no projection)",
          default="k1s3a3e-5", sweep=("k1s3a0", "k1s3a1e-5", "k1s3a3e-5", "k1s3a1e-4", "k1s3a3e-4"),
          kind="noise", guard_plan=_stop_on_guard, config=SailConfig)
def _sail_alpha(ctx: Context, setting: Any) -> Plan:
    return sail_plan(ctx, sail_setting(setting))


@register("sail_reference", cost="3 CFG calls per Adam step x k candidates (their loss), 10 steps",
          knob="the authors' loss, no early exit; lr (default 0.05)", default="k8s10",
          sweep=("k8s10", "k8s10lr0.1", "k8s10lr0.3", "k8s10lr0.7", "k8s10lr1"), kind="noise",
          config=SailConfig)
def _sail_reference(ctx: Context, setting: Any) -> Plan:
    # every candidate through all steps (no early exit, one round): what bench_sail times as the reference loop
    kw = {"lr": 0.05, **sail_setting(setting)}
    return sail_plan(ctx, {"objective": "reference", "max_rounds": 1, "threshold": -1e30, **kw})




def _guard_stop(ctx: Context, margin: float) -> Optional[dict]:
    if ctx.guard is None:
        return None
    return {"metric": ctx.guard["metric"], "threshold": float(ctx.guard["threshold"]) * margin}


def _margin(setting: Any) -> float:
    return SailGuardConfig.from_setting(setting).margin


def _sail_guard_in_guard(ctx: Context, setting: Any, sail_kwargs: dict, stop: dict) -> Plan:
    """In the guard: stop under margin x the guard's threshold."""
    return sail_plan(ctx, dict(sail_kwargs), stop={**stop, "threshold": stop["threshold"] * _margin(setting)})


@register("sail_guard", cost="as sail (+ the guard metric's own calls per evaluation)",
          knob="margin: stop once the guard's metric is under margin x its threshold (k1 s3 lr 0.7)",
          default=1.0, sweep=(1.0, 0.8, 0.6, 0.4), kind="noise", guard_plan=_sail_guard_in_guard,
          config=SailGuardConfig)
def _sail_guard(ctx: Context, setting: Any) -> Plan:
    margin = _margin(setting)
    stop = _guard_stop(ctx, margin)
    if stop is None:  # outside the guard: the metric it serves with by default, at its calibrated threshold
        from ..calibration import resolve

        found = resolve(ctx.pipe, GUARD_METRIC, "threshold", num_inference_steps=ctx.num_inference_steps,
                        guidance_scale=ctx.guidance_scale, height=ctx.height, width=ctx.width)
        stop = {"metric": GUARD_METRIC, "threshold": found.value * margin}
    return sail_plan(ctx, {}, stop=stop)


def _sail_transition_in_guard(ctx: Context, setting: Any, sail_kwargs: dict, stop: dict) -> Plan:
    """In the guard: SAIL stopping on the guard's metric, then the transition schedule."""
    return sail_plan(ctx, dict(sail_kwargs), stop=stop).merge(transition_plan(ctx, setting))


@register("sail+transition", cost="as sail, then 0", knob="transition setting (SAIL k1 s3 lr 0.7)",
          default="s0t500", sweep=("s0t700", "s0t600", "s0t500", "s0t400", "s-2t650"), needs=("cfg",),
          kind="noise+trajectory", guard_plan=_sail_transition_in_guard, config=TransitionConfig)
def _sail_transition(ctx: Context, setting: Any) -> Plan:
    return sail_plan(ctx, {}).merge(transition_plan(ctx, setting))
