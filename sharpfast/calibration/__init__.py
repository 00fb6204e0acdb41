"""Calibration: a model's detection thresholds and SAIL's stopping target, from prompts that are
not memorized, so threshold="auto" works on any model.

    cal = sharpfast.calibrate_model(pipe)                 # the built-in generic captions
    cal = sharpfast.calibrate_model(pipe, my_normal_prompts, fpr=0.01)
    sharpfast.calibration.save(cal, "calibration.json")   # beside the model: found by "auto"

A calibration holds, per metric, the threshold that flags a fraction `fpr` of the normal prompts'
scores (score > threshold; first sampling step, the settings recorded), and for sharpness SAIL's
target: the level under which only 1 - TARGET_ABOVE (10%) of those prompts' images are, i.e. "as
flat as the flattest tenth of normal generations". It records the sharpfast version, the settings,
the prompts' source and a fingerprint of the model's weights; it is refused for other weights.

threshold="auto" (sail, guard, scan) looks, in order:
  1. calibration.json beside the model (pipe.name_or_path), if its fingerprint matches;
  2. the per-user cache, $SHARPFAST_CACHE or $XDG_CACHE_HOME/sharpfast or ~/.cache/sharpfast,
     calibration/<fingerprint>-<settings>.json;
  3. otherwise it calibrates once on the built-in generic captions (sharpfast/data/
     generic_prompts.txt; a progress bar and a logged note of the cost) and caches the result.
Each lookup returns the value with where it came from (`Resolved.source`).

Layout: fingerprint.py (which weights), measure.py (calibrate_model), store.py (files, cache,
resolve).
"""
from __future__ import annotations

from .fingerprint import model_name, same_weights, weights_fingerprint
from .measure import (
    CALIBRATED_METRICS,
    GENERIC_PROMPTS,
    QUICK,
    TARGET_ABOVE,
    builtin_kind,
    calibrate_model,
    generic_prompts,
)
from .store import (
    CALIBRATION_FILE,
    DEFAULTS,
    Resolved,
    cache_dir,
    cache_path,
    load,
    resolve,
    save,
    shipped_threshold,
)

__all__ = ["model_name", "same_weights", "weights_fingerprint", "CALIBRATED_METRICS", "GENERIC_PROMPTS", "QUICK",
           "TARGET_ABOVE", "builtin_kind", "calibrate_model", "generic_prompts", "CALIBRATION_FILE", "DEFAULTS",
           "Resolved", "cache_dir", "cache_path", "load", "resolve", "save", "shipped_threshold"]
