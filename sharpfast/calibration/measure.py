"""Measuring a calibration: the scores of normal prompts at the first step (the built-in generic
captions or the user's), and from them each metric's threshold at a false-positive rate and
SAIL's target; the record written to a calibration file."""
from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any, Optional

import torch

from .. import validate
from ..adapters import adapt
from ..errors import BadArgument
from ..settings import BATCH_SIZE, FPR, GATES
from .fingerprint import model_name, weights_fingerprint

log = logging.getLogger("sharpfast.calibration")

TARGET_ABOVE = 0.9  # SAIL's target: the sharpness 90% of normal prompts' images lie above
CALIBRATED_METRICS = (
    "wen",
    "sharpness",
    "wen_low",
)  # calibrated together: the detectors, SAIL's target and the guard's default metric
GENERIC_PROMPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                               "generic_prompts.txt")
QUICK = 64  # built-in captions of a quick calibration (SHARPFAST_CALIBRATION=quick): a first try


def generic_prompts(kind: str = "full") -> list[str]:
    """The built-in everyday captions (see zoo_scripts/make_generic_prompts.py in the repository for how they were
    made): all of them ("full"), or an even spread of QUICK of them ("quick")."""
    if kind not in ("full", "quick"):
        raise BadArgument(f"the built-in calibration set is 'full' or 'quick', got {kind!r}")
    with open(GENERIC_PROMPTS, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    return prompts if kind == "full" else prompts[::max(1, len(prompts) // QUICK)][:QUICK]


def builtin_kind() -> str:
    """Which built-in set threshold="auto" calibrates on: $SHARPFAST_CALIBRATION ("full", the
    default, or "quick")."""
    kind = os.environ.get("SHARPFAST_CALIBRATION", "full").strip().lower() or "full"
    if kind not in ("full", "quick"):
        raise BadArgument(f"SHARPFAST_CALIBRATION must be 'full' or 'quick', got {kind!r}")
    return kind


def _prompt_set(prompts: Any) -> tuple:
    """(prompts, their source) of calibrate_model's `prompts` argument."""
    if prompts is None or isinstance(prompts, str) and prompts in ("full", "quick"):
        kind = prompts or "full"
        return generic_prompts(kind), "built-in generic captions" + (" (quick)" if kind == "quick" else "")
    return validate.prompts(prompts, "prompts"), "given prompts"


def _scores(pipe: Any, prompts: list, metrics: Any, st: Any, seed: int, batch_size: int, progress: bool) -> tuple:
    """detect's scores of the calibration prompts a batch at a time, under a bar named for the
    model, with the time the rest will take logged after the first batch; (scores, UNet calls, rows)."""

    from ..adapters import adapt
    from ..detection import detect
    from ..progress import bar as progress_bar

    model = adapt(pipe)
    n = st.num_images_per_prompt
    noise = model.noise(len(prompts) * n, st.height, st.width, torch.Generator("cpu").manual_seed(seed))
    parts: dict = {m: [] for m in metrics}
    calls = rows = 0
    start = time.perf_counter()
    with progress_bar(pipe, total=len(prompts), desc=f"calibrating {model_name(pipe)}", enabled=progress) as bar:
        for i in range(0, len(prompts), batch_size):
            res = detect(model, prompts[i:i + batch_size], metrics=tuple(metrics), num_images_per_prompt=n,
                         num_inference_steps=st.num_inference_steps, guidance_scale=st.guidance_scale,
                         latents=noise[i * n:(i + batch_size) * n], batch_size=batch_size, progress=False,
                         height=st.height, width=st.width)
            for m in metrics:
                parts[m].append(res.scores[m])
            calls, rows = calls + res.config["unet_calls"], rows + res.config["unet_rows"]
            bar.update(len(res.prompts))
            if i == 0 and len(prompts) > batch_size:
                took = time.perf_counter() - start
                log.warning("calibrating %s: about %.0f s more (%d prompts, %.1f s per batch of %d)",
                            model_name(pipe), took * (len(prompts) - batch_size) / batch_size, len(prompts), took,
                            batch_size)
    return {m: torch.cat(v) for m, v in parts.items()}, calls, rows


def _record(pipe: Any, prompts: list, source: str, st: Any, fpr: float, seed: int, calls, rows: Any) -> dict:
    """What a calibration records besides its values: version, weights, settings, prompts, cost."""
    from .. import __version__

    return {"sharpfast_version": __version__, "pipeline": type(pipe).__name__, "weights": weights_fingerprint(pipe),
            "settings": {"num_images_per_prompt": st.num_images_per_prompt, "num_inference_steps":
                         st.num_inference_steps, "guidance_scale": float(st.guidance_scale), "fpr": fpr, "seed": seed,
                         "steps": 1, "height": st.height, "width": st.width},
            "prompts": {"source": source, "count": len(prompts),
                        "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]},
            "unet_calls": calls, "unet_rows": rows}


def gate_key(share: float) -> str:
    """The calibration key of the cut above which `share` of the normal captions lie ("gate_0.3")."""
    return f"gate_{share:g}"


def gate_cuts(scores: Any) -> dict:
    """{"gate_<share>": the score above which that share of these normal prompts lies} for every
    share of settings.GATES (a guard policy's gate and tiers read them)."""
    from ..roc import calibrate

    return {gate_key(g): calibrate(scores, fpr=g) for g in GATES}


def calibrate_model(pipe: Any, prompts: Any = None, *, num_images_per_prompt: int = 1, fpr: float = FPR,
                    num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None, seed: int = 0,
                    metrics: Any = CALIBRATED_METRICS, batch_size: int = BATCH_SIZE, progress: bool = True,
                    height: Optional[int] = None, width: Optional[int] = None) -> dict:
    """Thresholds at false-positive rate `fpr` and SAIL's target from prompts that are not
    memorized, at the first sampling step with these settings (image size included: the scores
    grow with the latent's size).

    Args:
        pipe: a supported diffusers pipeline.
        prompts: normal prompts, or None / "full" (the built-in generic captions) / "quick" (an
            even spread of QUICK of them: a first try).
        num_images_per_prompt: images per prompt.
        fpr: the false-positive rate of the thresholds.
        num_inference_steps: the schedule's steps (default: the pipeline's own).
        guidance_scale: CFG scale (default: the pipeline's own).
        seed: the noise's seed.
        metrics: the metrics calibrated.
        batch_size: prompts per denoiser call.
        progress: show a progress bar ("calibrating <model>").
        height: image height in pixels (default: the pipeline's).
        width: image width in pixels (default: the pipeline's).

    Returns:
        The calibration, JSON-able: save() writes it, threshold="auto" finds it.

    Raises:
        BadArgument: fewer than 20 prompts, a bad fpr, metric or setting.
        NonFiniteOutput: a normal prompt's score is not finite.
    """
    from ..roc import calibrate
    from ..scores import REGISTRY

    prompts, source = _prompt_set(prompts)
    if len(prompts) < 20:
        raise BadArgument(f"calibrating needs at least 20 normal prompts (a 1% threshold of fewer is their "
                          f"maximum), got {len(prompts)}")
    fpr = validate.finite(fpr, "fpr", above=0)
    if not fpr < 1:
        raise BadArgument(f"fpr must be in (0, 1), got {fpr}")
    metrics = list(validate.metrics(metrics, REGISTRY))
    st = adapt(pipe).resolve(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          num_images_per_prompt=num_images_per_prompt, height=height, width=width)
    validate.integer(batch_size, "batch_size")
    scores, calls, rows = _scores(pipe, prompts, metrics, st, seed, batch_size, progress)
    cal = _record(pipe, prompts, source, st, fpr, seed, calls, rows)
    for m in metrics:
        s = scores[m]
        if not bool(torch.isfinite(s).all()):
            from ..errors import NonFiniteOutput

            raise NonFiniteOutput(f"calibration: the {m} score of a normal prompt is not finite")
        cal[m] = {"threshold": calibrate(s, fpr=fpr), "fpr": fpr, "prompts": len(prompts),
                  "num_images_per_prompt": st.num_images_per_prompt, "steps": 1,
                  "num_inference_steps": st.num_inference_steps, "median": float(s.median()), **gate_cuts(s)}
    if "sharpness" in cal:
        cal["sharpness"]["target"] = calibrate(scores["sharpness"], fpr=TARGET_ABOVE)
        cal["sharpness"]["target_above"] = TARGET_ABOVE
    return cal

