"""Cross-attention probabilities of a UNet call, for the attention-entropy detector (Ren et al.,
ECCV 2024: memorized prompts concentrate the cross-attention on a few tokens).

    with record_cross_attention(unet) as rec:
        unet(x, t, encoder_hidden_states=...)
    rec.entropy()      # (batch,) mean entropy over tokens, averaged over heads, queries and layers

Fused attention (SDPA, flash) never forms the probabilities, so the cross-attention layers
(attn2) get a recording processor that computes them explicitly for the duration of the block;
the original processors are restored afterwards, also on error.
"""
from __future__ import annotations

import contextlib

import torch


class _Recorder:
    def __init__(self):
        self.sums = None  # (batch,) sum over layers of the mean entropy
        self.layers = 0

    def add(self, ent: torch.Tensor) -> None:
        ent = ent.float()
        self.sums = ent if self.sums is None else self.sums + ent
        self.layers += 1

    def entropy(self) -> torch.Tensor:
        if not self.layers:
            raise RuntimeError("no cross-attention layer ran inside record_cross_attention")
        return self.sums / self.layers


class EntropyProcessor:
    """Attention as softmax(q k^T / sqrt(d)) v, written out so the probabilities exist; records the
    entropy over keys (tokens) per batch row, averaged over heads and queries."""

    def __init__(self, recorder: _Recorder):
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
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
        q, k, v = (attn.head_to_batch_dim(z) for z in (query, key, value))  # (batch * heads, len, d)
        probs = attn.get_attention_scores(q, k, attention_mask)            # (batch * heads, queries, tokens)
        p = probs.float()
        ent = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)              # (batch * heads, queries)
        self.recorder.add(ent.view(batch, -1).mean(dim=1))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def record_cross_attention(unet):
    """Record the cross-attention entropy of the UNet calls inside the block (see module doc)."""
    if not type(unet).__name__.startswith("UNet"):
        from .errors import UnsupportedPipeline

        raise UnsupportedPipeline(f"attn_entropy reads a UNet's cross-attention maps; {type(unet).__name__} "
                                  f"attends jointly over image and text tokens (SD3, Flux): no cross-attention map")
    saved = unet.attn_processors
    rec = _Recorder()
    procs = {name: (EntropyProcessor(rec) if name.endswith("attn2.processor") else proc)
             for name, proc in saved.items()}
    if not any(isinstance(p, EntropyProcessor) for p in procs.values()):
        raise RuntimeError("this UNet has no cross-attention layers (attn2)")
    unet.set_attn_processor(procs)
    try:
        yield rec
    finally:
        unet.set_attn_processor(saved)
