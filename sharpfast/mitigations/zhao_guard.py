"""`zhao_guard`: GUARD (Zhao, Triantafillou and Triantafillou, "You Don't Need All That Attention",
ICML 2026) as the authors' code runs it (their `dual_guidance_call` with its cross-attention
logger), not as their abstract reads.

Every step makes one more network call, on the mitigated images' conditional rows: the SAME
prompt with its cross-attention attenuated (the "positive" branch a); the ordinary conditional
prediction c is the "negative" one, repelled. Per image:

    v_a = a - u,  v_c = c - u
    v_a <- v_a - clip(<v_a, v_c> / ||v_c||^2, -2, 2) v_c      only where cos(v_a, v_c) > 0.9
    eps = u + s v_a - w(i) v_c,     w(i) = r cos(pi/2 * i / T), i = 0..T-1

(s: the request's guidance scale; the repulsion fades out over the T steps). Attenuation, in the
cross-attention layers of the down blocks and the mid block, per head, per image, at every step:
M_j is the largest logit q.k_j / sqrt(d) over the queries at token position j; z_j = (M_j -
mean M) / (std M + 1e-6) with mean and (unbiased) std over the positions 1.. (BOS excluded);
the positions with z_j > tau (never BOS) have their logits multiplied by alpha, for every
query of that head. Their constants (SD 1.4 README): r 2.0, alpha 0.3, tau 0.1. UNets only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import validate
from ..errors import BadArgument
from .base import Context, MethodConfig, Plan, register
from .grammar import parse
from .hooks import DenoiserCall, GuidanceHook

ORTHO_COS = 0.9     # their ortho_cos_threshold
ORTHO_CLIP = 2.0    # their ortho_coef_clip
ORTHO_EPS = 1e-8    # their ortho_eps
Z_EPS = 1e-6        # added to the std of the z-score


def attenuated_layer(name: str) -> bool:
    """GUARD edits the cross-attention of the down blocks and the mid block (not the up blocks)."""
    return name.startswith(("down_blocks", "mid_block"))


def spike_edit(alpha: float, tau: float) -> Any:
    """The attenuation as a logit edit: scores (rows, heads, queries, tokens) -> edited."""
    def edit(scores: torch.Tensor, rows: Any) -> torch.Tensor:
        top = scores.amax(dim=2).float()                       # (rows, heads, tokens): M_j
        content = top[..., 1:]
        z = (top - content.mean(dim=-1, keepdim=True)) / (content.std(dim=-1, keepdim=True) + Z_EPS)
        spike = z > tau
        spike[..., 0] = False
        return torch.where(spike[:, :, None, :], scores * alpha, scores)
    return edit


def combine(u: torch.Tensor, c: torch.Tensor, a: torch.Tensor, scale: float, repel: float) -> torch.Tensor:
    """u + scale v_a - repel v_c with v_a orthogonalized against v_c where they are nearly parallel
    (one row per image; `repel` is w(i) of this step)."""
    v_a, v_c = (a - u).float(), (c - u).float()
    fa, fc = v_a.reshape(len(v_a), -1), v_c.reshape(len(v_c), -1)
    dot = (fa * fc).sum(dim=1)
    cc = (fc * fc).sum(dim=1)
    coef = (dot / (cc + ORTHO_EPS)).clamp(-ORTHO_CLIP, ORTHO_CLIP)
    cos = (dot / ((fa * fa).sum(dim=1) + ORTHO_EPS).sqrt() / (cc + ORTHO_EPS).sqrt()).clamp(-1.0, 1.0)
    shape = (-1,) + (1,) * (v_a.dim() - 1)
    v_a = v_a - ((cos > ORTHO_COS).float() * coef).view(shape) * v_c
    return u.float() + scale * v_a - repel * v_c


def repulsion(repel: float, step: int, steps: int) -> float:
    """w(i) = r cos(pi/2 * i / T)."""
    return repel * math.cos(math.pi / 2 * step / max(steps, 1))


@dataclass
class ZhaoGuardState:
    """Per generation: the rows of the extra (attenuated) calls made so far."""

    extra_rows: int = 0


@dataclass(frozen=True)
class ZhaoGuardConfig(MethodConfig):
    """GUARD's three knobs: the repulsion r, the attenuation alpha and the spike cut tau."""

    repel: float = 2.0
    alpha: float = 0.3
    tau: float = 0.1

    @classmethod
    def from_setting(cls, setting: Any) -> ZhaoGuardConfig:
        """"r2", "r2a0.3", "r2a0.3t0.1", a number (r), an (r, alpha, tau) tuple or a config."""
        if isinstance(setting, cls):
            cfg = setting
        elif isinstance(setting, tuple):
            cfg = cls(*(float(v) for v in setting))
        elif isinstance(setting, (int, float)) and not isinstance(setting, bool):
            cfg = cls(float(setting))
        else:
            got = parse(setting, {"r": float, "a": float, "t": float}, required=("r",), name="zhao_guard",
                        example="r2 (repulsion 2), r2a0.3 (attenuation 0.3) or r2a0.3t0.1 (spike cut 0.1)")
            cfg = cls(got["r"], got.get("a", cls.alpha), got.get("t", cls.tau))
        for value, what in ((cfg.repel, "repulsion r"), (cfg.alpha, "attenuation alpha")):
            if validate.finite(value, f"zhao_guard's {what}") < 0:
                raise BadArgument(f"zhao_guard's {what} must be >= 0, got {value!r}")
        validate.finite(cfg.tau, "zhao_guard's spike cut tau")
        return cfg


def _rule(ctx: Context, cfg: ZhaoGuardConfig) -> Any:
    from ..attention import edit_cross_attention

    edit, steps = spike_edit(cfg.alpha, cfg.tau), ctx.num_inference_steps

    def rule(hook: GuidanceHook, u: torch.Tensor, c: torch.Tensor, call: DenoiserCall,
             rows: torch.Tensor) -> torch.Tensor:
        cond = rows + hook.images
        added = call.added
        hook.inside = True
        try:
            with edit_cross_attention(hook.net, edit, None, attenuated_layer), torch.no_grad():
                a = ctx.model.call(call.sample[cond], call.timestep, call.hidden[cond],
                                   None if added is None else {k: v[cond] for k, v in added.items()}).float()
        finally:
            hook.inside = False
        hook.state.extra_rows += len(rows)
        return combine(u, c, a, hook.g, repulsion(cfg.repel, hook.calls, steps))

    return rule


@register("zhao_guard", cost="0.5 CFG call per step (the attenuated conditional prediction)",
          knob="repulsion r (attenuation alpha, spike cut tau)", default="r2a0.3t0.1",
          sweep=("r0.5", "r1", "r2a0.3t0.1", "r4", "r2a0.1t0.1", "r2a0.3t0.01"),
          needs=("cfg", "cross_attention"), kind="trajectory", config=ZhaoGuardConfig)
def _zhao_guard(ctx: Context, setting: Any) -> Plan:
    cfg = ZhaoGuardConfig.from_setting(setting)
    rows = ctx.row_list()
    hook = GuidanceHook(ctx.model, ctx.guidance_scale, rows, ctx.images, _rule(ctx, cfg), ZhaoGuardState())
    return Plan(hooks=[hook.installed()],
                info={"zhao_guard": dict(repel=cfg.repel, alpha=cfg.alpha, tau=cfg.tau),
                      "applied": lambda: [hook.state.extra_rows > 0] * len(rows)})
