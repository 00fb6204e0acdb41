"""One home for the sampling settings every feature shares.

A call that names neither `num_inference_steps` nor `guidance_scale` gets the pipeline's own
defaults (what its `__call__` defaults them to: SD 50 / 7.5, SD3 28 / 7.0, Flux 28 / 3.5), in the
library, the CLI, calibration and the guard alike, so a calibration made with the defaults is
the one a default request looks up. Image size defaults to the pipeline's own too. A call's
settings are resolved by its adapter (`ScoreModel.resolve`, sharpfast.adapters.Settings).

The constants below are the library's one default for each shared knob (the Python API and the
command line both read them). This module imports no torch: `sharpfast --help` reads it.
"""
from __future__ import annotations

# images one pipeline call may make (num_images_per_prompt): a larger call is refused before any work
# (10**6 images ran SAIL for 25 s, then failed on an 8 GB allocation)
MAX_IMAGES_PER_CALL = 4096
BATCH_SIZE = 8  # prompts per denoiser call (detect, scan, calibrate, eval)
SEED = 42  # the prompt on line i draws its initial noise from SEED + i (detect, scan, eval; sail's generator)
FPR = 0.01  # false-positive rate of calibrated thresholds
# the shares of normal captions a calibration records a cut at (calibration.json "<metric>": {"gate_0.3": ...}),
# the gates and tiers a guard policy may use (sharpfast.guarding.policy)
GATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
SAIL_DEFAULTS = {"paper": dict(candidates=1, max_steps=3, lr=0.7),
                 "reference": dict(candidates=8, max_steps=10, lr=0.05)}  # SAIL's knobs per objective
GUARD_METRIC = "wen_low"  # THE default detector: the guard decides on it, scan flags on it (why: docs/guard.md)
# what detect and scan score by default: the two the paper defines, and the detector the flags use
DEFAULT_METRICS = ("wen", "sharpness", GUARD_METRIC)
# the guard's mitigation="auto": the first (method, setting) the model family has. transition s0t450 (no
# guidance above t = 450): the fewest copies at fidelity >= 0.95 with no extra UNet call on half A of
# the digits memorized prompts (docs/mitigation.md); else SAIL stopping on the guard's metric (Flux)
GUARD_MITIGATIONS = (("transition", "s0t450"), ("sail_guard", 1.0))
# the guard's default policy: "auto" = the policy calibrated for the model (calibration.json's "policy": the
# gate and tiers chosen on its tuning half within POLICY_BUDGET, zoo_scripts/choose_policy.py), else the gate at FPR
GUARD_POLICY = "auto"
# what a calibrated policy may cost, guarded / plain fidelity of the model's normal and memorized prompts
POLICY_BUDGET = {"normal_fidelity": 0.97, "memorized_fidelity": 0.95}
