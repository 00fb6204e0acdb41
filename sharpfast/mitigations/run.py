"""Running a plan around the user's own `pipe(...)` call, and `sharpfast.mitigate`: one
registered method on a whole generation."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Optional

import torch
from torch import Tensor

from .. import validate
from ..errors import BadArgument, NonFiniteOutput
from .base import Context, Mitigation, Plan, check_family, get
from .hooks import CallCounter, DenoiserHook, HookRegistry, prediction_of


class FiniteWatch(DenoiserHook):
    """NaN / inf anywhere in a mitigated generation: in a denoiser call (this hook) or in the
    latents of a step (a step callback chained before the user's own); noted on the device, no
    host sync per step, checked once after the call."""

    def __init__(self, model: Any):
        self.model = model
        self.bad: Optional[torch.Tensor] = None

    def note(self, t: torch.Tensor) -> None:
        """Note whether a tensor holds a non-finite value."""
        ok = torch.isfinite(t.detach()).all()
        self.bad = ~ok if self.bad is None else self.bad | ~ok

    def post_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Watch the call's prediction."""
        self.note(prediction_of(output))

    def chain(self, call: dict) -> dict:
        """The call with a step callback that watches the latents, then runs the user's own."""
        user_cb = call.pop("callback_on_step_end", None)
        inputs = call.pop("callback_on_step_end_tensor_inputs", None) or getattr(user_cb, "tensor_inputs", None)

        def watch(pipe: Any, i: int, t: Any, cb_kwargs: dict) -> dict:
            self.note(cb_kwargs["latents"])
            return user_cb(pipe, i, t, cb_kwargs) if user_cb is not None else {}
        return {**call, "callback_on_step_end": watch,
                "callback_on_step_end_tensor_inputs": list(dict.fromkeys([*(inputs or ["latents"]), "latents"]))}

    def check(self, out: Any, method: str) -> None:
        """NonFiniteOutput when anything was NaN / inf, the output's own tensors included."""
        images = out[0] if isinstance(out, tuple) else getattr(out, "images", None)
        if isinstance(images, torch.Tensor):
            self.note(images)
        elif images is not None and hasattr(images, "dtype") and hasattr(images, "shape"):  # numpy
            self.note(torch.as_tensor(images))
        if self.bad is not None and bool(self.bad):
            raise NonFiniteOutput(f"NaN/inf in the generation mitigated by {method!r} (a denoiser call, a step's "
                                  f"latents or the images): a huge guidance_scale or the model's own overflow; "
                                  f"nothing is returned")


def run_plan(pipe: Any, prompts: list, plan: Plan, call_kwargs: dict) -> Any:
    """pipe(...) with the plan's arguments, under its hooks (all removed afterwards)."""
    kw = {**call_kwargs, **plan.kwargs}
    with contextlib.ExitStack() as stack:
        for h in plan.hooks:
            stack.enter_context(h)
        if "prompt_embeds" in plan.kwargs:
            return pipe(**kw)
        return pipe(plan.prompts if plan.prompts is not None else prompts, **kw)


def mitigate(pipe: Any, prompt: Any, method: str = "transition", setting: Any = None, *, num_images_per_prompt: int = 1,
             generator: Optional[Any] = None, latents: Optional[Tensor] = None, return_info: bool = False,
             **pipe_kwargs: Any) -> Any:
    """Generate with one registered mitigation (see sharpfast.mitigations.REGISTRY).

    Args:
        pipe: a supported diffusers pipeline (left as it was).
        prompt: a prompt or a list of prompts.
        method: a registry name ("sail", "transition", "attention_rescale", "zhao_guard",
            "sail+transition", "wen_embedding", "random_tokens", ...).
        setting: the method's main knob (default: the registry's default; see each method's
            `knob`), e.g. "s0t500" for transition, 1.25 for attention_rescale.
        num_images_per_prompt: images per prompt, as for `pipe(...)`.
        generator: as for `pipe(...)`: the initial noise is the one the pipeline would draw.
        latents: or that noise given, as `pipe(latents=...)` takes it.
        return_info: also return what the method did (info dict: method, setting, seconds, UNet
            calls per image, and the method's own fields).
        **pipe_kwargs: the rest of the pipeline call (num_inference_steps, guidance_scale,
            height, width, output_type, ...).

    Returns:
        The pipeline's own output, or (output, info) with return_info=True.

    Raises:
        BadArgument: an unknown method or a bad setting or argument.
        UnsupportedPipeline: the method is not defined for this model family.
        NonFiniteOutput: the model or the sampler produced NaN/inf (while the method optimized,
            in a denoiser call or in the latents of a step; a huge guidance_scale, say): never
            an output of non-finite images.
    """
    from ..adapters import ScoreModel

    start = time.perf_counter()
    m = get(method)
    model = ScoreModel(pipe)
    check_family(m, model)
    prompts = validate.prompts(prompt, "prompt")
    n = validate.integer(num_images_per_prompt, "num_images_per_prompt")
    ctx = _context(pipe, model, m, prompts, n, generator, latents, pipe_kwargs)
    if m.config is None and setting is not None:
        raise BadArgument(f"mitigation {method!r} takes no setting, got {setting!r}")
    setting = m.default if setting is None else setting
    plan = m.plan(ctx, setting)
    calls, watch = CallCounter(model), FiniteWatch(model)
    call = watch.chain({**pipe_kwargs, "num_images_per_prompt": n, "generator": generator,
                        "latents": plan.kwargs.get("latents", ctx.latents)})
    with calls.counting(), HookRegistry.of(model.unet).installed(watch):
        out = run_plan(pipe, prompts, plan, call)
    watch.check(out, method)
    if not return_info:
        return out
    info = {"method": method, "setting": setting, "seconds": time.perf_counter() - start,
            "unet_calls_per_image": calls.rows / (2 * ctx.images) + plan.info.get("unet_calls_before", 0),
            **{k: v for k, v in plan.info.items() if k not in ("applied", "rule")}}
    return out, info


def _context(pipe: Any, model: Any, m: Mitigation, prompts: list, n: int, generator: Any, latents: Any,
             pipe_kwargs: dict) -> Context:
    """The call's Context: its settings (resolved by the adapter) and initial noise."""
    st = model.resolve(needs_cfg=m.kind != "none", **pipe_kwargs, num_images_per_prompt=n)
    steps, guidance, height, width = st.num_inference_steps, st.guidance_scale, st.height, st.width
    validate.generators(generator, len(prompts) * n)
    shape = (len(prompts) * n, *model.latent_shape(height, width))
    if latents is None:  # the draw pipe(...) would make; the call then gets it as latents=
        latents = model.noise(shape[0], height, width, generator)
    else:  # the guard's and detect's one check: shape, floating point, finite
        validate.latents(latents, shape, (height, width))
    # on the denoiser's device and dtype (float64 latents on an fp32 pipeline would fail inside it)
    return Context(pipe, model, prompts, n, latents.to(model.device, model.dtype), height, width, steps, guidance,
                   generator)

