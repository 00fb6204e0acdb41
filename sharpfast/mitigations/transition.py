"""`transition`: Jain et al. (CVPR 2025, "Classifier-free guidance inside the attraction basin may
cause memorization"). While the timestep is above the transition point the guidance scale is
`early` (0: the unconditional prediction, "no guidance"; negative: opposite guidance), then the
request's own scale. Static: a fixed transition timestep (their commands: 500 with scale 0, 650
with -2). Dynamic (setting "dyn"): guidance 1 (the conditional prediction) until the first local
minimum of ||eps_c - eps_null|| along the trajectory, per image: the step where the norm rises
again after falling is the first guided one (their dtp script). Their opposite-guidance dynamic
script finds the point in a full pre-pass; here the same online rule is used with `early` < 0.
Zero extra UNet calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from ..errors import BadArgument
from .base import Context, MethodConfig, Plan, per_row, register
from .grammar import parse
from .hooks import DenoiserCall, GuidanceHook


@dataclass(frozen=True)
class TransitionConfig(MethodConfig):
    """The early guidance scale and the transition timestep (None: the dynamic point)."""

    early: float = 0.0
    t_switch: Optional[float] = 500.0

    @classmethod
    def from_setting(cls, setting: Any) -> TransitionConfig:
        """"s0t500", "s-2t650", "dyn", "s-1dyn", an (early, t_switch) tuple or a config."""
        if isinstance(setting, cls):
            return setting
        if isinstance(setting, tuple):
            return cls(float(setting[0]), None if setting[1] is None else float(setting[1]))
        got = parse(setting, {"s": float, "t": int}, words=("dyn",), one_of=("t", "dyn"),
                    name="transition",
                    example="s0t500 (scale 0 above t = 500), s-2t650 (opposite guidance -2 above 650) or dyn / "
                            "s-1dyn (the dynamic transition point)")
        if "t" in got and "dyn" in got:
            raise BadArgument(f"a transition setting has a timestep (s0t500) or dyn (s-1dyn), not both: {setting!r}")
        early = got.get("s", 1.0 if "dyn" in got else 0.0)
        return cls(float(early), float(got["t"]) if "t" in got else None)


@dataclass
class TransitionState:
    """Per generation: early steps run (a count, or per image for the dynamic point) and, for the
    dynamic point, the last two norms and whether each image has switched."""

    early_steps: Union[int, torch.Tensor] = 0
    prev: Optional[torch.Tensor] = None
    prev2: Optional[torch.Tensor] = None
    switched: Optional[torch.Tensor] = None


def transition_setting(setting: Any) -> tuple:
    """(early scale, transition timestep or None for the dynamic point) of a transition setting."""
    cfg = TransitionConfig.from_setting(setting)
    return cfg.early, cfg.t_switch


def _static(early: float, t_switch: float, hook: GuidanceHook, u: torch.Tensor, c: torch.Tensor,
            call: DenoiserCall) -> Optional[torch.Tensor]:
    if float(call.timestep) <= t_switch:
        return None
    hook.state.early_steps += 1
    return u + early * (c - u)


def _dynamic(early: float, hook: GuidanceHook, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    st: TransitionState = hook.state
    d = (c - u).reshape(len(c), -1).norm(dim=1)
    if st.prev is None:  # per image: the norms of the last two steps, on the device (no host sync)
        st.prev = st.prev2 = torch.full_like(d, -1.0)
        st.switched = torch.zeros_like(d, dtype=torch.bool)
        st.early_steps = torch.zeros_like(d)
    assert st.prev2 is not None and st.switched is not None
    # the previous step was a local minimum: this step rises above it, the one before was above it
    turn = (d > st.prev) & (st.prev2 > st.prev) & (st.prev >= 0)
    st.switched = st.switched | turn
    st.prev2, st.prev = st.prev, d
    sw = st.switched
    st.early_steps = st.early_steps + (~sw).float()
    scale = torch.where(sw, torch.full_like(d, hook.g), torch.full_like(d, early))
    return u + per_row(scale, u) * (c - u)


def transition_rule(early: float, t_switch: Optional[float]) -> Any:
    """Jain et al.'s schedule as a guidance rule: scale `early` above t_switch, the request's scale
    below; with t_switch None the dynamic point (the first local minimum of ||c - u||, per image)."""
    def rule(hook: GuidanceHook, u: torch.Tensor, c: torch.Tensor, call: DenoiserCall,
             rows: torch.Tensor) -> Optional[torch.Tensor]:
        if t_switch is not None:
            return _static(early, t_switch, hook, u, c, call)
        return _dynamic(early, hook, u, c)
    return rule


def transition_plan(ctx: Context, setting: Any) -> Plan:
    """The transition schedule on ctx's rows (a guidance hook; info "applied": per row, whether at
    least one step ran at the early scale)."""
    early, t_switch = transition_setting(setting)
    hook = GuidanceHook(ctx.model, ctx.guidance_scale, ctx.row_list(), ctx.images, transition_rule(early, t_switch),
                        TransitionState())

    def applied() -> list:
        steps = hook.state.early_steps
        return (steps > 0).tolist() if torch.is_tensor(steps) else [steps > 0] * len(hook.rows)
    return Plan(hooks=[hook.installed()], info={"applied": applied, "rule": "transition", "guidance_hook": hook})


def same_step(a: Any, b: Any, t: float) -> bool:
    """Whether transition settings a and b give a step at timestep t the same guidance: both static,
    and both at their early scale there (the same scale) or both past their transition point.
    (The dynamic point depends on the trajectory: never.)"""
    (ea, ta), (eb, tb) = transition_setting(a), transition_setting(b)
    if ta is None or tb is None:
        return False
    early_a, early_b = float(t) > ta, float(t) > tb
    return early_a == early_b and (not early_a or ea == eb)


@register("transition", cost="0", knob="early scale s above the transition timestep t (dyn: dynamic point)",
          default="s0t500", sweep=("s0t700", "s0t600", "s0t500", "s0t450", "s0t400", "s0t300", "s-2t650", "s-2t800",
                                   "s-1t600", "s-1t500", "dyn", "s-2dyn"),
          needs=("cfg",), kind="trajectory", config=TransitionConfig, same_step=same_step)
def _transition(ctx: Context, setting: Any) -> Plan:
    return transition_plan(ctx, setting)
