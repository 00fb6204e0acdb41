"""The score-model adapter: a stock diffusers pipeline as "eps and score for these latents,
this timestep, these conditional and null embeddings, in one batch".

Every model parameterization is converted to eps, and eps to the score, here and nowhere else
(k-diffusion style), so that each metric is written once. All metrics work in the
variance-preserving space the UNet sees: x = scheduler.scale_model_input(latents, t), with
alpha_bar from the scheduler (from its sigma for Euler-type schedulers, alpha_bar = 1/(1 + sigma^2)),
so that the same initial noise gives comparable numbers under DDIM, DPM-Solver or Euler.

The user's pipeline is never modified: the scheduler is copied before set_timesteps, and the
UNet is only called (attention processors are swapped and restored only by the exact JVP path).

Flow-matching pipelines (Stable Diffusion 3, Flux; prediction type "flow"). Rectified flow:
x_t = (1 - sigma) x_0 + sigma eps, the transformer predicts v = eps - x_0, so
eps_hat = x_t + (1 - sigma) v_hat and the score is s = -eps_hat / sigma. Between two prompts at
the same x_t: eps_c - eps_u = (1 - sigma)(v_c - v_u), s_Δ = -((1 - sigma) / sigma) Δv and
H_Δ = ∇s_Δ = -((1 - sigma) / sigma) ∇Δv. At the first step sigma = 1 exactly, so eps_hat = x_t for
every prompt and every score difference is 0: p_1 is N(0, I) whatever the prompt. The prompt shows
in the rate at which they leave 0, and (sigma / (1 - sigma))^k times the paper's quantities have
finite limits at sigma = 1 that carry it: Wen's ||Δeps|| / (1 - sigma) = ||Δv||, the normalized
score difference -Δv, the normalized sharpness ||(∇Δv) Δv|| = (sigma / (1 - sigma))^2 ||H_Δ s_Δ||.
That is what the adapter presents for these models, at every step: the velocity v as "eps" with
alpha_bar = 0 (unit noise), so every metric written for eps computes the normalized quantity,
defined at sigma = 1 and, at sigma < 1, the paper's quantity times a positive factor that depends
only on the step (the ranking of prompts at a step is the paper's). Two exceptions are not mere
rescalings: score_norm becomes ||v_c||^2 and trace -tr ∇v_c (the paper's differ from these by
terms that do not depend on the prompt at sigma = 1: ||x||^2 and -D).
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from .errors import UnsupportedPipeline

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline",
                       "FluxPipeline")
FLOW_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
# schedulers that work in sigma space (x = x0 + sigma eps) and scale the UNet input
_SIGMA_SPACE = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")


# ---- the one place that converts predictions ----------------------------------------

def to_eps(pred: torch.Tensor, x: torch.Tensor, alpha_bar: float, prediction_type: str) -> torch.Tensor:
    """The UNet's prediction as eps_hat, in fp32 (x: the VP latent the UNet saw)."""
    pred, x = pred.float(), x.float()
    a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    if prediction_type == "flow":  # the velocity at unit noise: the normalized view (module doc)
        return pred
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return a * pred + s * x
    if prediction_type == "sample":
        return (x - a * pred) / s
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def eps_per_pred(prediction_type: str, alpha_bar: float) -> float:
    """d eps_hat / d prediction: differences of predictions at the same x scale by this into eps."""
    a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    return {"epsilon": 1.0, "v_prediction": a, "sample": -a / s, "flow": 1.0}[prediction_type]


def sigma_of(alpha_bar: float) -> float:
    return math.sqrt(1.0 - alpha_bar)


def eps_to_score(eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """s(x) = grad log p_t(x) = -eps_hat / sigma_t."""
    return -eps / sigma_of(alpha_bar)


@contextlib.contextmanager
def math_attention(unet):
    """Classic (math) attention for forward-mode AD (the exact JVP paths): a UNet's processors are
    swapped for AttnProcessor and restored; a transformer (SD3, Flux) keeps its processors and runs
    scaled_dot_product_attention on its math backend, which forward-mode AD goes through."""
    if not type(unet).__name__.startswith("UNet"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            yield unet
        return
    from diffusers.models.attention_processor import AttnProcessor

    saved = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())
    try:
        yield unet
    finally:
        unet.set_attn_processor(saved)


# ---- conditioning ----------------------------------------------------------------------

@dataclass
class Conditioning:
    """Embeddings of N images (prompt-major: image j of prompt i is row i * n + j)."""

    cond: torch.Tensor
    null: torch.Tensor
    cond_added: Optional[dict] = None   # SDXL: text_embeds, time_ids; SD3 / Flux: pooled_projections (+ guidance)
    null_added: Optional[dict] = None
    warnings: list = field(default_factory=list)  # per prompt: list of str

    def __len__(self):
        return self.cond.shape[0]

    def to(self, dtype) -> "Conditioning":
        """The same embeddings in another floating dtype (time ids and other tensors alike)."""
        cast = lambda d: None if d is None else {k: v.to(dtype) for k, v in d.items()}  # noqa: E731
        return replace(self, cond=self.cond.to(dtype), null=self.null.to(dtype), cond_added=cast(self.cond_added),
                       null_added=cast(self.null_added))

    def rows(self, idx) -> "Conditioning":
        pick = lambda d: None if d is None else {k: v[idx] for k, v in d.items()}  # noqa: E731
        return replace(self, cond=self.cond[idx], null=self.null[idx], cond_added=pick(self.cond_added),
                       null_added=pick(self.null_added))

    def cfg_batch(self, repeats: int = 1):
        """(encoder_hidden_states, added_cond_kwargs) of the batch [null; cond], each part repeated."""
        hidden = torch.cat([self.null.repeat(repeats, 1, 1), self.cond.repeat(repeats, 1, 1)])
        added = None
        if self.cond_added is not None:
            rep = lambda v: v.repeat(repeats, *[1] * (v.dim() - 1))  # noqa: E731
            added = {k: torch.cat([rep(self.null_added[k]), rep(self.cond_added[k])]) for k in self.cond_added}
        return hidden, added


def family(pipe) -> str:
    """"sd", "sdxl", "sd3" or "flux" (UnsupportedPipeline for anything else)."""
    names = {cls.__name__ for cls in type(pipe).__mro__}
    for fam, cls in (("flux", "FluxPipeline"), ("sd3", "StableDiffusion3Pipeline"),
                     ("sdxl", "StableDiffusionXLPipeline"), ("sd", "StableDiffusionPipeline")):
        if cls in names:
            return fam
    raise UnsupportedPipeline(f"sharpfast supports {', '.join(SUPPORTED_PIPELINES)} (and their subclasses); "
                              f"got {type(pipe).__name__}")


def denoiser(pipe):
    """The pipeline's denoising network: pipe.unet, or pipe.transformer for SD3 / Flux."""
    return pipe.transformer if family(pipe) in ("sd3", "flux") else pipe.unet


def pipeline_defaults(pipe) -> dict:
    """num_inference_steps and guidance_scale as the pipeline's own __call__ defaults them (SD 50 /
    7.5, SD3 28 / 7.0, Flux 28 / 3.5): what a request that names neither gets."""
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters
    out = {}
    for name, fallback in (("num_inference_steps", 50), ("guidance_scale", 7.5)):
        d = params[name].default if name in params else inspect.Parameter.empty
        out[name] = fallback if d is inspect.Parameter.empty or d is None else d
    return out


def _check_pipeline(pipe):
    fam = family(pipe)
    if fam in ("sd3", "flux"):
        return fam
    pt = pipe.scheduler.config.get("prediction_type", "epsilon")
    if pt not in PREDICTION_TYPES or pt == "flow":
        raise UnsupportedPipeline(f"unsupported scheduler prediction_type {pt!r}; expected one of "
                                  f"{PREDICTION_TYPES[:3]}")
    return fam


class PromptEncoder:
    """Prompts as the pipeline encodes them for CFG (null = the empty prompt), with the null
    prompt's embeddings cached per batch shape and a note for every prompt the tokenizer truncates."""

    def __init__(self, pipe, fam: str, device, max_sequence_length=None):
        self.pipe, self.family, self.device = pipe, fam, device
        self.is_xl = fam == "sdxl"
        self.max_sequence_length = max_sequence_length or {"sd3": 256, "flux": 512}.get(fam)
        self.txt_ids = None  # Flux: the text tokens' position ids
        self._null = {}  # (batch, n, height, width) -> the null embeddings the pipeline computed

    def encode(self, prompts: list[str], n: int, height: int, width: int, guidance_scale=None) -> Conditioning:
        """Embeddings as the pipeline computes them for CFG (null = the empty prompt).

        The null embeddings depend only on the batch shape: they are encoded by the pipeline once
        per shape and adapter (same call, same batch, so the same bits) and reused, which halves the
        text-encoder work of a long run of equal batches (scan).
        """
        p, dev = self.pipe, self.device
        warnings = [self._truncation(prompt) for prompt in prompts]
        key = (len(prompts), n, height, width)
        cached = self._null.get(key)
        if self.family in ("sd3", "flux"):
            return self._encode_flow(prompts, n, key, guidance_scale, warnings)
        with torch.no_grad():
            if not self.is_xl:
                cond, null = p.encode_prompt(prompts, dev, n, cached is None)
                if cached is None:
                    self._null[key] = cached = (null, None)
                return Conditioning(cond, cached[0], warnings=warnings)
            cond, null, pooled, null_pooled = p.encode_prompt(prompts, device=dev, num_images_per_prompt=n,
                                                              do_classifier_free_guidance=cached is None)
            if cached is None:
                self._null[key] = cached = (null, null_pooled)
            null, null_pooled = cached
            proj = int(pooled.shape[-1]) if p.text_encoder_2 is None else p.text_encoder_2.config.projection_dim
            time_ids = p._get_add_time_ids((height, width), (0, 0), (height, width), dtype=cond.dtype,
                                           text_encoder_projection_dim=proj).to(dev).repeat(len(cond), 1)
        return Conditioning(cond, null, {"text_embeds": pooled, "time_ids": time_ids},
                            {"text_embeds": null_pooled, "time_ids": time_ids}, warnings)

    def _encode_flow(self, prompts, n, key, guidance_scale, warnings) -> Conditioning:
        p, dev, msl = self.pipe, self.device, self.max_sequence_length
        cached = self._null.get(key)
        with torch.no_grad():
            if self.family == "sd3":  # the null branch: the empty negative prompt, as the pipeline makes it
                cond, null, pooled, null_pooled = p.encode_prompt(prompts, None, None, device=dev, num_images_per_prompt=n,
                                                                  do_classifier_free_guidance=cached is None,
                                                                  max_sequence_length=msl)
                if cached is None:
                    self._null[key] = cached = (null, null_pooled)
                null, null_pooled = cached
                return Conditioning(cond, null, {"pooled_projections": pooled}, {"pooled_projections": null_pooled},
                                    warnings)
            # Flux: guidance-distilled, its call has no null branch; the empty prompt plays it here
            cond, pooled, txt_ids = p.encode_prompt(prompts, None, device=dev, num_images_per_prompt=n,
                                                    max_sequence_length=msl)
            null, null_pooled = self.flux_null(len(prompts), n, key)
            self.txt_ids = txt_ids
            added = lambda pool: {"pooled_projections": pool}  # noqa: E731
            ca, na = added(pooled), added(null_pooled)
            if p.transformer.config.guidance_embeds:
                g = torch.full((len(cond),), 3.5 if guidance_scale is None else float(guidance_scale), device=dev,
                               dtype=torch.float32)
                ca["guidance"], na["guidance"] = g, g
            return Conditioning(cond, null, ca, na, warnings)

    def flux_null(self, count: int, n: int, key=None):
        """Flux's null branch: the empty prompt's (embeddings, pooled), encoded once per batch shape."""
        key = key if key is not None else (count, n)
        if key not in self._null:
            with torch.no_grad():
                null, null_pooled, _ = self.pipe.encode_prompt([""] * count, None, device=self.device,
                                                               num_images_per_prompt=n,
                                                               max_sequence_length=self.max_sequence_length)
            self._null[key] = (null, null_pooled)
        return self._null[key]

    def _truncation(self, prompt: str) -> list[str]:
        out = []
        for tok in filter(None, (self.pipe.tokenizer, getattr(self.pipe, "tokenizer_2", None))):
            if type(tok).__name__.startswith("T5"):  # T5 is cut at max_sequence_length, not model_max_length
                continue
            length = len(tok(prompt).input_ids)
            if length > tok.model_max_length:
                out.append(f"prompt is {length} tokens, truncated to {tok.model_max_length} as the pipeline does")
                break
        return out


class LatentSpace:
    """The pipeline's latents: their default size and shape, and the noise it starts from."""

    def __init__(self, pipe, fam: str, device, dtype):
        self.pipe, self.family, self.device, self.dtype = pipe, fam, device, dtype
        self.is_xl = fam == "sdxl"
        self.unet_config = denoiser(pipe).config
        self.grid = {}  # Flux: packed length -> (h, w) of the latent before packing

    def default_size(self) -> tuple[int, int]:
        p = self.pipe
        base = self.unet_config.sample_size if self.family == "sd" else p.default_sample_size
        size = base * p.vae_scale_factor
        return size, size

    def _flux_hw(self, height: int, width: int) -> tuple[int, int]:
        f = self.pipe.vae_scale_factor * 2
        return 2 * (height // f), 2 * (width // f)

    def latent_shape(self, height: int, width: int) -> tuple:
        """The shape of one image's latent as `pipe(latents=...)` takes it (Flux: packed, (L, 4C))."""
        if self.family == "flux":
            h, w = self._flux_hw(height, width)
            L = (h // 2) * (w // 2)
            self.grid[L] = (h, w)
            return L, self.unet_config.in_channels
        f = self.pipe.vae_scale_factor
        return self.unet_config.in_channels, height // f, width // f

    def channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """Latents as (N, C, h, w) (Flux's packed (N, L, 4C) unpacked; others as they are)."""
        if self.family != "flux":
            return x
        h, w = self.grid[x.shape[1]]
        c = x.shape[2] // 4
        return x.view(len(x), h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(len(x), c, h, w)

    def noise(self, count: int, height: int, width: int, generator=None) -> torch.Tensor:
        """Unit Gaussian noise drawn exactly as pipe.prepare_latents draws it (same generator, same
        order): what `pipe(latents=...)` takes, before the scheduler's init_noise_sigma (Flux:
        drawn as (C, h, w), then packed as the pipeline packs it)."""
        from diffusers.utils.torch_utils import randn_tensor

        if self.family == "flux":
            h, w = self._flux_hw(height, width)
            c = self.unet_config.in_channels // 4
            self.latent_shape(height, width)
            z = randn_tensor((count, c, h, w), generator=generator, device=self.device, dtype=self.dtype)
            return z.view(count, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(count, -1, 4 * c)
        shape = (count, *self.latent_shape(height, width))
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)

    def noise_for_ids(self, ids, n: int, height: int, width: int, seed: int) -> torch.Tensor:
        """The batch jobs' noise (scan, `sharpfast detect`, eval detect, the demo): prompt `id` draws
        its n images from a CPU generator seeded with seed + id, so a prompt's scores depend on its
        id alone, not on its batch, the process count or a restart. On the UNet's device."""
        gens = [torch.Generator("cpu").manual_seed(seed + int(i)) for i in ids]
        return torch.cat([self.noise(n, height, width, g) for g in gens]).to(self.device)

    def initial_latents(self, sched, count: int, height: int, width: int, generator=None) -> torch.Tensor:
        """x_T as the pipeline starts from it: noise(...) * init_noise_sigma."""
        return self.noise(count, height, width, generator) * sched.init_noise_sigma


class ScoreModel:
    """A stock pipeline as a score model: the UNet's predictions as eps and scores at any latents
    (and an exact fp32 variant for derivatives), the schedule's alpha_bar; counts UNet calls and
    rows in `stats`. Prompt encoding (`.prompts`, a PromptEncoder) and latents and noise
    (`.latents`, a LatentSpace) are kept apart; the methods below forward to them."""

    def __init__(self, pipe, max_sequence_length=None):
        self.family = _check_pipeline(pipe)
        self.is_xl = self.family == "sdxl"
        self.flow = self.family in ("sd3", "flux")
        # guidance-distilled (Flux): the pipeline's own call has no null branch
        self.distilled = self.family == "flux"
        self.pipe = pipe
        self.unet = denoiser(pipe)  # the denoising network: a UNet, or SD3's / Flux's transformer
        self.prediction_type = "flow" if self.flow else pipe.scheduler.config.get("prediction_type", "epsilon")
        self.stats = {"unet_calls": 0, "unet_rows": 0}  # shared with with_unet() copies
        self._place()
        self.prompts = PromptEncoder(pipe, self.family, self.device, max_sequence_length)
        self.latents = LatentSpace(pipe, self.family, self.device, self.dtype)

    def _place(self):
        # read once: diffusers' ModelMixin.device / .dtype walk the parameters on every access,
        # which costs milliseconds per call on a per-prompt path (an adapter lives for one call)
        self.device, self.dtype = self.unet.device, self.unet.dtype

    # -- forwarded to the prompt encoder and the latent space ------------------------------
    def encode(self, prompts: list[str], n: int, height: int, width: int, guidance_scale=None) -> "Conditioning":
        """guidance_scale: Flux's embedded guidance (its own call's guidance_scale); others ignore it."""
        return self.prompts.encode(prompts, n, height, width, guidance_scale)

    def channels_first(self, x: torch.Tensor) -> torch.Tensor:
        return self.latents.channels_first(x)

    def default_size(self) -> tuple[int, int]:
        return self.latents.default_size()

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return self.latents.latent_shape(height, width)

    def noise(self, count: int, height: int, width: int, generator=None) -> torch.Tensor:
        return self.latents.noise(count, height, width, generator)

    def noise_for_ids(self, ids, n: int, height: int, width: int, seed: int) -> torch.Tensor:
        return self.latents.noise_for_ids(ids, n, height, width, seed)

    def initial_latents(self, sched, count: int, height: int, width: int, generator=None) -> torch.Tensor:
        return self.latents.initial_latents(sched, count, height, width, generator)

    # -- schedule -----------------------------------------------------------------------
    def scheduler(self, num_inference_steps: int, height=None, width=None):
        """A private copy of the pipeline's scheduler with its timesteps set as the pipeline sets
        them (Flux: sigmas 1 .. 1/n shifted by the image's sequence length; height / width default
        to the pipeline's). A flow-matching scheduler gets init_noise_sigma 1 and an identity
        scale_model_input, so the samplers' code is the same for every family."""
        sched = copy.deepcopy(self.pipe.scheduler)
        if not self.flow:
            sched.set_timesteps(num_inference_steps, device=self.device)
            return sched
        if self.family == "flux":  # as FluxPipeline: sigmas 1 .. 1/n, shifted by the image's sequence length
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
        else:
            sched.set_timesteps(num_inference_steps, device=self.device)
        sched.init_noise_sigma = 1.0
        sched.scale_model_input = lambda sample, timestep=None: sample
        return sched

    def alpha_bar(self, sched, t) -> float:
        """alpha_bar of the VP latent the UNet sees at t (call after sched.scale_model_input);
        0 for flow-matching models, whose velocity the adapter presents at unit noise (module doc)."""
        if self.flow:
            return 0.0
        if type(sched).__name__ in _SIGMA_SPACE:
            index = sched.step_index
            if index is None:  # before the first step (a fresh copy): the index of t in the schedule
                index = int((sched.timesteps.to(torch.as_tensor(t).device) == t).nonzero()[0])
            return self.alpha_bar_at(sched, index)
        return float(sched.alphas_cumprod[int(t)])

    def alpha_bar_at(self, sched, index: int) -> float:
        """alpha_bar at the index-th timestep of a scheduler whose timesteps are set."""
        if self.flow:
            return 0.0
        if type(sched).__name__ in _SIGMA_SPACE:
            sigma = float(sched.sigmas[index])
            return 1.0 / (1.0 + sigma * sigma)
        return float(sched.alphas_cumprod[int(sched.timesteps[index])])

    def low_noise(self, sched, from_end: int = 3):
        """(t, alpha_bar) of a low-noise timestep of the schedule: the from_end-th from its end
        (the anisotropy detector's alignment term; the third-to-last, as its authors' code)."""
        k = max(0, len(sched.timesteps) - from_end)
        return sched.timesteps[k], self.alpha_bar_at(sched, k)

    def fp32_unet(self):
        """The UNet in fp32 for exact derivatives: the pipeline's own when it is fp32, else a copy
        made once per adapter (the pipeline's UNet is never cast)."""
        if self.dtype == torch.float32:
            return self.unet
        if getattr(self, "_fp32_unet", None) is None:
            self._fp32_unet = copy.deepcopy(self.unet).float()
        return self._fp32_unet

    def with_unet(self, unet) -> "ScoreModel":
        """The same adapter calling another UNet (an fp32 copy for the exact JVP, say)."""
        other = copy.copy(self)
        other.unet = unet
        other._place()
        return other

    # -- UNet -----------------------------------------------------------------------------
    def _call(self, x, t, hidden, added):
        """One call of the denoising network on rows x with these embeddings (its own signature)."""
        tt = torch.as_tensor(t, device=self.device)
        if self.family in ("sd", "sdxl"):
            return self.unet(x, tt, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]
        tt = tt.reshape(-1)[:1].expand(len(x))
        if self.family == "sd3":
            return self.unet(hidden_states=x, timestep=tt.to(x.dtype), encoder_hidden_states=hidden,
                             pooled_projections=added["pooled_projections"], return_dict=False)[0]
        h, w = self.latents.grid[x.shape[1]]  # Flux: the transformer takes t / 1000 and position ids
        img_ids = self.pipe._prepare_latent_image_ids(len(x), h // 2, w // 2, self.device, x.dtype)
        txt_ids = self.prompts.txt_ids
        if txt_ids is None:
            txt_ids = torch.zeros(hidden.shape[1], 3, device=self.device, dtype=x.dtype)
        return self.unet(hidden_states=x, timestep=(tt / 1000).to(x.dtype), guidance=added.get("guidance"),
                         pooled_projections=added["pooled_projections"], encoder_hidden_states=hidden,
                         txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

    def predict(self, x: torch.Tensor, t, cond: Conditioning, repeats: int = 1):
        """Raw predictions (null, cond) at x (R*N rows, R = repeats of the N images) in ONE UNet call."""
        hidden, added = cond.cfg_batch(repeats)
        xx = torch.cat([x, x]).to(self.dtype)
        self.stats["unet_calls"] += 1
        self.stats["unet_rows"] += xx.shape[0]
        return self._call(xx, t, hidden, added).chunk(2)

    def predict_branch(self, x: torch.Tensor, t, cond: Conditioning, branch: str = "cond"):
        """One branch alone at x (N rows, one call on N rows): "cond" or "null"."""
        self.stats["unet_calls"] += 1
        self.stats["unet_rows"] += x.shape[0]
        hidden, added = (cond.cond, cond.cond_added) if branch == "cond" else (cond.null, cond.null_added)
        return self._call(x.to(self.dtype), t, hidden, added)

    def eps(self, x, t, alpha_bar, cond: Conditioning, repeats: int = 1):
        """(eps_null, eps_cond) in fp32."""
        u, c = self.predict(x, t, cond, repeats)
        return to_eps(u, x, alpha_bar, self.prediction_type), to_eps(c, x, alpha_bar, self.prediction_type)
