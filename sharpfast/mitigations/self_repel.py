"""`self_repel`: keep the prompt's guidance, but never let the image become the one the model
would copy. sharpfast's own method (the dissimilarity guidance of Chen et al., "Towards
Memorization-Free Diffusion Models", CVPR 2024, repels the predicted image from its nearest
TRAINING image; a served model has no training set, so the copy is the model's own prediction).

The paper's observation is that a memorized prompt's image is already there early: the
predicted clean image x0_hat at an early step of the guided trajectory is (close to) the
training image the model is about to reproduce. That prediction, at step k, is the target T
of the image; from step k + 1 on, every step's guided prediction is changed so that its own
x0_hat correlates with T at most `c` (Pearson correlation over the latent, per image):

    a = x0_hat - mean,  b = unit(T - mean T),  p = <a, b>,  o = ||a - p b||
    p_max = c o / sqrt(1 - c^2);   x0_hat' = x0_hat - max(p - p_max, 0) b

which moves x0_hat along b alone (the component that makes it the copy) and leaves the rest:
the prompt's guidance still draws what the caption says. In eps terms, at noise level a_t:
eps' = eps + sqrt(a_t / (1 - a_t)) max(p - p_max, 0) b, turned back into the model's own
prediction (epsilon, v or sample). Zero extra network calls. Normal prompts are not meant to
get it: the guard gives it to the prompts its detector flags.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .. import validate
from ..errors import BadArgument
from .base import Context, MethodConfig, Plan, per_row, register
from .grammar import parse
from .hooks import DenoiserCall, GuidanceHook


def _centered(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(len(x), -1).double()
    return flat - flat.mean(dim=1, keepdim=True)


def repel_shift(x0: torch.Tensor, target: torch.Tensor, cap: float) -> torch.Tensor:
    """Per row, how far x0 moves along the unit direction of the centered target so that its
    Pearson correlation with the target is at most `cap` (0 where it already is): (rows,)."""
    a, b = _centered(x0), _centered(target)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    p = (a * b).sum(dim=1)
    o = (a - p[:, None] * b).norm(dim=1)
    p_max = cap * o / math.sqrt(1.0 - cap * cap)
    return (p - p_max).clamp_min(0.0)


def repel_direction(target: torch.Tensor) -> torch.Tensor:
    """The unit, centered direction of each row's target, shaped like it (float32)."""
    b = _centered(target)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return b.float().view_as(target)


@dataclass(frozen=True)
class SelfRepelConfig(MethodConfig):
    """The largest correlation c allowed with the target, and the step k whose prediction it is."""

    cap: float = 0.5
    step: int = 1

    @classmethod
    def from_setting(cls, setting: Any) -> SelfRepelConfig:
        """"c0.5" (correlation at most 0.5 with the step-1 prediction), "c0.5k5" (with step 5's),
        a number (c), a (c, k) tuple or a config."""
        if isinstance(setting, cls):
            cfg = setting
        elif isinstance(setting, tuple):
            cfg = cls(float(setting[0]), int(setting[1]))
        elif isinstance(setting, (int, float)) and not isinstance(setting, bool):
            cfg = cls(float(setting))
        else:
            got = parse(setting, {"c": float, "k": int}, required=("c",), name="self_repel",
                        example="c0.5 (correlation with the step-1 prediction at most 0.5) or c0.5k5 (with "
                                "step 5's)")
            cfg = cls(got["c"], got.get("k", cls.step))
        if not -1.0 < validate.finite(cfg.cap, "self_repel's correlation cap c") < 1.0:
            raise BadArgument(f"self_repel's correlation cap c must be in (-1, 1), got {cfg.cap!r}")
        if cfg.step < 1:
            raise BadArgument(f"self_repel's target step k counts from 1, got {cfg.step!r}")
        return cfg


@dataclass
class SelfRepelState:
    """Per generation: the steps seen, the targets (set at step k) and the steps that moved an image."""

    steps: int = 0
    target: Optional[torch.Tensor] = None
    moved: int = 0


def _rule(ctx: Context, cfg: SelfRepelConfig) -> Any:
    model = ctx.model
    sched = model.scheduler(ctx.num_inference_steps, ctx.height, ctx.width)
    param = model.parameterization

    def rule(hook: GuidanceHook, u: torch.Tensor, c: torch.Tensor, call: DenoiserCall,
             rows: torch.Tensor) -> Optional[torch.Tensor]:
        st: SelfRepelState = hook.state
        st.steps += 1
        if st.steps < cfg.step:
            return None
        x = call.sample[rows + hook.images].float()
        ab = model.alpha_bar(sched, call.timestep)
        if not 0.0 < ab < 1.0:  # no noise left (or none of the image): nothing to repel
            return None
        guided = u + hook.g * (c - u)
        eps = param.to_eps(guided, x, ab)
        x0 = (x - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
        if st.target is None:
            st.target = x0.detach().clone()
            return None
        shift = repel_shift(x0, st.target, cfg.cap).float()
        st.moved += int((shift > 0).sum())
        d_eps = math.sqrt(ab / (1.0 - ab)) * per_row(shift, x0) * repel_direction(st.target)
        return guided + d_eps / param.eps_per_pred(ab)
    return rule


@register("self_repel", cost="0", knob="correlation cap c with the model's own step-k prediction (k)",
          default="c0.5", sweep=("c0.7", "c0.5", "c0.3", "c0.5k3", "c0.5k10"),
          needs=("cfg",), kind="trajectory", config=SelfRepelConfig)
def _self_repel(ctx: Context, setting: Any) -> Plan:
    cfg = SelfRepelConfig.from_setting(setting)
    if ctx.model.prediction_type == "flow":
        raise BadArgument("self_repel predicts the clean image of a VP latent; flow pipelines are not supported")
    hook = GuidanceHook(ctx.model, ctx.guidance_scale, ctx.row_list(), ctx.images, _rule(ctx, cfg), SelfRepelState())
    return Plan(hooks=[hook.installed()],
                info={"self_repel": dict(cap=cfg.cap, step=cfg.step), "rule": "self_repel",
                      "applied": lambda: [hook.state.moved > 0] * len(hook.rows)})
