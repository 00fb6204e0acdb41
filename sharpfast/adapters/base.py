"""The adapter's base: Conditioning (the embeddings of a batch), ScoreModel (a pipeline as
eps and scores at any latents; `ScoreModel(pipe)` returns the family's subclass, registered by
defining it), the registry of families and the pipeline's own call defaults."""
from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import Tensor

from ..errors import BadArgument, UnsupportedPipeline
from .call_settings import Settings, pipeline_defaults  # noqa: F401  (pipeline_defaults: re-exported)
from .parameterizations import PREDICTION_TYPES, Parameterization, parameterization

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline",
                       "FluxPipeline")
# schedulers that work in sigma space (x = x0 + sigma eps) and scale the UNet input
_SIGMA_SPACE = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")

@contextlib.contextmanager
def math_attention(unet: Any):
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

    def __len__(self) -> int:
        return self.cond.shape[0]

    def to(self, dtype: Any) -> Conditioning:
        """The same embeddings in another floating dtype (time ids and other tensors alike)."""
        cast = lambda d: None if d is None else {k: v.to(dtype) for k, v in d.items()}  # noqa: E731
        return replace(self, cond=self.cond.to(dtype), null=self.null.to(dtype), cond_added=cast(self.cond_added),
                       null_added=cast(self.null_added))

    def rows(self, idx: Any) -> Conditioning:
        """The embeddings of rows idx."""
        pick = lambda d: None if d is None else {k: v[idx] for k, v in d.items()}  # noqa: E731
        return replace(self, cond=self.cond[idx], null=self.null[idx], cond_added=pick(self.cond_added),
                       null_added=pick(self.null_added))

    def cfg_batch(self, repeats: int = 1) -> tuple:
        """(encoder_hidden_states, added_cond_kwargs) of the batch [null; cond], each part repeated."""
        hidden = torch.cat([self.null.repeat(repeats, 1, 1), self.cond.repeat(repeats, 1, 1)])
        added = None
        if self.cond_added is not None and self.null_added is not None:
            rep = lambda v: v.repeat(repeats, *[1] * (v.dim() - 1))  # noqa: E731
            added = {k: torch.cat([rep(self.null_added[k]), rep(self.cond_added[k])]) for k in self.cond_added}
        return hidden, added


# ---- the adapters: one class per model family ------------------------------------------

_ADAPTERS: dict[str, type[ScoreModel]] = {}  # diffusers pipeline class name -> its ScoreModel subclass


def adapter_class(pipe: Any) -> type[ScoreModel]:
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


def adapt(pipe: Any, max_sequence_length: Optional[int] = None) -> ScoreModel:
    """The pipeline's adapter (an adapter given is returned as it is)."""
    return pipe if isinstance(pipe, ScoreModel) else ScoreModel(pipe, max_sequence_length)


def family(pipe: Any) -> str:
    """"sd", "sdxl", "sd3" or "flux" (UnsupportedPipeline for anything else)."""
    return adapter_class(pipe).family


def denoiser(pipe: Any) -> Any:
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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.capabilities = frozenset(name for name, has in (("cfg", not cls.distilled),
                                                            ("cross_attention", cls.cross_attention),
                                                            ("embeddings_only", cls.embeddings_only)) if has)
        if cls.pipeline_class:
            _ADAPTERS[cls.pipeline_class] = cls

    def __new__(cls, pipe: Optional[Any] = None, *args: Any, **kwargs: Any) -> ScoreModel:
        """ScoreModel(pipe) is the adapter of the pipeline's family."""
        if cls is ScoreModel:
            cls = adapter_class(pipe)
        return super().__new__(cls)

    def __init__(self, pipe: Any, max_sequence_length: Optional[int] = None) -> None:
        self.pipe = pipe
        self.unet = getattr(pipe, self.network)  # the denoising network: a UNet, or a transformer
        self.prediction_type = self._prediction_type(pipe)
        self.parameterization: Parameterization = parameterization(self.prediction_type)
        self.stats = {"unet_calls": 0, "unet_rows": 0}  # shared with with_unet() copies
        self._place()
        self.max_sequence_length = max_sequence_length or self.max_sequence_length
        self.unet_config = self.unet.config
        self._null: dict = {}  # batch shape -> the null embeddings the pipeline computed

    def _prediction_type(self, pipe: Any) -> str:
        pt = pipe.scheduler.config.get("prediction_type", "epsilon")
        if pt not in PREDICTION_TYPES or pt == "flow":
            raise UnsupportedPipeline(f"unsupported scheduler prediction_type {pt!r}; expected one of "
                                      f"{PREDICTION_TYPES[:3]}")
        return pt

    def _place(self) -> None:
        # read once: diffusers' ModelMixin.device / .dtype walk the parameters on every access,
        # which costs milliseconds per call on a per-prompt path (an adapter lives for one call)
        self.device, self.dtype = self.unet.device, self.unet.dtype

    # -- what each family implements ------------------------------------------------------
    def encode(self, prompts: list, n: int, height: int, width: int,
               guidance_scale: Optional[float] = None) -> Conditioning:
        """Embeddings as the pipeline computes them for CFG (null = the empty prompt), n images per
        prompt. The null embeddings depend only on the batch shape: encoded once per shape and
        adapter (same call, same batch, so the same bits) and reused. guidance_scale: Flux's
        embedded guidance (its own call's); the others ignore it."""
        raise NotImplementedError

    def default_size(self) -> tuple:
        """(height, width) in pixels when a call names neither."""
        raise NotImplementedError

    def call(self, x: Tensor, t: Any, hidden: torch.Tensor, added: Optional[dict]) -> torch.Tensor:
        """One call of the denoising network on rows x with these embeddings (its own signature)."""
        raise NotImplementedError

    def read_call(self, args: Any, kwargs: Any) -> tuple:
        """The inverse of `call`, for a forward hook on the network: (x, t, hidden, added) of the
        call the pipeline made (t a scalar on the scheduler's scale)."""
        raise NotImplementedError

    def size_multiple(self) -> int:
        """What height and width must be multiples of: the VAE's downsampling factor."""
        return int(self.pipe.vae_scale_factor)

    def latent_shape(self, height: int, width: int) -> tuple:
        """The shape of one image's latent as `pipe(latents=...)` takes it."""
        f = self.pipe.vae_scale_factor
        return self.unet_config.in_channels, height // f, width // f

    def channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """Latents as (N, C, h, w)."""
        return x

    def noise(self, count: int, height: int, width: int, generator: Optional[Any] = None) -> torch.Tensor:
        """Unit Gaussian noise drawn exactly as pipe.prepare_latents draws it (same generator, same
        order): what `pipe(latents=...)` takes, before the scheduler's init_noise_sigma."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor((count, *self.latent_shape(height, width)), generator=generator, device=self.device,
                            dtype=self.dtype)

    def split_capture(self, sample: torch.Tensor, t: Any, pred: torch.Tensor, hidden: torch.Tensor, added,
                      prompts: list, n: int, size: tuple) -> tuple:
        """A captured CFG call [null; cond] (read_call's parts and its output) as
        (x, cond, pred_null, pred_cond) of its N images."""
        split = lambda d, i: None if d is None else {k: v.chunk(2)[i] for k, v in d.items()}  # noqa: E731
        cond = Conditioning(hidden.chunk(2)[1], hidden.chunk(2)[0], split(added, 1), split(added, 0))
        u, c = pred.chunk(2)
        return sample.chunk(2)[1], cond, u, c

    # -- the same for every family ----------------------------------------------------------
    def noise_for_ids(self, ids: Any, n: int, height: int, width: int, seed: int) -> torch.Tensor:
        """The batch jobs' noise (scan, `sharpfast detect`, eval detect, the demo): prompt `id` draws
        its n images from a CPU generator seeded with seed + id, so a prompt's scores depend on its
        id alone, not on its batch, the process count or a restart. On the UNet's device."""
        gens = [torch.Generator("cpu").manual_seed(seed + int(i)) for i in ids]
        return torch.cat([self.noise(n, height, width, g) for g in gens]).to(self.device)

    def initial_latents(self, sched: Any, count: int, height: int, width: int,
                        generator: Optional[Any] = None) -> torch.Tensor:
        """x_T as the pipeline starts from it: noise(...) * init_noise_sigma."""
        return self.noise(count, height, width, generator) * sched.init_noise_sigma

    def scheduler(self, num_inference_steps: int, height: Optional[int] = None, width: Optional[int] = None) -> Any:
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

    def resolve(self, *, needs_cfg: bool = False, **call_kwargs: Any) -> Any:
        """The one place a call's settings are resolved: num_inference_steps, guidance_scale,
        height, width and num_images_per_prompt of `pipe(**call_kwargs)`, each missing or None one
        the pipeline's own default, each checked (sharpfast.adapters.Settings; other keywords are
        ignored). needs_cfg: the call needs the classifier-free batch (guidance > 1 unless the model
        is guidance-distilled)."""
        names = ("num_inference_steps", "guidance_scale", "height", "width", "num_images_per_prompt")
        return Settings.resolve(self, needs_cfg=needs_cfg, **{k: call_kwargs.get(k) for k in names})

    def steps_fit(self, num_inference_steps: int) -> bool:
        """Whether the scheduler lays out this many steps inside its training timesteps (at the
        default image size: only a flow model's shift depends on it)."""
        try:
            sched = self.scheduler(num_inference_steps, *self.default_size())
        except (BadArgument, ValueError, IndexError, RuntimeError):
            return False
        return len(sched.timesteps) > 0 and float(sched.timesteps.min()) >= 0

    def max_steps(self, cap: int = 1000) -> int:
        """The most sampling steps (at most `cap`) the scheduler lays out: DDIM with steps_offset=1
        and 1000 training steps takes 999, not 1000 (at 1000 its last timestep is 1000, an index
        error inside the pipeline). Bounded bisection: log2(cap) probes on private copies."""
        if self.steps_fit(cap) or not self.steps_fit(1):
            return cap
        lo, hi = 1, cap  # lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.steps_fit(mid) else (lo, mid)
        return lo

    def alpha_bar(self, sched: Any, t: Any) -> float:
        """alpha_bar of the VP latent the UNet sees at t (call after sched.scale_model_input)."""
        if type(sched).__name__ in _SIGMA_SPACE:
            index = sched.step_index
            if index is None:  # before the first step (a fresh copy): the index of t in the schedule
                index = int((sched.timesteps.to(torch.as_tensor(t).device) == t).nonzero()[0])
            return self.alpha_bar_at(sched, index)
        return float(sched.alphas_cumprod[int(t)])

    def alpha_bar_at(self, sched: Any, index: int) -> float:
        """alpha_bar at the index-th timestep of a scheduler whose timesteps are set."""
        if type(sched).__name__ in _SIGMA_SPACE:
            sigma = float(sched.sigmas[index])
            return 1.0 / (1.0 + sigma * sigma)
        return float(sched.alphas_cumprod[int(sched.timesteps[index])])

    def low_noise(self, sched: Any, from_end: int = 3) -> tuple:
        """(t, alpha_bar) of a low-noise timestep of the schedule: the from_end-th from its end
        (the anisotropy detector's alignment term; the third-to-last, as its authors' code)."""
        k = max(0, len(sched.timesteps) - from_end)
        return sched.timesteps[k], self.alpha_bar_at(sched, k)

    def fp32_unet(self) -> Any:
        """The UNet in fp32 for exact derivatives: the pipeline's own when it is fp32, else a copy
        made once per adapter (the pipeline's UNet is never cast)."""
        if self.dtype == torch.float32:
            return self.unet
        if getattr(self, "_fp32_unet", None) is None:
            self._fp32_unet = copy.deepcopy(self.unet).float()
        return self._fp32_unet

    def with_unet(self, unet: Any) -> ScoreModel:
        """The same adapter calling another UNet (an fp32 copy for the exact JVP, say)."""
        other = copy.copy(self)
        other.unet = unet
        other._place()
        return other

    def predict(self, x: torch.Tensor, t: Any, cond: Conditioning, repeats: int = 1) -> tuple[torch.Tensor, ...]:
        """Raw predictions (null, cond) at x (R*N rows, R = repeats of the N images) in ONE UNet call."""
        hidden, added = cond.cfg_batch(repeats)
        xx = torch.cat([x, x]).to(self.dtype)
        self.stats["unet_calls"] += 1
        self.stats["unet_rows"] += xx.shape[0]
        return self.call(xx, t, hidden, added).chunk(2)

    def predict_branch(self, x: torch.Tensor, t: Any, cond: Conditioning, branch: str = "cond") -> torch.Tensor:
        """One branch alone at x (N rows, one call on N rows): "cond" or "null"."""
        self.stats["unet_calls"] += 1
        self.stats["unet_rows"] += x.shape[0]
        hidden, added = (cond.cond, cond.cond_added) if branch == "cond" else (cond.null, cond.null_added)
        return self.call(x.to(self.dtype), t, hidden, added)

    def eps(self, x: Tensor, t: Any, alpha_bar: float, cond: Conditioning, repeats: int = 1) -> tuple:
        """(eps_null, eps_cond) in fp32."""
        u, c = self.predict(x, t, cond, repeats)
        p = self.parameterization
        return p.to_eps(u, x, alpha_bar), p.to_eps(c, x, alpha_bar)

    def _encode_prompt(self, *args: Any, **kwargs: Any) -> Any:
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

    def truncation(self, prompt: str) -> list:
        """Warnings for a prompt the CLIP tokenizer cuts (T5 encoders are cut at their own length)."""
        out = []
        for tok in filter(None, (self.pipe.tokenizer, getattr(self.pipe, "tokenizer_2", None))):
            if type(tok).__name__.startswith("T5"):  # T5 is cut at max_sequence_length, not model_max_length
                continue
            length = len(tok(prompt, verbose=False).input_ids)  # (no "longer than the maximum" warning)
            if length > tok.model_max_length:
                out.append(f"prompt is {length} tokens, truncated to {tok.model_max_length} as the pipeline does")
                break
        return out

    def _cached_null(self, key: Any, compute: Callable[[], Any]) -> Any:
        """The null embeddings of a batch shape: `compute()` once per shape and adapter."""
        if key not in self._null:
            self._null[key] = compute()
        return self._null[key]


def scalar_timestep(t: Any) -> Any:
    """A timestep as one value (a per-row tensor's first element)."""
    return t.reshape(-1)[0] if torch.is_tensor(t) and t.dim() else t
