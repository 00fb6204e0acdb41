"""`transition`: Jain et al. (CVPR 2025, "Classifier-free guidance inside the attraction basin may
cause memorization"). While the timestep is above the transition point the guidance scale is
`early` (0: the unconditional prediction, "no guidance"; negative: opposite guidance), then the
request's own scale. Static: a fixed transition timestep (their commands: 500 with scale 0, 650
with -2). Dynamic (setting "dyn"): guidance 1 (the conditional prediction) until the first local
minimum of ||eps_c - eps_null|| along the trajectory, per image: the step where the norm rises
again after falling is the first guided one (their dtp script). Their opposite-guidance dynamic
script finds the point in a full pre-pass; here the same online rule is used with `early` < 0.
An optional third knob `g` sets the scale after the transition point in place of the request's
("s0t600g1": no guidance above t = 600, then the conditional prediction alone; "s1t0": scale 1
at every step, i.e. no CFG amplification). Zero extra UNet calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .. import validate
from ..errors import BadArgument
from .base import Context, MethodConfig, Plan, per_row, register
from .grammar import parse
from .hooks import DenoiserCall, GuidanceHook


@dataclass(frozen=True)
class TransitionConfig(MethodConfig):
    """The early guidance scale, the transition timestep (None: the dynamic point) and the scale
    after it (None: the request's own)."""

    early: float = 0.0
    t_switch: Optional[float] = 500.0
    late: Optional[float] = None

    @classmethod
    def from_setting(cls, setting: Any) -> TransitionConfig:
        """"s0t500", "s-2t650", "s0t600g1", "dyn", "s-1dyn", an (early, t_switch[, late]) tuple
        or a config."""
        if isinstance(setting, cls):
            cfg = setting
        elif isinstance(setting, tuple):
            late = setting[2] if len(setting) > 2 else None
            cfg = cls(float(setting[0]), None if setting[1] is None else float(setting[1]),
                      None if late is None else float(late))
        else:
            got = parse(setting, {"s": float, "t": int, "g": float}, words=("dyn",), one_of=("t", "dyn"),
                        name="transition",
                        example="s0t500 (scale 0 above t = 500), s-2t650 (opposite guidance -2 above 650), "
                                "s0t600g1 (then scale 1, not the request's) or dyn / s-1dyn (the dynamic "
                                "transition point)")
            if "t" in got and "dyn" in got:
                raise BadArgument(f"a transition setting has a timestep (s0t500) or dyn (s-1dyn), not both: "
                                  f"{setting!r}")
            early = got.get("s", 1.0 if "dyn" in got else 0.0)
            cfg = cls(float(early), float(got["t"]) if "t" in got else None, got.get("g"))
        validate.finite(cfg.early, "transition's early scale s")
        if cfg.late is not None:
            validate.finite(cfg.late, "transition's scale g after the transition point")
        return cfg


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


def _static(early: float, t_switch: float, late: Optional[float], hook: GuidanceHook, u: torch.Tensor,
            c: torch.Tensor, call: DenoiserCall) -> Optional[torch.Tensor]:
    if float(call.timestep) <= t_switch:
        return None if late is None else u + late * (c - u)
    hook.state.early_steps += 1
    return u + early * (c - u)


def _dynamic(early: float, late: Optional[float], hook: GuidanceHook, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
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
    scale = torch.where(sw, torch.full_like(d, hook.g if late is None else late), torch.full_like(d, early))
    return u + per_row(scale, u) * (c - u)


def transition_rule(early: float, t_switch: Optional[float], late: Optional[float] = None) -> Any:
    """Jain et al.'s schedule as a guidance rule: scale `early` above t_switch, `late` (None: the
    request's scale) below; with t_switch None the dynamic point (the first local minimum of
    ||c - u||, per image)."""
    def rule(hook: GuidanceHook, u: torch.Tensor, c: torch.Tensor, call: DenoiserCall,
             rows: torch.Tensor) -> Optional[torch.Tensor]:
        if t_switch is not None:
            return _static(early, t_switch, late, hook, u, c, call)
        return _dynamic(early, late, hook, u, c)
    return rule


def transition_plan(ctx: Context, setting: Any) -> Plan:
    """The transition schedule on ctx's rows (a guidance hook; info "applied": per row, whether at
    least one step ran at the early scale)."""
    cfg = TransitionConfig.from_setting(setting)
    hook = GuidanceHook(ctx.model, ctx.guidance_scale, ctx.row_list(), ctx.images,
                        transition_rule(cfg.early, cfg.t_switch, cfg.late), TransitionState())

    def applied() -> list:
        steps = hook.state.early_steps
        return (steps > 0).tolist() if torch.is_tensor(steps) else [steps > 0] * len(hook.rows)
    return Plan(hooks=[hook.installed()], info={"applied": applied, "rule": "transition", "guidance_hook": hook})


def same_step(a: Any, b: Any, t: float) -> bool:
    """Whether transition settings a and b give a step at timestep t the same guidance: both static
    and the same scale there (each its early scale above its transition point, else its scale
    after it, None standing for the request's). (The dynamic point depends on the trajectory:
    never.)"""
    ca, cb = TransitionConfig.from_setting(a), TransitionConfig.from_setting(b)
    if ca.t_switch is None or cb.t_switch is None:
        return False
    scale_a = ca.early if float(t) > ca.t_switch else ca.late
    scale_b = cb.early if float(t) > cb.t_switch else cb.late
    return scale_a == scale_b


@register("transition", cost="0", knob="early scale s above the transition timestep t (dyn: dynamic point)",
          default="s0t500", sweep=("s0t700", "s0t600", "s0t500", "s0t450", "s0t400", "s0t300", "s-2t650", "s-2t800",
                                   "s-1t600", "s-1t500", "dyn", "s-2dyn"),
          needs=("cfg",), kind="trajectory", config=TransitionConfig, same_step=same_step)
def _transition(ctx: Context, setting: Any) -> Plan:
    return transition_plan(ctx, setting)
