"""sharpfast.detect: per-prompt memorization scores on a stock diffusers pipeline.

Every metric (sharpfast.scores.METRICS; higher = more likely memorized) is computed per image on
the real CFG sampling trajectory, averaged over the first `steps` steps and the
`num_images_per_prompt` images of each prompt. Prompts go through the denoiser `batch_size` at a
time, one CFG call per step (plus one for `sharpness` with hvp="fd", one on a num_probes-times
larger batch for the traces); a prompt's score does not depend on its batch (except with ancestral
schedulers and steps > 1, whose noise comes from the generator). The pipeline is left as it was
(its scheduler is copied, not stepped).
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import Tensor

from . import validate
from .adapters import adapt
from .curvature import EstimatorOptions
from .errors import BadArgument
from .results import DetectionResult
from .scores import HVP_MODES, REGISTRY, step_metrics
from .settings import BATCH_SIZE, DEFAULT_METRICS


def _check_args(prompts: list, metrics: Any, steps: int, num_inference_steps: int, batch_size: int, hvp: str) -> tuple:
    prompts = validate.prompts(prompts, "prompts")
    metrics = validate.metrics(metrics, REGISTRY)
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        validate.integer(v, name)
    if steps > num_inference_steps:
        raise BadArgument(f"steps ({steps}) must not exceed num_inference_steps ({num_inference_steps})")
    if hvp not in HVP_MODES:
        raise BadArgument(f"hvp must be one of {HVP_MODES}, got {hvp!r}")
    return prompts, tuple(dict.fromkeys(metrics))


def _initial_latents(model: Any, latents: Optional[Tensor], generator: Any, count, height: int, width: int,
                     sched0: Any) -> Any:
    """x_T as pipe.prepare_latents makes it: drawn (or the given noise, checked), times init_noise_sigma."""
    validate.generators(generator, count)
    if latents is None:
        latents = model.noise(count, height, width, generator)
    else:
        validate.latents(latents, (count, *model.latent_shape(height, width)), (height, width), model.device)
    return latents * sched0.init_noise_sigma


def _along_trajectory(model: Any, lat, cond: Any, sched0: Any, steps: int, metrics: Any, guidance_scale: float,
                      batch: Any, n: int, estimator, extra) -> dict:
    """Each metric averaged over the first `steps` sampling steps of one batch (the real CFG
    trajectory, on a fresh copy of the scheduler: multistep / sigma-indexed state)."""
    sched = copy.deepcopy(sched0)
    total = {m: torch.zeros(len(lat), device=model.device) for m in metrics}
    for i in range(steps):
        t = sched.timesteps[i]
        x = sched.scale_model_input(lat, t)
        vals, guided = step_metrics(model, x, t, model.alpha_bar(sched, t), cond, metrics, guidance_scale,
                                    prompts=batch, n=n, estimator=estimator, schedule=sched0)
        for m in metrics:
            total[m] += vals[m]
        if i + 1 < steps:
            lat = sched.step(guided, t, lat, **extra, return_dict=False)[0]
    return {m: total[m] / steps for m in metrics}


def _score_batches(model: Any, prompts: list, latents: Tensor, n: int, metrics: Any, steps: int, sched0: Any, st: Any,
                   estimator, generator: Any, batch_size: int, progress: bool) -> tuple:
    """(per-image values {metric: (prompts, n)}, the prompts' warnings), a batch at a time."""
    from .progress import bar as progress_bar

    pipe = model.pipe
    extra = pipe.prepare_extra_step_kwargs(generator, 0.0) if hasattr(pipe, "prepare_extra_step_kwargs") else {}
    per_image = {m: torch.empty(len(prompts), n) for m in metrics}
    warnings: list = []
    with torch.no_grad(), progress_bar(pipe, total=len(prompts), desc="sharpfast detect", enabled=progress) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            cond = model.encode(batch, n, st.height, st.width, st.guidance_scale)
            warnings.extend(cond.warnings)
            lat = latents[start * n:(start + len(batch)) * n].to(model.dtype)
            mean = _along_trajectory(model, lat, cond, sched0, steps, metrics, st.guidance_scale, batch, n, estimator,
                                     extra)
            for m in metrics:
                per_image[m][start:start + len(batch)] = mean[m].view(len(batch), n).cpu()
            bar.update(len(batch))
    return per_image, warnings


def detect(pipe: Any, prompts: list, *, metrics: Any = DEFAULT_METRICS, num_images_per_prompt: int = 1,
           steps: int = 1, num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
           generator: Optional[Any] = None, latents: Optional[Tensor] = None, batch_size: int = BATCH_SIZE,
           hvp: str = "fd", progress: bool = True, height: Optional[int] = None, width: Optional[int] = None,
           num_probes: int = 8, fd_step: Optional[float] = None, probe_seed: int = 0,
           probe_step=None) -> DetectionResult:
    """Memorization scores of `prompts` on any supported pipeline (SD 1.x / 2.x, SDXL, SD3, Flux),
    on the real CFG trajectory of the first `steps` sampling steps (see this module's docstring).

    Args:
        pipe: a supported diffusers pipeline, or its `sharpfast.adapters.ScoreModel` to share one
            across many calls on equal batches (it keeps the null prompt's embeddings).
        prompts: a prompt or a list of prompts (none empty).
        metrics: registry names (sharpfast.scores.METRICS, or a probed name such as "wen_low@4");
            default wen, sharpness and the guard's detector (sharpfast.settings.DEFAULT_METRICS).
        num_images_per_prompt: images per prompt (the scores are their mean).
        steps: first sampling steps averaged.
        num_inference_steps: the schedule's steps (default: the pipeline's own, sharpfast.settings).
        guidance_scale: CFG scale of the trajectory (default: the pipeline's own).
        generator: a torch.Generator or one per image; initial latents are drawn exactly as
            `pipe(prompts, num_images_per_prompt=n, generator=generator)` draws them.
        latents: or the initial noise as `pipe(latents=...)` takes it ((len(prompts) * n, *latent),
            prompt-major; scaled by init_noise_sigma here, as the pipeline does).
        batch_size: prompts per denoiser call.
        hvp: "fd" (finite difference, any precision) or "jvp" (exact forward-mode AD, fp32, math
            attention; slower).
        progress: show a progress bar.
        height: image height in pixels (default: the pipeline's).
        width: image width in pixels (default: the pipeline's).
        num_probes: Rademacher probes of the trace metrics.
        fd_step: the finite-difference step of sharpness, a latent-space distance (default by dtype).
        probe_seed: seed of the trace probes and of wen_low@n's probe noises.
        probe_step: the traces' step per element of a probe (default fd_step / sqrt(D)).

    Returns:
        A DetectionResult: per-prompt scores and per-image values of each metric, the prompts'
        warnings (truncation) and the config, with the denoiser calls and rows it cost.

    Raises:
        BadArgument: a bad prompt, metric, size, generator or latents (the message names it).
        UnsupportedPipeline: the pipeline or its scheduler's prediction type is not supported.
        NonFiniteOutput: the model returned NaN/inf for a prompt.
    """
    model = adapt(pipe)
    st = model.resolve(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          height=height, width=width, num_images_per_prompt=num_images_per_prompt)
    prompts, metrics = _check_args(prompts, metrics, steps, st.num_inference_steps, batch_size, hvp)
    validate.torch_generator(generator)
    calls0, n = dict(model.stats), st.num_images_per_prompt
    sched0 = model.scheduler(st.num_inference_steps, st.height, st.width)
    latents = _initial_latents(model, latents, generator, len(prompts) * n, st.height, st.width, sched0)
    estimator = EstimatorOptions(hvp, fd_step, num_probes, probe_seed, probe_step)
    per_image, warnings = _score_batches(model, prompts, latents, n, metrics, steps, sched0, st, estimator, generator,
                                         batch_size, progress)
    config = dict(metrics=list(metrics), num_images_per_prompt=n, steps=steps,
                  num_inference_steps=st.num_inference_steps, guidance_scale=float(st.guidance_scale), hvp=hvp,
                  batch_size=batch_size, height=st.height, width=st.width, num_probes=num_probes, fd_step=fd_step,
                  probe_step=probe_step,
                  **{k: v - calls0[k] for k, v in model.stats.items()})
    return DetectionResult(prompts, {m: per_image[m].mean(dim=1) for m in metrics}, per_image, warnings, config)
