"""One home for the sampling settings every feature shares.

A call that names neither `num_inference_steps` nor `guidance_scale` gets the pipeline's own
defaults (what its `__call__` defaults them to: SD 50 / 7.5, SD3 28 / 7.0, Flux 28 / 3.5), in the
library, the CLI, calibration and the guard alike, so a calibration made with the defaults is
the one a default request looks up. Image size defaults to the pipeline's own too.

The constants below are the library's one default for each shared knob (the Python API and the
command line both read them). This module imports no torch: `sharpfast --help` reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from . import validate

BATCH_SIZE = 8  # prompts per denoiser call (detect, scan, calibrate, eval)
SEED = 42  # the prompt on line i draws its initial noise from SEED + i (detect, scan, eval; sail's generator)
FPR = 0.01  # false-positive rate of calibrated thresholds
SAIL_DEFAULTS = {"paper": dict(candidates=1, max_steps=3, lr=0.7),
                 "reference": dict(candidates=8, max_steps=10, lr=0.05)}  # SAIL's knobs per objective
GUARD_METRIC = "wen_low"  # the guard's default metric (why: docs/guard.md)
# the guard's mitigation="auto": the first (method, setting) the model family has. transition s0t450 (no
# guidance above t = 450): the fewest copies at fidelity >= 0.95 with no extra UNet call on half A of
# the digits memorized prompts (docs/mitigation.md); else SAIL stopping on the guard's metric (Flux)
GUARD_MITIGATIONS = (("transition", "s0t450"), ("sail_guard", 1.0))


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
    def resolve(cls, pipe: Any, *, num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                height: Optional[int] = None, width: Optional[int] = None,
                num_images_per_prompt: Optional[int] = None, needs_cfg: bool = False) -> Settings:
        """The settings of a call on `pipe`, each None replaced by the pipeline's own default.

        Args:
            pipe: a supported diffusers pipeline, or its ScoreModel adapter.
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
            UnsupportedPipeline: the pipeline is not supported.
        """
        from .adapters import adapt, pipeline_defaults

        model = adapt(pipe)
        own = pipeline_defaults(model.pipe)
        steps = own["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        guidance = own["guidance_scale"] if guidance_scale is None else guidance_scale
        dh, dw = model.default_size()
        return cls(validate.integer(steps, "num_inference_steps"),
                   validate.guidance_scale(guidance, needs_cfg=needs_cfg and not model.distilled),
                   validate.integer(dh if height is None else height, "height"),
                   validate.integer(dw if width is None else width, "width"),
                   validate.integer(1 if num_images_per_prompt is None else num_images_per_prompt,
                                    "num_images_per_prompt"))
