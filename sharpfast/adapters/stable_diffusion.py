"""Stable Diffusion 1.x / 2.x and SDXL: a UNet with cross-attention on CLIP embeddings."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from typing_extensions import override

from .base import Conditioning, ScoreModel, scalar_timestep


class StableDiffusionModel(ScoreModel):
    """Stable Diffusion 1.x / 2.x: a UNet on CLIP embeddings (epsilon, v or sample prediction)."""

    pipeline_class, family, embeddings_only, cross_attention = "StableDiffusionPipeline", "sd", True, True

    @override
    def encode(self, prompts: list, n: int, height: int, width: int,
               guidance_scale: Optional[float] = None) -> Conditioning:
        warnings = [self.truncation(prompt) for prompt in prompts]
        key = (len(prompts), n, height, width)
        fresh = key not in self._null
        with torch.no_grad():
            cond, null = self._encode_prompt(prompts, self.device, n, fresh)
        return Conditioning(cond, self._cached_null(key, lambda: null), warnings=warnings)

    @override
    def default_size(self) -> tuple:
        size = self.unet_config.sample_size * self.pipe.vae_scale_factor
        return size, size

    @override
    def call(self, x: Tensor, t: Any, hidden: torch.Tensor, added) -> Any:
        tt = torch.as_tensor(t, device=self.device)
        return self.unet(x, tt, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]

    @override
    def read_call(self, args: Any, kwargs: Any) -> tuple:
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        return sample, scalar_timestep(t), kwargs["encoder_hidden_states"], kwargs.get("added_cond_kwargs")


class StableDiffusionXLModel(StableDiffusionModel):
    """SDXL: two CLIP encoders, their pooled embedding and the size conditioning as added inputs."""

    pipeline_class, family, embeddings_only = "StableDiffusionXLPipeline", "sdxl", False

    @override
    def encode(self, prompts: list, n: int, height: int, width: int,
               guidance_scale: Optional[float] = None) -> Conditioning:
        p, warnings = self.pipe, [self.truncation(prompt) for prompt in prompts]
        key = (len(prompts), n, height, width)
        fresh = key not in self._null
        with torch.no_grad():
            cond, null, pooled, null_pooled = self._encode_prompt(prompts, device=self.device, num_images_per_prompt=n,
                                                              do_classifier_free_guidance=fresh)
            null, null_pooled = self._cached_null(key, lambda: (null, null_pooled))
            proj = int(pooled.shape[-1]) if p.text_encoder_2 is None else p.text_encoder_2.config.projection_dim
            time_ids = p._get_add_time_ids((height, width), (0, 0), (height, width), dtype=cond.dtype,
                                           text_encoder_projection_dim=proj).to(self.device).repeat(len(cond), 1)
        return Conditioning(cond, null, {"text_embeds": pooled, "time_ids": time_ids},
                            {"text_embeds": null_pooled, "time_ids": time_ids}, warnings)

    @override
    def default_size(self) -> tuple:
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return size, size
