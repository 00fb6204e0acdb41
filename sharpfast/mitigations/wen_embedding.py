"""`wen_embedding`: Wen et al.'s mitigation: optimize the conditional prompt embedding to shrink
||eps_Δ|| at the first sampling step (AdamW, lr 0.05, each image stops once under its target
loss), then sample from the same initial noise with the optimized embedding. Takes gradients
with torch.autograd.grad, so no .grad is left on the UNet's parameters; the pipeline is left as
it was."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from .. import validate
from ..errors import BadArgument, UnsupportedPipeline
from .base import Context, MethodConfig, Plan, register


def wen_embedding(pipe: Any, prompts: list, latents: Tensor, *, target_ratio: float = 0.5,
                  target_loss: float | None = None, lr: float = 0.05, max_steps: int = 50,
                  num_inference_steps: int | None = None, return_info: bool = False) -> tuple:
    """Wen et al.'s mitigation: (prompt_embeds, negative_prompt_embeds) to pass to `pipe(...)`.

    One row per latent (prompt-major, len(latents) a multiple of len(prompts)). Each row's loss is
    ||eps_Δ|| at the first timestep of `num_inference_steps`; a row stops once its loss is at most
    `target_loss`, or `target_ratio` times its initial loss when target_loss is None; at most
    `max_steps` AdamW steps (one CFG forward and backward each); num_inference_steps defaults to
    the pipeline's own.
    """
    from ..adapters import ScoreModel

    model = ScoreModel(pipe)
    num_inference_steps = model.resolve(num_inference_steps=num_inference_steps).num_inference_steps
    if not model.embeddings_only:
        raise UnsupportedPipeline(f"wen_embedding optimizes the text embeddings of models conditioned on them alone "
                                  f"(StableDiffusionPipeline, SD 1.x / 2.x); {model.family}'s pooled / added inputs "
                                  f"are not optimized")
    prompts = validate.prompts(prompts, "prompts")
    if len(latents) % len(prompts):
        raise BadArgument(f"{len(latents)} latents are not a multiple of {len(prompts)} prompts")
    n = len(latents) // len(prompts)
    sched = model.scheduler(num_inference_steps)
    t = sched.timesteps[0]
    x = sched.scale_model_input(latents.to(model.device, model.dtype), t)
    ab = model.alpha_bar(sched, t)
    h, w = (s * pipe.vae_scale_factor for s in latents.shape[-2:])
    cond = model.encode(prompts, n, h, w)
    emb = cond.cond.detach().float().clone().requires_grad_(True)
    opt = torch.optim.AdamW([emb], lr=lr)
    target = None if target_loss is None else torch.full((len(emb),), float(target_loss), device=emb.device)
    losses = None
    steps = 0
    for steps in range(max_steps + 1):  # bounded: max_steps updates, the last pass only measures
        u, c = model.eps(x, t, ab, dataclasses.replace(cond, cond=emb.to(model.dtype)))
        losses = (c - u).reshape(len(emb), -1).norm(dim=1)
        if target is None:
            target = target_ratio * losses.detach()
        active = losses.detach() > target
        if steps == max_steps or not bool(active.any()):
            break
        (grad,) = torch.autograd.grad((losses * active).sum(), emb)
        keep = emb.detach().clone()
        emb.grad = grad
        opt.step()
        with torch.no_grad():
            emb[~active] = keep[~active]  # rows that reached their target stay where they were
    out = (emb.detach().to(model.dtype), cond.null.detach())
    if return_info:
        assert losses is not None and target is not None  # max_steps >= 1 runs the loop at least once
        info = {"steps": steps, "final_loss": losses.detach().cpu(), "target": target.cpu(),
                "converged": bool((losses.detach() <= target).all()), "unet_calls": model.stats["unet_calls"]}
        return (*out, info)
    return out


@dataclasses.dataclass(frozen=True)
class WenEmbeddingConfig(MethodConfig):
    """Wen et al.'s knob: each image stops once ||eps_Δ|| is under this share of its initial value."""

    target_ratio: float = 0.5

    @classmethod
    def from_setting(cls, setting: Any) -> WenEmbeddingConfig:
        """A number (or its text) or a config."""
        return cls.from_number(setting, "wen_embedding's setting (target / initial ||eps_Δ||)")


@register(
    "wen_embedding",
    cost="1 CFG call + 1 backward per AdamW step (at most 50), then the sampler",
    knob="target / initial ||eps_Δ||",
    default=0.5,
    sweep=(0.9, 0.7, 0.5, 0.3, 0.15),
    needs=("cfg", "embeddings_only"),
    kind="prompt",
    config=WenEmbeddingConfig,
)
def _wen_embedding(ctx: Context, setting: Any) -> Plan:
    if ctx.rows is not None:
        raise BadArgument("wen_embedding changes whole prompts; it cannot mitigate single rows")
    ratio = WenEmbeddingConfig.from_setting(setting).target_ratio
    emb, null, info = wen_embedding(ctx.pipe, ctx.prompts, ctx.latents, target_ratio=ratio,
                                    num_inference_steps=ctx.num_inference_steps, return_info=True)
    return Plan({"prompt_embeds": emb, "negative_prompt_embeds": null}, info={"unet_calls_before": info["unet_calls"]},
                prompts=[])
