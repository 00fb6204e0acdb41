"""sharpfast.sail (this module: mitigation): Sharpness-Aware Initialization for Latent diffusion.

Instead of sampling from x_T as drawn, SAIL looks for an initial noise where the prompt's density
is flat at the first sampling step, then runs the ordinary sampler from it. Every image has
`candidates` initial noises (the first is the one the pipeline would draw, or the `latents`
given; the others are fresh draws), all optimized in ONE batch:

- each round evaluates the loss at the current points (two CFG calls: x and the
  finite-difference point x'), accepts a candidate the first time it is under the threshold, and
  drops every candidate of an image that has one (the batch shrinks);
- the remaining candidates take one Adam step (fp32 latents and optimizer state, any UNet dtype);
  with `project=True` each is rescaled to its initial norm, so x_T stays on the Gaussian shell
  ||x|| ~ sqrt(d) instead of drifting to low-density regions;
- at most `max_steps` Adam steps, so at most 2 (max_steps + 1) batched CFG forwards and
  max_steps backwards (plus the sampler's num_inference_steps calls); an image with no accepted
  candidate takes its lowest-loss point and info["converged"] is False.

A candidate whose first evaluation is already under the threshold is used unchanged: a prompt
that would not be flagged comes out exactly as pipe(...) makes it.

objective="paper": loss = ||H_Δ s_Δ||^2 (+ alpha ||x||^2), the paper's L_SAIL with the
  finite-difference sharpness of sharpfast.detect (same step, same formula); the threshold is on
  the sharpness itself, so "auto" is the detection threshold shipped with the model.
objective="reference": the authors' code loss ||eps_Δ(x + eps_Δ/||eps_Δ||)|| + alpha ||x|| with
  their defaults (alpha 0.05 SD 1.x / 0.01 SD 2.x, threshold 8.2 on SD 1.4's 4x64x64 latent,
  8 candidates, 10 steps a round, threshold +0.1 after every 3 failed rounds, fresh candidates
  each round), but bounded (max_rounds, default 6: the raise happens once), without their defects
  (stale first input, optimizing accepted latents, duplicate latents, a host sync per step).
  Both terms of that loss grow as sqrt(D) with the latent's size D (||eps_Δ|| and ||x|| are sums
  over D elements of O(1) squares), so threshold="auto" is 8.2 sqrt(D / 16384): the authors'
  level carried to the latent at hand, not SD 1.4's number on a latent of another size.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional

import torch
from torch import Tensor

from .. import ops, validate
from ..adapters import ScoreModel
from ..curvature import EstimatorOptions, default_fd_step
from ..errors import BadArgument, NonFiniteOutput
from ..scores import REGISTRY, Step
from ..settings import SAIL_DEFAULTS

OBJECTIVES = ("paper", "reference")
REFERENCE = dict(alpha_sd1=0.05, alpha_sd2=0.01, threshold=8.2, threshold_numel=4 * 64 * 64, candidates=8,
                 steps_per_round=10, raise_every=3, raise_by=0.1)
# paper: measured on the digits model (docs/mitigation.md): the paper's lr 0.05 hardly moves x_T
# there (copies 0.867 -> 0.863), steps of 0.5-1 on the shell do
DEFAULTS = SAIL_DEFAULTS

log = logging.getLogger("sharpfast.sail")


def _check(prompts: list, n: int, guidance_scale: float, lr: float, max_steps: int, candidates: int,
           needs_cfg: bool = True) -> list:
    prompts = validate.prompts(prompts, "prompt")
    validate.guidance_scale(guidance_scale, needs_cfg=needs_cfg)
    validate.integer(n, "num_images_per_prompt")
    validate.integer(max_steps, "max_steps", minimum=0)
    validate.integer(candidates, "candidates")
    validate.finite(lr, "lr", above=0)
    return prompts


class _Objective:
    """Loss and acceptance statistic of a batch of candidate latents (rows of cond)."""

    def __init__(self, model: Any, t: Any, ab: float, objective: str, alpha: float, h: Any, stop_metric=None,
                 schedule: Any = None) -> None:
        self.model, self.t, self.ab, self.objective, self.alpha, self.h = model, t, ab, objective, alpha, h
        self.stop_metric, self.schedule = stop_metric, schedule

    def __call__(self, x: Tensor, cond: Any, names: Any = None) -> tuple:
        """(loss per row, statistic compared with the threshold per row); x fp32. The statistic is
        the loss's own sharpness, or the registry metric `stop_metric` on the same step (the
        serving guard's: SAIL then stops where the guard would no longer flag)."""
        m = self.model
        pred_u, pred_c = m.predict(x, self.t, cond)
        step = Step(m, x, self.t, self.ab, cond, pred_u, pred_c, estimator=EstimatorOptions(fd_step=self.h),
                    names=names, checks=False, schedule=self.schedule)
        if self.objective == "paper":  # detect's own sharpness (the registry's), differentiable in x
            sharp = REGISTRY["sharpness"].fn(step)
            loss = sharp.pow(2)
            if self.alpha:
                loss = loss + self.alpha * x.reshape(len(x), -1).pow(2).sum(dim=1)
            if self.stop_metric is None:
                return loss, sharp
            with torch.no_grad():
                return loss, REGISTRY[self.stop_metric].fn(step).float()
        u, c = step.eps
        shifted = ops.fd_direction(x, u, c, 1.0)  # x + eps_Δ / ||eps_Δ||, the authors' step
        u2, c2 = m.eps(shifted, self.t, self.ab, cond)
        loss = (c2 - u2).reshape(len(x), -1).norm(dim=1) + self.alpha * x.reshape(len(x), -1).norm(dim=1)
        return loss, loss


class _RowNames:
    """The prompt of each row of a shrinking candidate batch, looked up only for an error message
    (no host sync on the hot path)."""

    def __init__(self, names: Any, rows: Any) -> None:
        self.names, self.rows = names, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Any:
        k = int(self.rows[i])
        return self.names[k] if self.names else f"image {k}"


def _per_row(v: Any, x: Tensor) -> torch.Tensor:
    return v.view(-1, *[1] * (x.dim() - 1))


class _Track:
    """Per image across candidates, rounds and steps: the accepted point (the first candidate under
    the threshold), else the lowest-loss point so far (the fallback), with its statistic. Updated on
    the device, without a host sync."""

    def __init__(self, N, shape: tuple, dev) -> None:
        self.N, self.dev = N, dev
        self.acc_x = torch.zeros(N, *shape, device=dev)
        self.best_x = torch.zeros(N, *shape, device=dev)
        self.accepted = torch.zeros(N, dtype=torch.bool, device=dev)
        self.best_loss = torch.full((N,), float("inf"), device=dev)
        self.final_stat = torch.full((N,), float("inf"), device=dev)
        self.first_stat: torch.Tensor | None = None

    def note(self, x: Tensor, rows: Any, ld, sd, thr, K) -> Any:
        """Record one step's points (rows: their images); returns which rows are still live."""
        if self.first_stat is None:
            self.first_stat = sd.view(self.N, K)
        low = torch.full((self.N,), float("inf"), device=self.dev).scatter_reduce(0, rows, ld, "amin")
        better = low < self.best_loss
        pick = better[rows] & (ld == low[rows])
        self.best_x[rows[pick]] = x[pick]
        self.final_stat[rows[pick]] = sd[pick]
        self.best_loss = torch.where(better, low, self.best_loss)
        pos = torch.arange(len(rows), device=self.dev)
        ok = sd <= thr
        first = torch.full((self.N,), len(rows), device=self.dev).scatter_reduce(0, rows[ok], pos[ok], "amin")
        newly = (first < len(rows)) & ~self.accepted
        self.acc_x[newly] = x[first[newly]]
        self.final_stat[newly] = sd[first[newly]]
        self.accepted |= newly
        return ~self.accepted[rows]

    def chosen(self) -> torch.Tensor:
        return torch.where(_per_row(self.accepted, self.acc_x), self.acc_x, self.best_x)


class _Adam:
    """Adam on a batch of points whose rows leave as they are accepted (moments kept per row)."""
    b1, b2, eps = 0.9, 0.999, 1e-8

    def __init__(self, x: Tensor, lr: float, project: bool) -> None:
        self.m, self.v, self.lr, self.project = torch.zeros_like(x), torch.zeros_like(x), lr, project
        self.radius = x.reshape(len(x), -1).norm(dim=1)

    def step(self, x: Tensor, g: Any, live, k: int) -> Tensor:
        """x, g of every row; returns the live rows' x after Adam's k-th step (k from 0)."""
        b1, b2 = self.b1, self.b2
        x, g, self.m, self.v, self.radius = (a[live] for a in (x, g, self.m, self.v, self.radius))
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        x = x - self.lr * (self.m / (1 - b1 ** (k + 1))) / ((self.v / (1 - b2 ** (k + 1))).sqrt() + self.eps)
        if self.project:  # back onto the shell of the candidate's initial norm
            x = x * _per_row(self.radius / x.reshape(len(x), -1).norm(dim=1).clamp_min(1e-12), x)
        return x


def optimize_latents(model: ScoreModel, cond: Any, x0: torch.Tensor, sched: Any, *, objective: str = "paper",
                     alpha: float = 0.0, lr: float = 0.05, max_steps: int = 2, threshold: Any = 0.0,
                     project: bool = True, fd_step: Optional[float] = None, new_candidates=None, rounds: int = 1,
                     raise_every: float = 3, raise_by: float = 0.1, names: Any = None, stop_metric=None) -> tuple:
    """Optimize candidate initial latents at the first timestep, all in one batch.

    x0: (N, K, C, h, w), N images with K candidates each, as the sampler starts from them (after
    init_noise_sigma); cond: the N images' Conditioning. new_candidates(round) -> (N, K, C, h, w)
    gives fresh candidates for later rounds (rounds > 1, objective="reference").
    Returns (latents (N, C, h, w) in x0's scale, info). Raises NonFiniteOutput when the model
    returns NaN/inf for a candidate (names[i], if given, names image i in the message).
    """
    N, K = x0.shape[:2]
    dev = model.device
    t = sched.timesteps[0]
    obj = _Objective(model, t, model.alpha_bar(sched, t), objective, alpha,
                     fd_step if fd_step is not None else default_fd_step(model.dtype), stop_metric, sched)
    shape = x0.shape[2:]
    track = _Track(N, shape, dev)
    steps_taken, thr = 0, float(threshold)
    for rnd in range(rounds):
        cand = x0 if rnd == 0 else new_candidates(rnd)
        rows = torch.arange(N, device=dev).repeat_interleave(K)
        x = cand.reshape(N * K, *shape).to(dev, torch.float32)[~track.accepted[rows]]
        rows = rows[~track.accepted[rows]]
        adam = _Adam(x, lr, project)
        for step in range(max_steps + 1):
            x.requires_grad_(True)
            loss, stat = obj(sched.scale_model_input(x, t), cond.rows(rows), _RowNames(names, rows))
            ld, sd = loss.detach(), stat.detach()
            bad = ~(torch.isfinite(sd) & torch.isfinite(ld))
            live = track.note(x.detach(), rows, ld, sd, thr, K)
            any_bad, any_live = torch.stack([bad.any(), live.any()]).tolist()  # the one host sync of a step
            if any_bad:
                i = int(rows[bad.nonzero()[0]])
                raise NonFiniteOutput(f"the UNet returned NaN/inf while SAIL optimized the initial noise of "
                                      f"{names[i] if names else f'image {i}'!r}")
            if step == max_steps or not any_live:
                break
            (g,) = torch.autograd.grad((loss * live).sum(), x)
            steps_taken += 1
            with torch.no_grad():  # accepted rows leave the batch
                x, rows = adam.step(x.detach(), g, live, step), rows[live]
        if bool(track.accepted.all()):
            break
        if rnd + 1 < rounds and (rnd + 1) % raise_every == 0:
            thr += raise_by
    assert track.first_stat is not None  # the loop runs at least one round
    info = {"accepted": track.accepted.cpu(), "converged": bool(track.accepted.all()),
            "final_loss": track.best_loss.cpu(), "final_statistic": track.final_stat.cpu(),
            "initial_statistic": track.first_stat.cpu(), "adam_steps": steps_taken, "threshold": thr}
    return track.chosen(), info


def sail(pipe: Any, prompt: Any, *, num_images_per_prompt: int = 1, generator: Optional[Any] = None,
         latents: Optional[Tensor] = None, return_info: bool = False, **kwargs: Any) -> Any:
    """Generate with SAIL: optimized initial noise, then the pipeline's own sampler.

    Takes the keyword arguments of `pipe(...)` (num_inference_steps, guidance_scale, height, width,
    output_type, negative_prompt, ...) and returns the pipeline's own output; with
    return_info=True, (output, info) where info holds the acceptance per image, final losses and
    sharpness, Adam steps, converged, UNet calls and seconds, and `note`: one line on what SAIL did
    (above all when nothing: every image already under the target, with the target's source).

    threshold: the sharpness at which a candidate stops. "auto" (objective="paper": the model's
    calibrated "target", the sharpness that only 10% of normal prompts' images are under, from
    calibration.json beside the model, the per-user cache, or calibrated once now on the
    built-in generic captions, see sharpfast.calibration; info["threshold_source"] says which;
    "reference": the authors' 8.2 for SD 1.4, times sqrt(D / 16384) for a latent of D elements)
    or a number (e.g.
    sharpfast.calibrate(sharpness of normal prompts, fpr=0.9)). Stopping as soon as an image
    would no longer be flagged (the detection threshold) was measured to be too early: on the
    digits model half of the memorized noises are under it from the start and still copy.
    candidates: initial noises per image (default 1 paper / 8 reference); max_steps: Adam steps
    (default 3 / 10, a round for "reference"); lr: Adam's step (default 0.7 paper / 0.05
    reference); project: keep each candidate on the sphere of its initial norm (default True for
    "paper", False for "reference"); alpha: weight of the norm penalty (default 0 paper; 0.05
    SD 1.x / 0.01 SD 2.x reference). The pipeline is not modified.
    """
    start = time.perf_counter()
    opts = {k: kwargs.pop(k) for k in _sail_options() if k in kwargs}
    final, info = sail_latents(pipe, prompt, num_images_per_prompt=num_images_per_prompt, generator=generator,
                               latents=latents, **opts, **kwargs)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if bool(info["unchanged"].all()):  # said without return_info too: the output is plain pipe(...)'s
        log.warning("sharpfast.sail changed nothing: %s", info["note"])
    else:
        log.info("sharpfast.sail: %s", info["note"])
    out = pipe(prompts, num_images_per_prompt=num_images_per_prompt, generator=generator, latents=final, **kwargs)
    if not return_info:
        return out
    steps = ScoreModel(pipe).resolve(**kwargs).num_inference_steps
    info.update(unet_calls=info["unet_calls_optimization"] + steps,
                seconds=time.perf_counter() - start)
    return out, info


def _sail_options() -> tuple:
    """SAIL's own keywords (the rest of sail's kwargs go to the pipeline), read off sail_latents."""
    import inspect

    own = ("num_images_per_prompt", "generator", "latents")
    return tuple(name for name, p in inspect.signature(sail_latents).parameters.items()
                 if p.kind is p.KEYWORD_ONLY and name not in own)


def _options(objective: str, alpha: Optional[float], lr: Optional[float], max_steps: Optional[int],
             candidates: Optional[int], project: Optional[bool], v_pred: bool) -> dict:
    """The objective's defaults filled in (sail's docstring lists them)."""
    if objective not in OBJECTIVES:
        raise BadArgument(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    d = DEFAULTS[objective]
    if alpha is None:
        alpha = 0.0 if objective == "paper" else (REFERENCE["alpha_sd2"] if v_pred else REFERENCE["alpha_sd1"])
    return dict(candidates=d["candidates"] if candidates is None else candidates,
                max_steps=d["max_steps"] if max_steps is None else max_steps, lr=d["lr"] if lr is None else lr,
                alpha=alpha, project=objective == "paper" if project is None else project)


def _check_pipe_kwargs(pipe_kwargs) -> None:
    if any(k in pipe_kwargs for k in ("prompt_embeds", "negative_prompt_embeds")):
        raise BadArgument("sail encodes the prompt itself: pass prompt (and negative_prompt), not prompt_embeds")
    if pipe_kwargs.get("negative_prompt") is not None:
        raise BadArgument("sail optimizes against the empty-prompt null branch; negative_prompt is not supported yet")


def _stop_at(pipe: Any, stop, threshold: Any, objective: str, numel, steps: int, guidance_scale: float,
             size: Any) -> tuple:
    """(the statistic's metric or None for sharpness/loss, its threshold, where the threshold came from)."""
    if stop is not None:
        if objective != "paper" or not isinstance(stop, dict) or set(stop) != {"metric", "threshold"}:
            raise BadArgument("stop must be {'metric': name, 'threshold': number}, with objective='paper'")
        if stop["metric"] not in REGISTRY:
            raise BadArgument(f"stop metric must be one of {tuple(REGISTRY)}, got {stop['metric']!r}")
        metric, threshold, source = stop["metric"], stop["threshold"], f"the {stop['metric']} threshold given"
    elif threshold == "auto":
        metric = None
        if objective == "paper":  # the model's calibration (beside it, cached, or made now: sharpfast.calibration)
            from ..calibration import resolve

            found = resolve(pipe, "sharpness", "target", num_inference_steps=steps, guidance_scale=guidance_scale,
                            height=size[0], width=size[1])
            threshold, source = found.value, found.source
        else:
            threshold = REFERENCE["threshold"] * (numel / REFERENCE["threshold_numel"]) ** 0.5
            source = f"the authors' 8.2 on SD 1.4's latent, times sqrt(D / 16384) for D = {numel}"
    else:
        metric, source = None, "given"
    return metric, validate.finite(threshold, "threshold"), source


def sail_latents(pipe: Any, prompt: Any, *, num_images_per_prompt: int = 1, generator: Optional[Any] = None,
                 latents: Optional[Tensor] = None, objective: str = "paper", alpha: Optional[float] = None,
                 lr: Optional[float] = None, max_steps: Optional[int] = None, candidates: Optional[int] = None,
                 threshold: str = "auto", project: Optional[bool] = None, max_rounds: int = 6,
                 fd_step: Optional[float] = None, stop=None, **pipe_kwargs: Any) -> tuple:
    """SAIL's optimized initial noise, without generating: (latents as `pipe(latents=...)` takes
    them, info). Arguments as sail's; the serving guard uses it to generate a batch once.
    stop: {"metric": name, "threshold": value} stops each image on that registry metric instead of
    the sharpness target (the guard's own metric and threshold; objective="paper" only)."""
    n = num_images_per_prompt
    model = ScoreModel(pipe, pipe_kwargs.get("max_sequence_length"))
    st = model.resolve(**pipe_kwargs)
    guidance_scale, height, width, steps = st.guidance_scale, st.height, st.width, st.num_inference_steps
    o = _options(objective, alpha, lr, max_steps, candidates, project, model.prediction_type == "v_prediction")
    prompts = _check(prompt, n, guidance_scale, o["lr"], o["max_steps"], o["candidates"], needs_cfg=not model.distilled)
    _check_pipe_kwargs(pipe_kwargs)
    N, shape = len(prompts) * n, model.latent_shape(height, width)
    stop_metric, threshold, source = _stop_at(pipe, stop, threshold, objective, math.prod(shape), steps, guidance_scale,
                                              (height, width))
    sched = model.scheduler(steps, height, width)
    validate.generators(generator, N)
    if latents is None:
        latents = model.noise(N, height, width, generator)
    else:
        validate.latents(latents, (N, *shape))
    g = generator[0] if isinstance(generator, list) else generator
    dev = model.device

    def fresh(k: int) -> torch.Tensor:  # k more candidates per image, from the user's generator (or the global RNG)
        return model.noise(N * k, height, width, g).view(N, k, *shape).to(dev, torch.float32)

    base=latents.to(dev, torch.float32).view(N, 1, *shape)
    x0=torch.cat([base, fresh(o["candidates"] - 1)], dim=1) if o["candidates"] > 1 else base
    scale=float(sched.init_noise_sigma)
    with torch.no_grad():
        cond = model.encode(prompts, n, height, width, guidance_scale)
    chosen, info = optimize_latents(
        model, cond, x0 * scale, sched, objective=objective, alpha=o["alpha"], lr=o["lr"], max_steps=o["max_steps"],
        threshold=threshold, project=o["project"], fd_step=fd_step,
        rounds=max_rounds if objective == "reference" else 1, new_candidates=lambda r: fresh(o["candidates"]) * scale,
        raise_every=REFERENCE["raise_every"], raise_by=REFERENCE["raise_by"],
        names=[p for p in prompts for _ in range(n)], stop_metric=stop_metric)
    final = _as_given(chosen / scale, latents, info, threshold)
    info["note"] = _note(info, threshold, source, stop_metric or "sharpness")
    info.update(unet_calls_optimization=model.stats["unet_calls"], candidates=o["candidates"], objective=objective,
                threshold_source=source, statistic=stop_metric or ("sharpness" if objective == "paper" else "loss"),
                unchanged=(final.flatten(1) == latents.to(dev, final.dtype).flatten(1)).all(dim=1).cpu(),
                latents=final.detach().cpu())
    return final, info


def _note(info, threshold: Any, source: str, statistic) -> str:
    """One line on what SAIL did, for reports: above all when it did nothing, and why."""
    start = info["initial_statistic"][:, 0]
    under = int((start <= threshold).sum())
    if under == len(start):
        return (f"nothing to do: every image's initial noise is already under the {statistic} target {threshold:.4g} "
                f"(from {source}), so the noise is returned unchanged; a lower threshold moves it")
    moved = f"{len(start) - under} of {len(start)} images optimized ({info['adam_steps']} Adam steps)"
    if not info["converged"]:
        return f"{moved}; not every image reached the target {threshold:.4g}: the flattest point found is kept"
    return f"{moved}, every image under the target {threshold:.4g}"


def _as_given(final, latents: Tensor, info, threshold: Any) -> torch.Tensor:
    """The chosen noise in the caller's dtype; a first candidate accepted where it started is the
    caller's noise, bit for bit ("unchanged" then also marks an image whose optimization fell back
    to its start)."""
    final = final.to(latents.dtype)
    keep = (info["initial_statistic"][:, 0] <= threshold).to(final.device)
    final[keep] = latents.to(final.device)[keep]
    return final
