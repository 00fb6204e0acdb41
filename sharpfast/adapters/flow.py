"""Flow-matching families: Stable Diffusion 3 and Flux (transformers on joint attention; the
velocity presented at unit noise, sharpfast.adapters' module doc)."""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import Tensor
from typing_extensions import override

from .base import Conditioning, ScoreModel, scalar_timestep


class _FlowModel(ScoreModel):
    """Flow-matching transformers (SD3, Flux): the velocity presented as eps at unit noise."""

    network, flow = "transformer", True

    def _prediction_type(self, pipe: Any) -> str:
        return "flow"

    @override
    def size_multiple(self) -> int:
        """The VAE's factor times 2: the transformer's 2x2 patches (SD3) or packing (Flux)."""
        return 2 * int(self.pipe.vae_scale_factor)

    def default_size(self) -> tuple:
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return size, size

    def scheduler(self, num_inference_steps: int, height: Optional[int] = None, width: Optional[int] = None) -> Any:
        """As the base, then init_noise_sigma 1 and an identity scale_model_input, so the samplers'
        code is the same for every family."""
        sched = self._set_timesteps(copy.deepcopy(self.pipe.scheduler), num_inference_steps, height, width)
        sched.init_noise_sigma = 1.0
        sched.scale_model_input = lambda sample, timestep=None: sample
        return sched

    def _set_timesteps(self, sched: Any, num_inference_steps: int, height: Optional[int],
                       width: Optional[int]) -> Any:
        sched.set_timesteps(num_inference_steps, device=self.device)
        return sched

    def alpha_bar(self, sched: Any, t: Any) -> float:
        """0: the velocity is presented at unit noise (module doc)."""
        return 0.0

    def alpha_bar_at(self, sched: Any, index: int) -> float:
        return 0.0


class StableDiffusion3Model(_FlowModel):
    """Stable Diffusion 3: an MMDiT on CLIP x2 + T5 embeddings and a pooled projection."""

    pipeline_class, family, max_sequence_length = "StableDiffusion3Pipeline", "sd3", 256

    @override
    def encode(self, prompts: list, n: int, height: int, width: int,
               guidance_scale: Optional[float] = None) -> Conditioning:
        warnings = [self.truncation(prompt) for prompt in prompts]
        key = (len(prompts), n, height, width)
        fresh = key not in self._null
        with torch.no_grad():  # the null branch: the empty negative prompt, as the pipeline makes it
            cond, null, pooled, null_pooled = self._encode_prompt(
                prompts, None, None, device=self.device, num_images_per_prompt=n, do_classifier_free_guidance=fresh,
                max_sequence_length=self.max_sequence_length)
        null, null_pooled = self._cached_null(key, lambda: (null, null_pooled))
        return Conditioning(cond, null, {"pooled_projections": pooled}, {"pooled_projections": null_pooled}, warnings)

    @override
    def call(self, x: Tensor, t: Any, hidden: torch.Tensor, added) -> torch.Tensor:
        tt = torch.as_tensor(t, device=self.device).reshape(-1)[:1].expand(len(x))
        return self.unet(hidden_states=x, timestep=tt.to(x.dtype), encoder_hidden_states=hidden,
                         pooled_projections=added["pooled_projections"], return_dict=False)[0]

    @override
    def read_call(self, args: Any, kwargs: Any) -> tuple:
        added = {"pooled_projections": kwargs["pooled_projections"]}
        return kwargs["hidden_states"], scalar_timestep(kwargs["timestep"]), kwargs["encoder_hidden_states"], added


class FluxModel(_FlowModel):
    """Flux: guidance-distilled (no null branch in its call; the empty prompt plays it here), packed
    latents (N, L, 4C) with position ids, the embedded guidance as an input, a shifted schedule."""

    pipeline_class, family, distilled, max_sequence_length = "FluxPipeline", "flux", True, 512

    def __init__(self, pipe: Any, max_sequence_length: Optional[int] = None) -> None:
        super().__init__(pipe, max_sequence_length)
        self.txt_ids = None  # the text tokens' position ids
        self.grid: dict = {}  # packed length -> (h, w) of the latent before packing

    @override
    def encode(self, prompts: list, n: int, height: int, width: int,
               guidance_scale: Optional[float] = None) -> Conditioning:
        warnings = [self.truncation(prompt) for prompt in prompts]
        with torch.no_grad():
            cond, pooled, txt_ids = self._encode_prompt(prompts, None, device=self.device,
                                                            num_images_per_prompt=n,
                                                            max_sequence_length=self.max_sequence_length)
        null, null_pooled = self.null_branch(len(prompts), n, (len(prompts), n, height, width))
        self.txt_ids = txt_ids
        ca, na = {"pooled_projections": pooled}, {"pooled_projections": null_pooled}
        if self.unet.config.guidance_embeds:
            g = torch.full((len(cond),), 3.5 if guidance_scale is None else float(guidance_scale),
                           device=self.device, dtype=torch.float32)
            ca["guidance"], na["guidance"] = g, g
        return Conditioning(cond, null, ca, na, warnings)

    def null_branch(self, count: int, n: int, key: Any = None) -> Any:
        """The empty prompt's (embeddings, pooled), encoded once per batch shape."""
        def compute() -> tuple:
            with torch.no_grad():
                null, null_pooled, _ = self._encode_prompt([""] * count, None, device=self.device,
                                                               num_images_per_prompt=n,
                                                               max_sequence_length=self.max_sequence_length)
            return null, null_pooled
        return self._cached_null(key if key is not None else (count, n), compute)

    def _hw(self, height: int, width: int) -> tuple:
        f = self.pipe.vae_scale_factor * 2
        return 2 * (height // f), 2 * (width // f)

    def latent_shape(self, height: int, width: int) -> tuple:
        """Packed, (L, 4C); registers the grid for channels_first and the position ids."""
        h, w = self._hw(height, width)
        L = (h // 2) * (w // 2)
        self.grid[L] = (h, w)
        return L, self.unet_config.in_channels

    @override
    def channels_first(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.grid[x.shape[1]]
        c = x.shape[2] // 4
        return x.view(len(x), h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(len(x), c, h, w)

    def noise(self, count: int, height: int, width: int, generator: Optional[Any] = None) -> torch.Tensor:
        """Drawn as (C, h, w), then packed as the pipeline packs it."""
        from diffusers.utils.torch_utils import randn_tensor

        h, w = self._hw(height, width)
        c = self.unet_config.in_channels // 4
        self.latent_shape(height, width)
        z = randn_tensor((count, c, h, w), generator=generator, device=self.device, dtype=self.dtype)
        return z.view(count, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(count, -1, 4 * c)

    def _set_timesteps(self, sched: Any, num_inference_steps: int, height: Optional[int],
                       width: Optional[int]) -> Any:
        """As FluxPipeline: sigmas 1 .. 1/n, shifted by the image's sequence length."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        dh, dw = self.default_size()
        c = sched.config
        L = self.latent_shape(height or dh, width or dw)[0]  # also registers the packed grid
        kw = {}
        if c.get("use_dynamic_shifting", False):
            kw["mu"] = calculate_shift(L, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                       c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps),
                            device=self.device, **kw)
        return sched

    @override
    def call(self, x: Tensor, t: Any, hidden: torch.Tensor, added) -> torch.Tensor:
        tt = torch.as_tensor(t, device=self.device).reshape(-1)[:1].expand(len(x))
        h, w = self.grid[x.shape[1]]  # the transformer takes t / 1000 and position ids
        img_ids = self.pipe._prepare_latent_image_ids(len(x), h // 2, w // 2, self.device, x.dtype)
        txt_ids = self.txt_ids
        if txt_ids is None:
            txt_ids = torch.zeros(hidden.shape[1], 3, device=self.device, dtype=x.dtype)
        return self.unet(hidden_states=x, timestep=(tt / 1000).to(x.dtype), guidance=added.get("guidance"),
                         pooled_projections=added["pooled_projections"], encoder_hidden_states=hidden,
                         txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

    @override
    def read_call(self, args: Any, kwargs: Any) -> tuple:
        added = {"pooled_projections": kwargs["pooled_projections"]}
        if kwargs.get("guidance") is not None:  # the embedded guidance, per row
            added["guidance"] = kwargs["guidance"]
        t = kwargs["timestep"] * 1000  # the transformer takes t / 1000
        return kwargs["hidden_states"], scalar_timestep(t), kwargs["encoder_hidden_states"], added

    def split_capture(self, sample: torch.Tensor, t: Any, pred: torch.Tensor, hidden: torch.Tensor, added,
                      prompts: list, n: int, size: Any) -> tuple:
        """The call holds the conditional branch only (its embeddings are the capture's); the null
        branch, the empty prompt, costs one call on the N rows."""
        self.latent_shape(*size)  # the packed latents' grid, for the position ids
        null, null_pooled = self.null_branch(len(prompts), n)
        ca = dict(added)
        cond = Conditioning(hidden, null, ca, {**ca, "pooled_projections": null_pooled})
        with torch.no_grad():
            u = self.predict_branch(sample, t, cond, "null")
        return sample, cond, u, pred
