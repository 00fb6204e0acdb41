"""`attract_repel`: guidance toward a prediction whose cross-attention is attenuated at the prompt
positions a per-prompt test picks, and away from the full-attention (memorized) prediction,
written from the abstract of GUARD (Zhao, Triantafillou and Triantafillou, arXiv 2603.00133);
the authors' exact constants were not used. At step 1 the conditional branch's attention per
token (mean over heads, queries and layers) is read at x_T; positions 1..L-1 (BOS excluded)
whose attention is above median + `z` robust standard deviations (1.4826 MAD) are attenuated
(at least the top one); at every step the attenuated prediction a (those logits +
log `attenuation`) costs one call on the conditional rows, and the guided prediction is
eps_null + g (a - eps_null) + `repel` (a - eps_c). UNets only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import validate
from .base import Context, MethodConfig, Plan, prompt_lengths, register
from .grammar import parse
from .hooks import DenoiserCall, GuidanceHook


@dataclass
class AttractRepelState:
    """Per generation: rows of the extra (attenuated) calls made so far."""

    extra_rows: int = 0


def attenuated_positions(attention: torch.Tensor, lengths, z: float) -> list:
    """GUARD's per-prompt test (this instantiation): per row, the positions 1..L-1 whose attention is
    above median + z * 1.4826 MAD of those positions; at least the largest one."""
    out: list = []
    for a, L in zip(attention.float().cpu(), lengths):
        cand = a[1:int(L)]
        if not len(cand):
            out.append([])
            continue
        med = cand.median()
        mad = 1.4826 * (cand - med).abs().median()
        pick = ((cand > med + z * mad) & (mad > 0)).nonzero().view(-1) + 1
        out.append(sorted(set(pick.tolist()) | {int(cand.argmax()) + 1}))
    return out



def _attract_repel_rule(ctx: Context, positions: list, attenuation: float, repel: float) -> Any:
    """The guidance rule of attract_repel: one extra call on the mitigated conditional rows with the
    picked positions' logits + log(attenuation), then u + g (a - u) + repel (a - c)."""
    from ..attention import edit_cross_attention


    images, rows_all = ctx.images, torch.as_tensor(ctx.row_list(), dtype=torch.long)
    mask = torch.zeros(images, ctx.pipe.tokenizer.model_max_length)
    for r, pos in zip(rows_all.tolist(), positions):
        mask[r, pos] = 1.0
    log_att = math.log(attenuation)

    def edit(scores: Any, sub: Any) -> torch.Tensor:  # the extra call's batch: row i is image rows_all[i]
        m=mask.to(scores.device)[rows_all.to(scores.device)[sub]][:, None, None, : scores.shape[-1]]
        return scores + m.to(scores.dtype) * log_att

    def rule(hook: GuidanceHook, u: torch.Tensor, c: torch.Tensor, call: DenoiserCall,
             rows: torch.Tensor) -> torch.Tensor:
        cond_rows = rows + images
        added = call.added
        hook.inside = True
        try:
            with edit_cross_attention(hook.net, edit, None), torch.no_grad():
                a = ctx.model.call(call.sample[cond_rows], call.timestep, call.hidden[cond_rows],
                                   None if added is None else {k: v[cond_rows] for k, v in added.items()}).float()
        finally:
            hook.inside = False
        hook.state.extra_rows += len(rows)
        return u + hook.g * (a - u) + repel * (a - c)

    return rule


@dataclass(frozen=True)
class AttractRepelConfig(MethodConfig):
    """The repel scale, the attenuation of the picked positions' attention and the test's z."""

    repel: float = 1.0
    attenuation: float = 0.1
    z: float = 2.0

    @classmethod
    def from_setting(cls, setting: Any) -> AttractRepelConfig:
        """"r1", "r1a0.1", "r1a0.1z2", a (repel, attenuation, z) tuple or a config."""
        if isinstance(setting, cls):
            return setting
        if isinstance(setting, tuple):
            return cls(*(float(v) for v in setting))
        got = parse(setting, {"r": float, "a": float, "z": float}, required=("r",),
                    name="attract_repel", example="r1 (repel 1), r1a0.1 (attenuation 0.1) or r1a0.1z2 (z 2)")
        return cls(got["r"], got.get("a", 0.1), got.get("z", 2.0))


def attract_repel_setting(setting: Any) -> tuple:
    """(repel, attenuation, z) of an attract_repel setting."""
    cfg = AttractRepelConfig.from_setting(setting)
    return cfg.repel, cfg.attenuation, cfg.z


@register("attract_repel", cost="0.5 CFG call per step (the attenuated conditional prediction) + 0.5 at step 1",
          knob="repel scale r (attenuation a, test z)", default="r1", sweep=("r0", "r0.5", "r1", "r2", "r1a0.01"),
          needs=("cfg", "cross_attention"), kind="trajectory", config=AttractRepelConfig)
def _attract_repel(ctx: Context, setting: Any) -> Plan:
    from ..attention import record_cross_attention

    repel, attenuation, z = attract_repel_setting(setting)
    validate.finite(attenuation, "attenuation", above=0)
    rows = ctx.row_list()
    model = ctx.model
    sched = model.scheduler(ctx.num_inference_steps, ctx.height, ctx.width)
    t0 = sched.timesteps[0]
    with torch.no_grad():
        cond = model.encode(ctx.prompts, ctx.n, ctx.height, ctx.width, ctx.guidance_scale)
        x = sched.scale_model_input(ctx.latents.to(model.device, model.dtype) * sched.init_noise_sigma, t0)
        with record_cross_attention(model.unet) as rec:
            model.predict_branch(x[rows], t0, cond.rows(rows), "cond")
    lengths = prompt_lengths(ctx.pipe, ctx.prompts, ctx.n)
    positions = attenuated_positions(rec.token_attention(), [lengths[r] for r in rows], z)
    hook = GuidanceHook(model, ctx.guidance_scale, rows, ctx.images,
                        _attract_repel_rule(ctx, positions, attenuation, repel), AttractRepelState())
    return Plan(hooks=[hook.installed()], info={"attenuated_positions": positions,
                                                "applied": lambda: [hook.state.extra_rows > 0] * len(rows),
                                                "unet_calls_before": 0.5 * len(rows) / max(ctx.images, 1)})
