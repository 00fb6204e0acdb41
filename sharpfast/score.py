"""The score-model adapter: a stock diffusers pipeline as "eps and score for these latents,
this timestep, these conditional and null embeddings, in one batch".

Every model parameterization is converted to eps, and eps to the score, here and nowhere else
(k-diffusion style), so that each metric is written once. All metrics work in the
variance-preserving space the UNet sees: x = scheduler.scale_model_input(latents, t), with
alpha_bar from the scheduler (from its sigma for Euler-type schedulers, alpha_bar = 1/(1 + sigma^2)),
so that the same initial noise gives comparable numbers under DDIM, DPM-Solver or Euler.

The user's pipeline is never modified: the scheduler is copied before set_timesteps, and the
UNet is only called (attention processors are swapped and restored only by the exact JVP path).
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from .errors import UnsupportedPipeline

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# schedulers that work in sigma space (x = x0 + sigma eps) and scale the UNet input
_SIGMA_SPACE = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")


# ---- the one place that converts predictions ----------------------------------------

def to_eps(pred: torch.Tensor, x: torch.Tensor, alpha_bar: float, prediction_type: str) -> torch.Tensor:
    """The UNet's prediction as eps_hat, in fp32 (x: the VP latent the UNet saw)."""
    pred, x = pred.float(), x.float()
    a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
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
    return {"epsilon": 1.0, "v_prediction": a, "sample": -a / s}[prediction_type]


def sigma_of(alpha_bar: float) -> float:
    return math.sqrt(1.0 - alpha_bar)


def eps_to_score(eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """s(x) = grad log p_t(x) = -eps_hat / sigma_t."""
    return -eps / sigma_of(alpha_bar)


@contextlib.contextmanager
def math_attention(unet):
    """Classic (math) attention for forward-mode AD (the exact JVP paths); the original
    processors are restored."""
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
    cond_added: Optional[dict] = None   # SDXL: text_embeds, time_ids
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
            added = {k: torch.cat([self.null_added[k].repeat(repeats, 1), self.cond_added[k].repeat(repeats, 1)])
                     for k in self.cond_added}
        return hidden, added


def _check_pipeline(pipe):
    names = {cls.__name__ for cls in type(pipe).__mro__}
    if not names & set(SUPPORTED_PIPELINES):
        raise UnsupportedPipeline(f"sharpfast supports {', '.join(SUPPORTED_PIPELINES)} (and their subclasses); "
                        f"got {type(pipe).__name__}")
    pt = pipe.scheduler.config.get("prediction_type", "epsilon")
    if pt not in PREDICTION_TYPES:
        raise UnsupportedPipeline(f"unsupported scheduler prediction_type {pt!r}; expected one of {PREDICTION_TYPES}")
    return "StableDiffusionXLPipeline" in names


class PromptEncoder:
    """Prompts as the pipeline encodes them for CFG (null = the empty prompt), with the null
    prompt's embeddings cached per batch shape and a note for every prompt the tokenizer truncates."""

    def __init__(self, pipe, is_xl: bool, device):
        self.pipe, self.is_xl, self.device = pipe, is_xl, device
        self._null = {}  # (batch, n, height, width) -> the null embeddings the pipeline computed

    def encode(self, prompts: list[str], n: int, height: int, width: int) -> Conditioning:
        """Embeddings as the pipeline computes them for CFG (null = the empty prompt).

        The null embeddings depend only on the batch shape: they are encoded by the pipeline once
        per shape and adapter (same call, same batch, so the same bits) and reused, which halves the
        text-encoder work of a long run of equal batches (scan).
        """
        p, dev = self.pipe, self.device
        warnings = [self._truncation(prompt) for prompt in prompts]
        key = (len(prompts), n, height, width)
        cached = self._null.get(key)
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

    def _truncation(self, prompt: str) -> list[str]:
        out = []
        for tok in filter(None, (self.pipe.tokenizer, getattr(self.pipe, "tokenizer_2", None))):
            length = len(tok(prompt).input_ids)
            if length > tok.model_max_length:
                out.append(f"prompt is {length} tokens, truncated to {tok.model_max_length} as the pipeline does")
                break
        return out


class LatentSpace:
    """The pipeline's latents: their default size and shape, and the noise it starts from."""

    def __init__(self, pipe, is_xl: bool, device, dtype):
        self.pipe, self.is_xl, self.device, self.dtype = pipe, is_xl, device, dtype
        self.unet_config = pipe.unet.config

    def default_size(self) -> tuple[int, int]:
        p = self.pipe
        size = (p.default_sample_size if self.is_xl else self.unet_config.sample_size) * p.vae_scale_factor
        return size, size

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.pipe.vae_scale_factor
        return self.unet_config.in_channels, height // f, width // f

    def noise(self, count: int, height: int, width: int, generator=None) -> torch.Tensor:
        """Unit Gaussian noise drawn exactly as pipe.prepare_latents draws it (same generator, same
        order): what `pipe(latents=...)` takes, before the scheduler's init_noise_sigma."""
        from diffusers.utils.torch_utils import randn_tensor

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

    def __init__(self, pipe):
        self.is_xl = _check_pipeline(pipe)
        self.pipe = pipe
        self.unet = pipe.unet
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        self.stats = {"unet_calls": 0, "unet_rows": 0}  # shared with with_unet() copies
        self._place()
        self.prompts = PromptEncoder(pipe, self.is_xl, self.device)
        self.latents = LatentSpace(pipe, self.is_xl, self.device, self.dtype)

    def _place(self):
        # read once: diffusers' ModelMixin.device / .dtype walk the parameters on every access,
        # which costs milliseconds per call on a per-prompt path (an adapter lives for one call)
        self.device, self.dtype = self.unet.device, self.unet.dtype

    # -- forwarded to the prompt encoder and the latent space ------------------------------
    def encode(self, prompts: list[str], n: int, height: int, width: int) -> "Conditioning":
        return self.prompts.encode(prompts, n, height, width)

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
    def scheduler(self, num_inference_steps: int):
        """A private copy of the pipeline's scheduler with its timesteps set."""
        sched = copy.deepcopy(self.pipe.scheduler)
        sched.set_timesteps(num_inference_steps, device=self.device)
        return sched

    def alpha_bar(self, sched, t) -> float:
        """alpha_bar of the VP latent the UNet sees at t (call after sched.scale_model_input)."""
        if type(sched).__name__ in _SIGMA_SPACE:
            return self.alpha_bar_at(sched, sched.step_index)
        return float(sched.alphas_cumprod[int(t)])

    def alpha_bar_at(self, sched, index: int) -> float:
        """alpha_bar at the index-th timestep of a scheduler whose timesteps are set."""
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
    def predict(self, x: torch.Tensor, t, cond: Conditioning, repeats: int = 1):
        """Raw predictions (null, cond) at x (R*N rows, R = repeats of the N images) in ONE UNet call."""
        hidden, added = cond.cfg_batch(repeats)
        xx = torch.cat([x, x]).to(self.dtype)
        tt = torch.as_tensor(t, device=self.device)
        self.stats["unet_calls"] += 1
        self.stats["unet_rows"] += xx.shape[0]
        out = self.unet(xx, tt, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]
        return out.chunk(2)

    def predict_cond(self, x: torch.Tensor, t, cond: Conditioning):
        """The conditional branch alone at x (N rows, one UNet call on N rows)."""
        self.stats["unet_calls"] += 1
        self.stats["unet_rows"] += x.shape[0]
        return self.unet(x.to(self.dtype), torch.as_tensor(t, device=self.device), encoder_hidden_states=cond.cond,
                         added_cond_kwargs=cond.cond_added, return_dict=False)[0]

    def eps(self, x, t, alpha_bar, cond: Conditioning, repeats: int = 1):
        """(eps_null, eps_cond) in fp32."""
        u, c = self.predict(x, t, cond, repeats)
        return to_eps(u, x, alpha_bar, self.prediction_type), to_eps(c, x, alpha_bar, self.prediction_type)
