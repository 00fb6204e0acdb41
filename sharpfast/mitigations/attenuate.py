"""`attenuate`: GUARD's attenuation alone (Zhao, Triantafillou and Triantafillou, ICML 2026; the
second configuration of their README, "normal CFG on the attenuated prompt"): the conditional
branch's cross-attention has its spiking token positions attenuated, and the sampler runs the
request's ordinary guidance on it, eps = u + s (a - u). No repulsion, no orthogonalization, no
extra network call: the conditional rows of the pipeline's own CFG batch are the attenuated
ones (their own third branch is not needed when nothing is repelled).

Which positions, per head, per image, per layer, at every step, exactly as `zhao_guard` picks
them (`zhao_guard.spike_edit`): M_j the largest logit over the queries at token position j,
z_j = (M_j - mean M) / (unbiased std M + 1e-6) over positions 1.., the positions with z_j > tau
(never BOS) multiplied by alpha before the softmax, in the down blocks and the mid block. Their
constants for this configuration (SD 1.4 README): alpha 0.3, tau 0.01. UNets only.

What it does to a memorized caption: the tokens that key a memorized image (a unique identifier,
a title) are the ones whose attention spikes, and they are the ones damped; the words that say
what to draw (a digit's name) keep their weight, so the prompt's content survives where a
guidance-free start (transition) loses it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import validate
from ..errors import BadArgument
from .base import Context, MethodConfig, Plan, register
from .grammar import parse
from .hooks import AttentionEdit
from .zhao_guard import attenuated_layer, spike_edit


@dataclass(frozen=True)
class AttenuateConfig(MethodConfig):
    """The attenuation alpha and the spike cut tau; `every_layer` edits the up blocks too."""

    alpha: float = 0.3
    tau: float = 0.01
    every_layer: bool = False

    @classmethod
    def from_setting(cls, setting: Any) -> AttenuateConfig:
        """"a0.3t0.01", "a0t1", "a0.3t0.01all" (every cross-attention layer), an (alpha, tau)
        tuple or a config."""
        if isinstance(setting, cls):
            cfg = setting
        elif isinstance(setting, tuple):
            if not 1 <= len(setting) <= 3:
                raise BadArgument(f"an attenuate setting tuple is (alpha[, tau[, every_layer]]), got {setting!r}")
            cfg = cls(float(setting[0]), float(setting[1]) if len(setting) > 1 else cls.tau,
                      bool(setting[2]) if len(setting) > 2 else False)
        else:
            got = parse(setting, {"a": float, "t": float}, words=("all",), required=("a",), name="attenuate",
                        example="a0.3 (attenuation 0.3), a0.3t0.01 (spike cut 0.01) or a0.3t0.01all "
                                "(every cross-attention layer, not only the down and mid blocks)")
            cfg = cls(got["a"], got.get("t", cls.tau), bool(got.get("all", False)))
        if validate.finite(cfg.alpha, "attenuate's alpha") < 0:
            raise BadArgument(f"attenuate's alpha must be >= 0, got {cfg.alpha!r}")
        validate.finite(cfg.tau, "attenuate's spike cut tau")
        return cfg


@register("attenuate", cost="0 (the conditional rows' cross-attention computed explicitly)",
          knob="attenuation alpha (spike cut tau)", default="a0.3t0.01",
          sweep=("a0.3t0.01", "a0.1t0.01", "a0t0.01", "a0.3t0.5", "a0t1", "a0.3t0.01all"),
          needs=("cfg", "cross_attention"), kind="trajectory", config=AttenuateConfig)
def _attenuate(ctx: Context, setting: Any) -> Plan:
    cfg = AttenuateConfig.from_setting(setting)
    rows = torch.as_tensor(ctx.row_list(), dtype=torch.long)
    cond_rows = (rows + ctx.images).to(ctx.model.device)   # the CFG batch is [null (images); cond (images)]
    hook = AttentionEdit(ctx.model.unet, spike_edit(cfg.alpha, cfg.tau), cond_rows,
                         None if cfg.every_layer else attenuated_layer)
    return Plan(hooks=[hook.installed()],
                info={"attenuate": dict(alpha=cfg.alpha, tau=cfg.tau, every_layer=cfg.every_layer),
                      "applied": lambda: [hook.calls > 0] * len(rows)})
