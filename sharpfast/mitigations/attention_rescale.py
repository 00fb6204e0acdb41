"""`attention_rescale`: Ren et al. (ECCV 2024). In every cross-attention layer, at every step, the
logit of the first token (BOS) of the conditional branch is multiplied by `c1` (their 1.25), and
the tokens after the prompt's own (the padding "summary" tokens) are masked out of both
branches (their `--cross_attn_mask`: the first `prompt_length` tokens are kept, BOS and EOS
included). UNets only. Zero extra UNet calls (the edited layers compute attention explicitly).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import Context, MethodConfig, Plan, prompt_lengths, register
from .hooks import AttentionEdit


def rescale_edit(c1: float, lengths: torch.Tensor, images: int, rows_all: torch.Tensor) -> Any:
    """Ren et al.'s logits: BOS x c1 on the conditional rows, tokens past the prompt masked on both."""
    def edit(scores: Any, rows: Any) -> torch.Tensor:
        # rows index the CFG batch [null (images); cond (images)]; each belongs to image rows % images
        img = rows % images
        keep = torch.arange(scores.shape[-1], device=scores.device)[None, :] < lengths.to(scores.device)[img][:, None]
        cond = (rows >= images)
        s = scores.clone()
        s[cond, ..., 0] = s[cond, ..., 0] * c1
        return s.masked_fill(~keep[:, None, None, :], float("-inf"))
    return edit


@dataclass(frozen=True)
class AttentionRescaleConfig(MethodConfig):
    """Ren et al.'s knob: the factor c1 on the BOS logit of the conditional branch."""

    c1: float = 1.25

    @classmethod
    def from_setting(cls, setting: Any) -> AttentionRescaleConfig:
        """A number (or its text) or a config."""
        return cls.from_number(setting, "attention_rescale's setting (c1)")


@register("attention_rescale", cost="0 (the cross-attention layers of the mitigated rows computed explicitly)",
          knob="c1, the factor on the BOS logit (summary tokens masked)", default=1.25,
          sweep=(1.1, 1.25, 1.5, 2.0, 3.0),
          needs=("cfg", "cross_attention"), kind="trajectory", config=AttentionRescaleConfig)
def _attention_rescale(ctx: Context, setting: Any) -> Plan:
    c1 = AttentionRescaleConfig.from_setting(setting).c1
    rows = torch.as_tensor(ctx.row_list(), dtype=torch.long)
    lengths = torch.tensor(prompt_lengths(ctx.pipe, ctx.prompts, ctx.n))
    batch_rows = torch.cat([rows, rows + ctx.images]).to(ctx.model.device)
    hook = AttentionEdit(ctx.model.unet, rescale_edit(c1, lengths, ctx.images, batch_rows), batch_rows)
    return Plan(hooks=[hook.installed()],
                info={"prompt_lengths": lengths.tolist(), "applied": lambda: [hook.calls > 0] * len(rows)})
