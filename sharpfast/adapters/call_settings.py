"""A call's resolved sampling settings (`ScoreModel.resolve`, `Settings.resolve`): each setting
a call leaves out is the pipeline's own default."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .. import validate
from ..errors import BadArgument
from ..settings import MAX_IMAGES_PER_CALL


def pipeline_defaults(pipe: Any) -> dict:
    """num_inference_steps and guidance_scale as the pipeline's own __call__ defaults them (SD 50 /
    7.5, SD3 28 / 7.0, Flux 28 / 3.5): what a request that names neither gets."""
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters
    out = {}
    for name, fallback in (("num_inference_steps", 50), ("guidance_scale", 7.5)):
        d = params[name].default if name in params else inspect.Parameter.empty
        out[name] = fallback if d is inspect.Parameter.empty or d is None else d
    return out


@dataclass(frozen=True)
class Settings:
    """Resolved sampling settings of one call.

    Attributes:
        num_inference_steps: the sampler's steps (its first timestep depends on them).
        guidance_scale: the CFG scale (Flux: its embedded guidance).
        height: image height in pixels.
        width: image width in pixels.
        num_images_per_prompt: images per prompt.
    """

    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    num_images_per_prompt: int = 1

    @classmethod
    def resolve(cls, model: Any, *, num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                height: Optional[int] = None, width: Optional[int] = None,
                num_images_per_prompt: Optional[int] = None, needs_cfg: bool = False) -> Settings:
        """The settings of a call on the model, each None replaced by the pipeline's own default
        (what `ScoreModel.resolve` runs: callers resolve through their adapter).

        Args:
            model: the pipeline's ScoreModel adapter.
            num_inference_steps: sampler steps, or None for the pipeline's default.
            guidance_scale: CFG scale, or None for the pipeline's default.
            height: image height in pixels, or None for the pipeline's default size.
            width: image width in pixels, or None for the pipeline's default size.
            num_images_per_prompt: images per prompt (default 1).
            needs_cfg: the feature needs the classifier-free batch (guidance_scale must be > 1
                unless the model is guidance-distilled).

        Returns:
            The resolved, checked Settings.

        Raises:
            BadArgument: a value of the wrong type or out of range (the message names it).
        """
        own = pipeline_defaults(model.pipe)
        steps = own["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        guidance = own["guidance_scale"] if guidance_scale is None else guidance_scale
        dh, dw = model.default_size()
        st = cls(validate.integer(steps, "num_inference_steps"),
                 validate.guidance_scale(guidance, needs_cfg=needs_cfg and not model.distilled),
                 validate.integer(dh if height is None else height, "height"),
                 validate.integer(dw if width is None else width, "width"),
                 validate.integer(1 if num_images_per_prompt is None else num_images_per_prompt,
                                  "num_images_per_prompt"))
        k = model.size_multiple()
        for name, v in (("height", st.height), ("width", st.width)):
            if v % k:
                raise BadArgument(f"{name} must be a multiple of {k} for this pipeline (its latent is the image / "
                                  f"{model.pipe.vae_scale_factor}), got {v}")
        if st.num_images_per_prompt > MAX_IMAGES_PER_CALL:
            raise BadArgument(f"num_images_per_prompt must be at most {MAX_IMAGES_PER_CALL} (one call's batch; "
                              f"split larger runs into calls), got {st.num_images_per_prompt}")
        return st
