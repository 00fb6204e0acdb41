"""sharpfast.detect: per-prompt memorization scores on a stock diffusers pipeline."""
from __future__ import annotations

import copy

import torch

from . import validate
from .errors import BadArgument
from .metrics import HVP_MODES, METRICS, step_metrics
from .results import DetectionResult
from .score import ScoreModel


def _check_args(prompts, metrics, n, steps, num_inference_steps, guidance_scale, batch_size, hvp):
    prompts = validate.prompts(prompts, "prompts")
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if not metrics:
        raise BadArgument(f"metrics is empty; choose from {', '.join(METRICS)}")
    for m in metrics:
        if m not in METRICS:
            raise BadArgument(f"unknown metric {m!r}; valid metrics: {', '.join(METRICS)}")
    for name, v in (("num_images_per_prompt", n), ("steps", steps), ("num_inference_steps", num_inference_steps),
                    ("batch_size", batch_size)):
        validate.integer(v, name)
    if steps > num_inference_steps:
        raise BadArgument(f"steps ({steps}) must not exceed num_inference_steps ({num_inference_steps})")
    validate.guidance_scale(guidance_scale, needs_cfg=False)
    if hvp not in HVP_MODES:
        raise BadArgument(f"hvp must be one of {HVP_MODES}, got {hvp!r}")
    return prompts, tuple(dict.fromkeys(metrics))


def _check_latents(latents, count, shape, model):
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    want = (count, *shape)
    if tuple(latents.shape) != want:
        raise ValueError(f"latents must have shape {want} (len(prompts) * num_images_per_prompt, C, h, w), "
                         f"got {tuple(latents.shape)}")
    if not latents.is_floating_point():
        raise TypeError(f"latents must be floating point, got {latents.dtype}")
    if latents.device != model.device:
        raise ValueError(f"latents are on {latents.device} but the pipeline's UNet is on {model.device}")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("latents hold NaN or inf values")


def detect(pipe, prompts, *, metrics=("wen", "sharpness"), num_images_per_prompt: int = 1, steps: int = 1,
           num_inference_steps: int = 50, guidance_scale: float = 7.5, generator=None, latents=None,
           batch_size: int = 8, hvp: str = "fd", progress: bool = True, height=None, width=None,
           num_probes: int = 8, fd_step=None, probe_seed: int = 0, probe_step=None) -> DetectionResult:
    """Memorization scores of `prompts` on a StableDiffusionPipeline / StableDiffusionXLPipeline.

    `pipe` may also be a `sharpfast.score.ScoreModel` of the pipeline, to share one across many
    calls on equal batches (it keeps the null prompt's embeddings, as scan does).

    Every metric (see sharpfast.metrics.METRICS; higher = more likely memorized) is computed per
    image on the real CFG sampling trajectory, averaged over the first `steps` steps and the
    `num_images_per_prompt` images of each prompt. Initial latents are drawn exactly as
    `pipe(prompts, num_images_per_prompt=n, generator=generator)` would draw them, or taken from
    `latents` as `pipe(latents=...)` takes them (shape (len(prompts) * n, C, h, w), prompt-major;
    scaled by the scheduler's init_noise_sigma here, as the pipeline does). Prompts go through the UNet
    `batch_size` at a time, one CFG call per step (plus one for `sharpness` with hvp="fd", one on
    a num_probes-times larger batch for the traces); a prompt's score does not depend on its batch
    (except with ancestral schedulers and steps > 1, whose noise comes from the generator).

    hvp: "fd" (finite difference, default, any precision) or "jvp" (exact forward-mode AD, fp32,
    math attention; slower). fd_step: the finite-difference step of sharpness, a distance in
    latent space (default by UNet dtype); probe_step: the traces' step per element of a Rademacher
    probe (default fd_step / sqrt(C h w), so a probe moves x as far as the sharpness's step).
    The pipeline is left as it was (its scheduler is copied, not stepped).
    """
    prompts, metrics = _check_args(prompts, metrics, num_images_per_prompt, steps, num_inference_steps,
                                   guidance_scale, batch_size, hvp)
    model = pipe if isinstance(pipe, ScoreModel) else ScoreModel(pipe)
    pipe, calls0 = model.pipe, dict(model.stats)
    n = num_images_per_prompt
    dh, dw = model.default_size()
    height, width = height or dh, width or dw
    sched0 = model.scheduler(num_inference_steps, height, width)
    count = len(prompts) * n
    validate.generators(generator, count)
    if latents is None:
        latents = model.noise(count, height, width, generator)
    else:
        _check_latents(latents, count, model.latent_shape(height, width), model)
    latents = latents * sched0.init_noise_sigma  # as pipe.prepare_latents scales them
    extra = pipe.prepare_extra_step_kwargs(generator, 0.0) if hasattr(pipe, "prepare_extra_step_kwargs") else {}
    per_image = {m: torch.empty(len(prompts), n) for m in metrics}
    warnings = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts), desc="sharpfast detect", unit="prompt", disable=not progress)
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            cond = model.encode(batch, n, height, width, guidance_scale)
            warnings.extend(cond.warnings)
            lat = latents[start * n:(start + len(batch)) * n].to(model.dtype)
            sched = copy.deepcopy(sched0)  # fresh state for multistep / sigma-indexed schedulers
            total = {m: torch.zeros(len(lat), device=model.device) for m in metrics}
            for i in range(steps):
                t = sched.timesteps[i]
                x = sched.scale_model_input(lat, t)
                ab = model.alpha_bar(sched, t)
                vals, guided = step_metrics(model, x, t, ab, cond, metrics, guidance_scale, prompts=batch, n=n,
                                            hvp=hvp, fd_step=fd_step, num_probes=num_probes, probe_seed=probe_seed,
                                            probe_h=probe_step, schedule=sched0)
                for m in metrics:
                    total[m] += vals[m]
                if i + 1 < steps:
                    lat = sched.step(guided, t, lat, **extra, return_dict=False)[0]
            for m in metrics:
                per_image[m][start:start + len(batch)] = (total[m] / steps).view(len(batch), n).cpu()
            bar.update(len(batch))
    bar.close()
    scores = {m: per_image[m].mean(dim=1) for m in metrics}
    config = dict(metrics=list(metrics), num_images_per_prompt=n, steps=steps, num_inference_steps=num_inference_steps,
                  guidance_scale=float(guidance_scale), hvp=hvp, batch_size=batch_size, height=height, width=width,
                  num_probes=num_probes, fd_step=fd_step, probe_step=probe_step, **{k: v - calls0[k] for k, v in model.stats.items()})
    return DetectionResult(prompts, scores, per_image, warnings, config)
