"""Cross-attention of a UNet call written out: recorded for the attention-entropy detector (Ren
et al., ECCV 2024: memorized prompts concentrate the cross-attention on a few tokens) and edited
for the attention mitigations (sharpfast.mitigations: attention_rescale, zhao_guard).

    with record_cross_attention(unet) as rec:
        unet(x, t, encoder_hidden_states=...)
    rec.entropy()      # (batch,) mean entropy over tokens, averaged over heads, queries and layers

Fused attention (SDPA, flash) never forms the probabilities, so the cross-attention layers
(attn2) get a recording processor that computes them explicitly for the duration of the block;
the original processors are restored afterwards, also on error.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch

from .errors import UnsupportedPipeline, UsageError


class _Recorder:
    def __init__(self) -> None:
        self.sums: Optional[torch.Tensor] = None  # (batch,) sum over layers of the mean entropy
        # (batch, tokens) sum over layers of the mean attention per token
        self.token_sums: Optional[torch.Tensor] = None
        self.layers = 0

    def add(self, ent: torch.Tensor, per_token: torch.Tensor) -> None:
        ent, per_token = ent.float(), per_token.float()
        self.sums = ent if self.sums is None else self.sums + ent
        self.token_sums = per_token if self.token_sums is None else self.token_sums + per_token
        self.layers += 1

    def token_attention(self) -> torch.Tensor:
        """(batch, tokens): the attention each token receives, averaged over heads, queries and layers."""
        if not self.layers:
            raise UsageError("no cross-attention layer ran inside record_cross_attention")
        assert self.token_sums is not None
        return self.token_sums / self.layers

    def entropy(self) -> torch.Tensor:
        if not self.layers:
            raise UsageError("no cross-attention layer ran inside record_cross_attention")
        assert self.sums is not None
        return self.sums / self.layers


class EntropyProcessor:
    """Attention as softmax(q k^T / sqrt(d)) v, written out so the probabilities exist; records the
    entropy over keys (tokens) per batch row, averaged over heads and queries."""

    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None, *args: Any,
                 **kwargs: Any) -> Any:
        """The layer's attention with its per-position entropy recorded."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim, hidden_shape = hidden_states.ndim, hidden_states.shape
        q, k, v, attention_mask, batch = _qkv(attn, hidden_states, encoder_hidden_states, attention_mask)
        probs = attn.get_attention_scores(q, k, attention_mask)            # (batch * heads, queries, tokens)
        p = probs.float()
        ent = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)              # (batch * heads, queries)
        self.recorder.add(ent.view(batch, -1).mean(dim=1), p.view(batch, -1, p.shape[-1]).mean(dim=1))
        return _finish(attn, torch.bmm(probs, v), residual, ndim, hidden_shape)


def _qkv(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor],
         attention_mask: Optional[torch.Tensor]) -> tuple:
    """(q, k, v as (batch * heads, length, d), the prepared mask, batch) as diffusers' AttnProcessor
    computes them."""
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch = hidden_states.shape[0]
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key, value = attn.to_k(context), attn.to_v(context)
    q, k, v = (attn.head_to_batch_dim(z) for z in (query, key, value))
    return q, k, v, attention_mask, batch


def _finish(attn: Any, out, residual, ndim, hidden_shape) -> Any:
    out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(out)))
    if ndim == 4:
        out = out.transpose(-1, -2).reshape(hidden_shape)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class LogitEditProcessor:
    """Cross-attention whose logits are edited on some batch rows: `edit(scores, rows)` gets the
    scaled logits q k^T / sqrt(d) of the selected rows as (rows, heads, queries, tokens) and
    returns them edited (the rows' indices into the batch given); the other rows come from the
    layer's own processor, bit for bit (`rows` None: every row is edited)."""

    def __init__(self, base, edit, rows: Any = None) -> None:
        self.base, self.edit, self.rows = base, edit, rows

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None, *args: Any,
                 **kwargs: Any) -> Any:
        """The layer's attention with the edit applied to the chosen rows' logits."""
        plain = None
        if self.rows is not None:
            plain = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
            if not len(self.rows):
                return plain
        rows = self.rows if self.rows is not None else torch.arange(hidden_states.shape[0],
                                                                   device=hidden_states.device)
        pick = lambda z: None if z is None else z[rows]  # noqa: E731
        sub, ctx = hidden_states[rows], pick(encoder_hidden_states)
        residual = sub
        if attn.spatial_norm is not None:
            sub = attn.spatial_norm(sub, pick(temb))
        ndim, shape = sub.ndim, sub.shape
        q, k, v, mask, batch = _qkv(attn, sub, ctx, pick(attention_mask))
        heads = attn.heads
        scores = torch.baddbmm(torch.zeros(1, 1, 1, dtype=q.dtype, device=q.device) if mask is None else mask,
                               q, k.transpose(-1, -2), beta=0 if mask is None else 1, alpha=attn.scale)
        scores = self.edit(scores.view(batch, heads, *scores.shape[1:]), rows).view(batch * heads, *scores.shape[1:])
        probs = scores.float().softmax(dim=-1).to(v.dtype)
        out = _finish(attn, torch.bmm(probs, v), residual, ndim, shape)
        if plain is None:
            return out
        plain = plain.clone()
        plain[rows] = out.to(plain.dtype)
        return plain


def editing_processors(saved: dict, edit: Callable, rows: Any = None,
                       layers: Optional[Callable[[str], bool]] = None) -> dict:
    """The processors of a UNet with each cross-attention layer's (attn2) wrapped in a
    LogitEditProcessor applying `edit` on `rows` of its batch (`layers`: which of them, by the
    processor's name, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor";
    UnsupportedPipeline: no such layer)."""
    procs = {name: (LogitEditProcessor(proc, edit, rows)
                    if name.endswith("attn2.processor") and (layers is None or layers(name)) else proc)
             for name, proc in saved.items()}
    if not any(isinstance(p, LogitEditProcessor) for p in procs.values()):
        raise UnsupportedPipeline("this UNet has no cross-attention layers (attn2)")
    return procs


@contextlib.contextmanager
def edit_cross_attention(unet: Any, edit: Callable, rows: Any = None,
                         layers: Optional[Callable[[str], bool]] = None) -> Iterator[None]:
    """Inside the block every cross-attention layer (attn2) of the UNet runs LogitEditProcessor
    with `edit` on `rows` of its batch; the processors are restored afterwards, also on error (a
    rule's own extra call; the pipeline's calls are edited by mitigations.hooks.AttentionEdit)."""
    require_cross_attention(unet, "edits a UNet's cross-attention")
    saved = unet.attn_processors
    unet.set_attn_processor(editing_processors(saved, edit, rows, layers))
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


def require_cross_attention(unet: Any, what: str) -> None:
    """UnsupportedPipeline unless the network is a UNet (with cross-attention layers)."""
    if not type(unet).__name__.startswith("UNet"):
        from .errors import UnsupportedPipeline

        raise UnsupportedPipeline(f"this {what}; {type(unet).__name__} attends jointly over image and text tokens "
                                  f"(SD3, Flux): it has no cross-attention map")


@contextlib.contextmanager
def record_cross_attention(unet: Any):
    """Record the cross-attention entropy of the UNet calls inside the block (see module doc)."""
    require_cross_attention(unet, "metric reads a UNet's cross-attention maps (attn_entropy)")
    saved = unet.attn_processors
    rec = _Recorder()
    procs = {name: (EntropyProcessor(rec) if name.endswith("attn2.processor") else proc)
             for name, proc in saved.items()}
    if not any(isinstance(p, EntropyProcessor) for p in procs.values()):
        raise UnsupportedPipeline("this UNet has no cross-attention layers (attn2)")
    unet.set_attn_processor(procs)
    try:
        yield rec
    finally:
        unet.set_attn_processor(saved)
