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
import logging
import math
import threading
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from typing_extensions import override

from .errors import BadArgument, UnsupportedPipeline

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
    raise BadArgument(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def eps_per_pred(prediction_type: str, alpha_bar: float) -> float:
    """d eps_hat / d prediction: differences of predictions at the same x scale by this into eps."""
    a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    return {"epsilon": 1.0, "v_prediction": a, "sample": -a / s, "flow": 1.0}[prediction_type]


def sigma_of(alpha_bar: float) -> float:
    """The noise level sqrt(1 - alpha_bar) of a VP latent."""
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

    def to(self, dtype) -> Conditioning:
        """The same embeddings in another floating dtype (time ids and other tensors alike)."""
        cast = lambda d: None if d is None else {k: v.to(dtype) for k, v in d.items()}  # noqa: E731
        return replace(self, cond=self.cond.to(dtype), null=self.null.to(dtype), cond_added=cast(self.cond_added),
                       null_added=cast(self.null_added))

    def rows(self, idx) -> Conditioning:
        """The embeddings of rows idx."""
        pick = lambda d: None if d is None else {k: v[idx] for k, v in d.items()}  # noqa: E731
        return replace(self, cond=self.cond[idx], null=self.null[idx], cond_added=pick(self.cond_added),
                       null_added=pick(self.null_added))

    def cfg_batch(self, repeats: int = 1):
        """(encoder_hidden_states, added_cond_kwargs) of the batch [null; cond], each part repeated."""
        hidden = torch.cat([self.null.repeat(repeats, 1, 1), self.cond.repeat(repeats, 1, 1)])
        added = None
        if self.cond_added is not None and self.null_added is not None:
            rep = lambda v: v.repeat(repeats, *[1] * (v.dim() - 1))  # noqa: E731
            added = {k: torch.cat([rep(self.null_added[k]), rep(self.cond_added[k])]) for k in self.cond_added}
        return hidden, added


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


# ---- the adapters: one class per model family ------------------------------------------

_ADAPTERS: dict[str, type[ScoreModel]] = {}  # diffusers pipeline class name -> its ScoreModel subclass


def adapter_class(pipe) -> type:
    """The ScoreModel subclass for this pipeline: the first class of its MRO that an adapter
    declares as its `pipeline_class` (so a user's subclass of a stock pipeline is served too).

    Raises:
        UnsupportedPipeline: no adapter serves this pipeline.
    """
    for cls in type(pipe).__mro__:
        if cls.__name__ in _ADAPTERS:
            return _ADAPTERS[cls.__name__]
    raise UnsupportedPipeline(f"sharpfast supports {', '.join(SUPPORTED_PIPELINES)} (and their subclasses); "
                              f"got {type(pipe).__name__}")


def adapter_families() -> dict:
    """Every registered family's name -> its capabilities (what mitigations may need)."""
    return {cls.family: cls.capabilities for cls in _ADAPTERS.values()}


def adapt(pipe, max_sequence_length=None) -> ScoreModel:
    """The pipeline's adapter (an adapter given is returned as it is)."""
    return pipe if isinstance(pipe, ScoreModel) else ScoreModel(pipe, max_sequence_length)


def family(pipe) -> str:
    """"sd", "sdxl", "sd3" or "flux" (UnsupportedPipeline for anything else)."""
    return adapter_class(pipe).family  # type: ignore[attr-defined]


def denoiser(pipe):
    """The pipeline's denoising network: pipe.unet, or pipe.transformer for SD3 / Flux."""
    return getattr(pipe, adapter_class(pipe).network)


class _QuietTruncation(logging.Filter):
    """Drops diffusers' "part of your input was truncated" warning in a thread that is inside
    ScoreModel._encode_prompt; every other record, and every other thread's, passes."""

    local = threading.local()
    MESSAGES = ("part of your input was truncated", "Token indices sequence length is longer")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(self.local, "depth", 0) > 0 and any(m in record.getMessage() for m in self.MESSAGES))


_QUIET = _QuietTruncation()


class ScoreModel:
    """A stock pipeline as a score model: the denoiser's predictions as eps and scores at any
    latents (and an exact fp32 variant for derivatives), the schedule's alpha_bar; counts
    denoiser calls and rows in `stats`.

    `ScoreModel(pipe)` returns the adapter of the pipeline's family (a subclass below). A new
    family is one subclass that sets `pipeline_class`, `family` and `network` and implements
    `encode`, `default_size`, `call` and `read_call` (and, where they differ from a plain
    latent UNet, `latent_shape`, `noise`, `channels_first`, `scheduler`, `split_capture`);
    defining the class registers it.

    Args:
        pipe: a diffusers pipeline of a supported family.
        max_sequence_length: the T5 encoder's length (SD3 256, Flux 512 by default).

    Raises:
        UnsupportedPipeline: no adapter serves the pipeline, or its scheduler's prediction type.
    """

    pipeline_class = ""       # the diffusers pipeline class this adapter serves (and its subclasses)
    family = ""               # its short name: what mitigations and settings list
    network = "unet"          # the pipeline attribute holding the denoising network
    flow = False              # flow matching: the velocity presented at unit noise (module doc)
    distilled = False         # guidance-distilled: the pipeline's own call has no null branch
    embeddings_only = False   # the conditioning is the text embeddings alone (no pooled / added inputs)
    cross_attention = False   # a UNet with cross-attention layers (attn2) between image and text
    max_sequence_length: Optional[int] = None

    # what mitigations may need: "cfg" (the call holds a null branch), "cross_attention",
    # "embeddings_only"; derived from the flags above when a subclass is defined
    capabilities: frozenset = frozenset()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.capabilities = frozenset(name for name, has in (("cfg", not cls.distilled),
                                                            ("cross_attention", cls.cross_attention),
                                                            ("embeddings_only", cls.embeddings_only)) if has)
        if cls.pipeline_class:
            _ADAPTERS[cls.pipeline_class] = cls

    def __new__(cls, pipe=None, *args, **kwargs):
        """ScoreModel(pipe) is the adapter of the pipeline's family."""
        if cls is ScoreModel:
            cls = adapter_class(pipe)
        return super().__new__(cls)

    def __init__(self, pipe, max_sequence_length=None):
        self.pipe = pipe
        self.unet = getattr(pipe, self.network)  # the denoising network: a UNet, or a transformer
        self.prediction_type = self._prediction_type(pipe)
        self.stats = {"unet_calls": 0, "unet_rows": 0}  # shared with with_unet() copies
        self._place()
        self.max_sequence_length = max_sequence_length or self.max_sequence_length
        self.unet_config = self.unet.config
        self._null: dict = {}  # batch shape -> the null embeddings the pipeline computed

    def _prediction_type(self, pipe) -> str:
        pt = pipe.scheduler.config.get("prediction_type", "epsilon")
        if pt not in PREDICTION_TYPES or pt == "flow":
            raise UnsupportedPipeline(f"unsupported scheduler prediction_type {pt!r}; expected one of "
                                      f"{PREDICTION_TYPES[:3]}")
        return pt

    def _place(self):
        # read once: diffusers' ModelMixin.device / .dtype walk the parameters on every access,
        # which costs milliseconds per call on a per-prompt path (an adapter lives for one call)
        self.device, self.dtype = self.unet.device, self.unet.dtype

    # -- what each family implements ------------------------------------------------------
    def encode(self, prompts: list, n: int, height: int, width: int, guidance_scale=None) -> Conditioning:
        """Embeddings as the pipeline computes them for CFG (null = the empty prompt), n images per
        prompt. The null embeddings depend only on the batch shape: encoded once per shape and
        adapter (same call, same batch, so the same bits) and reused. guidance_scale: Flux's
        embedded guidance (its own call's); the others ignore it."""
        raise NotImplementedError

    def default_size(self) -> tuple:
        """(height, width) in pixels when a call names neither."""
        raise NotImplementedError

    def call(self, x, t, hidden, added):
        """One call of the denoising network on rows x with these embeddings (its own signature)."""
        raise NotImplementedError

    def read_call(self, args, kwargs):
        """The inverse of `call`, for a forward hook on the network: (x, t, hidden, added) of the
        call the pipeline made (t a scalar on the scheduler's scale)."""
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple:
        """The shape of one image's latent as `pipe(latents=...)` takes it."""
        f = self.pipe.vae_scale_factor
        return self.unet_config.in_channels, height // f, width // f

    def channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """Latents as (N, C, h, w)."""
        return x

    def noise(self, count: int, height: int, width: int, generator=None) -> torch.Tensor:
        """Unit Gaussian noise drawn exactly as pipe.prepare_latents draws it (same generator, same
        order): what `pipe(latents=...)` takes, before the scheduler's init_noise_sigma."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor((count, *self.latent_shape(height, width)), generator=generator, device=self.device,
                            dtype=self.dtype)

    def split_capture(self, sample, t, pred, hidden, added, prompts: list, n: int, size: tuple):
        """A captured CFG call [null; cond] (read_call's parts and its output) as
        (x, cond, pred_null, pred_cond) of its N images."""
        split = lambda d, i: None if d is None else {k: v.chunk(2)[i] for k, v in d.items()}  # noqa: E731
        cond = Conditioning(hidden.chunk(2)[1], hidden.chunk(2)[0], split(added, 1), split(added, 0))
        u, c = pred.chunk(2)
        return sample.chunk(2)[1], cond, u, c

    # -- the same for every family ----------------------------------------------------------
    def noise_for_ids(self, ids, n: int, height: int, width: int, seed: int) -> torch.Tensor:
        """The batch jobs' noise (scan, `sharpfast detect`, eval detect, the demo): prompt `id` draws
        its n images from a CPU generator seeded with seed + id, so a prompt's scores depend on its
        id alone, not on its batch, the process count or a restart. On the UNet's device."""
        gens = [torch.Generator("cpu").manual_seed(seed + int(i)) for i in ids]
        return torch.cat([self.noise(n, height, width, g) for g in gens]).to(self.device)

    def initial_latents(self, sched, count: int, height: int, width: int, generator=None) -> torch.Tensor:
        """x_T as the pipeline starts from it: noise(...) * init_noise_sigma."""
        return self.noise(count, height, width, generator) * sched.init_noise_sigma

    def scheduler(self, num_inference_steps: int, height=None, width=None):
        """A private copy of the pipeline's scheduler with its timesteps set as the pipeline sets
        them (height / width matter to Flux's shift only)."""
        sched = copy.deepcopy(self.pipe.scheduler)
        try:
            sched.set_timesteps(num_inference_steps, device=self.device)
        except ValueError as err:  # e.g. more steps than the scheduler was trained with
            raise BadArgument(f"the scheduler refuses num_inference_steps={num_inference_steps}: {err}") from err
        table = getattr(sched, "alphas_cumprod", None)
        if table is not None and len(sched.timesteps) and int(sched.timesteps.max()) >= len(table):
            raise BadArgument(f"num_inference_steps={num_inference_steps} lays out timestep "
                              f"{int(sched.timesteps.max())}, past the {len(table)} training timesteps of "
                              f"{type(sched).__name__} (steps_offset={sched.config.get('steps_offset', 0)}); use "
                              f"fewer steps")
        return sched

    def alpha_bar(self, sched, t) -> float:
        """alpha_bar of the VP latent the UNet sees at t (call after sched.scale_model_input)."""
        if type(sched).__name__ in _SIGMA_SPACE:
            index = sched.step_index
            if index is None:  # before the first step (a fresh copy): the index of t in the schedule
                index = int((sched.timesteps.to(torch.as_tensor(t).device) == t).nonzero()[0])
            return self.alpha_bar_at(sched, index)
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

    def with_unet(self, unet) -> ScoreModel:
        """The same adapter calling another UNet (an fp32 copy for the exact JVP, say)."""
        other = copy.copy(self)
        other.unet = unet
        other._place()
        return other

    def predict(self, x: torch.Tensor, t, cond: Conditioning, repeats: int = 1):
        """Raw predictions (null, cond) at x (R*N rows, R = repeats of the N images) in ONE UNet call."""
        hidden, added = cond.cfg_batch(repeats)
        xx = torch.cat([x, x]).to(self.dtype)
        self.stats["unet_calls"] += 1
        self.stats["unet_rows"] += xx.shape[0]
        return self.call(xx, t, hidden, added).chunk(2)

    def predict_branch(self, x: torch.Tensor, t, cond: Conditioning, branch: str = "cond"):
        """One branch alone at x (N rows, one call on N rows): "cond" or "null"."""
        self.stats["unet_calls"] += 1
        self.stats["unet_rows"] += x.shape[0]
        hidden, added = (cond.cond, cond.cond_added) if branch == "cond" else (cond.null, cond.null_added)
        return self.call(x.to(self.dtype), t, hidden, added)

    def eps(self, x, t, alpha_bar, cond: Conditioning, repeats: int = 1):
        """(eps_null, eps_cond) in fp32."""
        u, c = self.predict(x, t, cond, repeats)
        return to_eps(u, x, alpha_bar, self.prediction_type), to_eps(c, x, alpha_bar, self.prediction_type)

    def _encode_prompt(self, *args, **kwargs):
        """pipe.encode_prompt without diffusers' truncation warning: sharpfast reports truncation per
        prompt itself (Conditioning.warnings), and diffusers' message, made on the whole batch,
        lists the padding of its shorter prompts (`<|endoftext|>`) as if they had been cut."""
        loggers = {logging.getLogger(c.__module__) for c in type(self.pipe).__mro__
                   if c.__module__.startswith("diffusers.")}
        loggers.add(logging.getLogger("transformers.tokenization_utils_base"))
        for lg in loggers:
            if _QUIET not in lg.filters:
                lg.addFilter(_QUIET)  # inert outside sharpfast's own encoding (thread-local)
        _QUIET.local.depth = getattr(_QUIET.local, "depth", 0) + 1
        try:
            return self.pipe.encode_prompt(*args, **kwargs)
        finally:
            _QUIET.local.depth -= 1

    def _truncation(self, prompt: str) -> list:
        out = []
        for tok in filter(None, (self.pipe.tokenizer, getattr(self.pipe, "tokenizer_2", None))):
            if type(tok).__name__.startswith("T5"):  # T5 is cut at max_sequence_length, not model_max_length
                continue
            length = len(tok(prompt, verbose=False).input_ids)  # (no "longer than the maximum" warning)
            if length > tok.model_max_length:
                out.append(f"prompt is {length} tokens, truncated to {tok.model_max_length} as the pipeline does")
                break
        return out

    def _cached_null(self, key, compute):
        """The null embeddings of a batch shape: `compute()` once per shape and adapter."""
        if key not in self._null:
            self._null[key] = compute()
        return self._null[key]


class StableDiffusionModel(ScoreModel):
    """Stable Diffusion 1.x / 2.x: a UNet on CLIP embeddings (epsilon, v or sample prediction)."""

    pipeline_class, family, embeddings_only, cross_attention = "StableDiffusionPipeline", "sd", True, True

    @override
    def encode(self, prompts, n, height, width, guidance_scale=None) -> Conditioning:
        warnings = [self._truncation(prompt) for prompt in prompts]
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
    def call(self, x, t, hidden, added):
        tt = torch.as_tensor(t, device=self.device)
        return self.unet(x, tt, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]

    @override
    def read_call(self, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        return sample, _scalar(t), kwargs["encoder_hidden_states"], kwargs.get("added_cond_kwargs")


class StableDiffusionXLModel(StableDiffusionModel):
    """SDXL: two CLIP encoders, their pooled embedding and the size conditioning as added inputs."""

    pipeline_class, family, embeddings_only = "StableDiffusionXLPipeline", "sdxl", False

    @override
    def encode(self, prompts, n, height, width, guidance_scale=None) -> Conditioning:
        p, warnings = self.pipe, [self._truncation(prompt) for prompt in prompts]
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


class _FlowModel(ScoreModel):
    """Flow-matching transformers (SD3, Flux): the velocity presented as eps at unit noise."""

    network, flow = "transformer", True

    def _prediction_type(self, pipe) -> str:
        return "flow"

    def default_size(self) -> tuple:
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return size, size

    def scheduler(self, num_inference_steps: int, height=None, width=None):
        """As the base, then init_noise_sigma 1 and an identity scale_model_input, so the samplers'
        code is the same for every family."""
        sched = self._set_timesteps(copy.deepcopy(self.pipe.scheduler), num_inference_steps, height, width)
        sched.init_noise_sigma = 1.0
        sched.scale_model_input = lambda sample, timestep=None: sample
        return sched

    def _set_timesteps(self, sched, num_inference_steps, height, width):
        sched.set_timesteps(num_inference_steps, device=self.device)
        return sched

    def alpha_bar(self, sched, t) -> float:
        """0: the velocity is presented at unit noise (module doc)."""
        return 0.0

    def alpha_bar_at(self, sched, index: int) -> float:
        return 0.0


class StableDiffusion3Model(_FlowModel):
    """Stable Diffusion 3: an MMDiT on CLIP x2 + T5 embeddings and a pooled projection."""

    pipeline_class, family, max_sequence_length = "StableDiffusion3Pipeline", "sd3", 256

    @override
    def encode(self, prompts, n, height, width, guidance_scale=None) -> Conditioning:
        warnings = [self._truncation(prompt) for prompt in prompts]
        key = (len(prompts), n, height, width)
        fresh = key not in self._null
        with torch.no_grad():  # the null branch: the empty negative prompt, as the pipeline makes it
            cond, null, pooled, null_pooled = self._encode_prompt(
                prompts, None, None, device=self.device, num_images_per_prompt=n, do_classifier_free_guidance=fresh,
                max_sequence_length=self.max_sequence_length)
        null, null_pooled = self._cached_null(key, lambda: (null, null_pooled))
        return Conditioning(cond, null, {"pooled_projections": pooled}, {"pooled_projections": null_pooled}, warnings)

    @override
    def call(self, x, t, hidden, added):
        tt = torch.as_tensor(t, device=self.device).reshape(-1)[:1].expand(len(x))
        return self.unet(hidden_states=x, timestep=tt.to(x.dtype), encoder_hidden_states=hidden,
                         pooled_projections=added["pooled_projections"], return_dict=False)[0]

    @override
    def read_call(self, args, kwargs):
        added = {"pooled_projections": kwargs["pooled_projections"]}
        return kwargs["hidden_states"], _scalar(kwargs["timestep"]), kwargs["encoder_hidden_states"], added


class FluxModel(_FlowModel):
    """Flux: guidance-distilled (no null branch in its call; the empty prompt plays it here), packed
    latents (N, L, 4C) with position ids, the embedded guidance as an input, a shifted schedule."""

    pipeline_class, family, distilled, max_sequence_length = "FluxPipeline", "flux", True, 512

    def __init__(self, pipe, max_sequence_length=None):
        super().__init__(pipe, max_sequence_length)
        self.txt_ids = None  # the text tokens' position ids
        self.grid: dict = {}  # packed length -> (h, w) of the latent before packing

    @override
    def encode(self, prompts, n, height, width, guidance_scale=None) -> Conditioning:
        warnings = [self._truncation(prompt) for prompt in prompts]
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

    def null_branch(self, count: int, n: int, key=None):
        """The empty prompt's (embeddings, pooled), encoded once per batch shape."""
        def compute():
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

    def noise(self, count: int, height: int, width: int, generator=None) -> torch.Tensor:
        """Drawn as (C, h, w), then packed as the pipeline packs it."""
        from diffusers.utils.torch_utils import randn_tensor

        h, w = self._hw(height, width)
        c = self.unet_config.in_channels // 4
        self.latent_shape(height, width)
        z = randn_tensor((count, c, h, w), generator=generator, device=self.device, dtype=self.dtype)
        return z.view(count, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(count, -1, 4 * c)

    def _set_timesteps(self, sched, num_inference_steps, height, width):
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
    def call(self, x, t, hidden, added):
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
    def read_call(self, args, kwargs):
        added = {"pooled_projections": kwargs["pooled_projections"]}
        if kwargs.get("guidance") is not None:  # the embedded guidance, per row
            added["guidance"] = kwargs["guidance"]
        t = kwargs["timestep"] * 1000  # the transformer takes t / 1000
        return kwargs["hidden_states"], _scalar(t), kwargs["encoder_hidden_states"], added

    def split_capture(self, sample, t, pred, hidden, added, prompts, n, size):
        """The call holds the conditional branch only (its embeddings are the capture's); the null
        branch, the empty prompt, costs one call on the N rows."""
        self.latent_shape(*size)  # the packed latents' grid, for the position ids
        null, null_pooled = self.null_branch(len(prompts), n)
        ca = dict(added)
        cond = Conditioning(hidden, null, ca, {**ca, "pooled_projections": null_pooled})
        with torch.no_grad():
            u = self.predict_branch(sample, t, cond, "null")
        return sample, cond, u, pred


def _scalar(t):
    """A timestep as one value (a per-row tensor's first element)."""
    return t.reshape(-1)[0] if torch.is_tensor(t) and t.dim() else t
