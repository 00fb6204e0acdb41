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
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Optional

import torch

from . import validate
from .errors import BadArgument, OutputMismatch
from .settings import Settings

log = logging.getLogger("sharpfast.calibration")

CALIBRATION_FILE = "calibration.json"
TARGET_ABOVE = 0.9  # SAIL's target: the sharpness 90% of normal prompts' images lie above
CALIBRATED_METRICS = (
    "wen",
    "sharpness",
    "wen_low",
)  # calibrated together: the detectors, SAIL's target and the guard's default metric
# num_inference_steps and guidance_scale default to the pipeline's own (sharpfast.settings)
DEFAULTS = {"num_images_per_prompt": 1, "num_inference_steps": None, "guidance_scale": None, "fpr": 0.01, "seed": 0}
GENERIC_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "generic_prompts.txt")
_SAMPLE = 16  # weight elements read per parameter for the fingerprint


def generic_prompts() -> list[str]:
    """The built-in everyday captions (see sharpfast/data/make_generic_prompts.py for how they were made)."""
    with open(GENERIC_PROMPTS, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


# ---- the weights' fingerprint ----------------------------------------------------------------

def _modules(pipe):
    names = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
    return [(n, getattr(pipe, n)) for n in names if isinstance(getattr(pipe, n, None), torch.nn.Module)]


def weights_fingerprint(pipe) -> dict:
    """{"fingerprint": exact hash, "structure": hash of names/shapes, "dtype", "sample": [floats]}.

    Cheap: names and shapes of every parameter of the denoiser and text encoders, plus the sum of
    sums of w and of |w| over a strided sample of _SAMPLE elements of each parameter (one device
    transfer). "fingerprint" hashes the exact sampled values in the model's dtype; `same_weights`
    also accepts the same weights at another precision (every sampled sum equal within bf16
    rounding of its |w| sum). A change smaller than that rounding goes unseen."""
    structure = hashlib.sha256()
    sums, dtypes = [], set()
    for mod_name, mod in _modules(pipe):
        for name, p in mod.named_parameters():
            structure.update(f"{mod_name}.{name}:{tuple(p.shape)};".encode())
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLE)
            picked = flat[::step][:_SAMPLE].double()
            sums += [picked.sum(), picked.abs().sum()]
            dtypes.add(str(p.dtype).replace("torch.", ""))
    by_device: dict = {}  # one transfer per device (offloaded models span several)
    for i, v in enumerate(sums):
        by_device.setdefault(v.device, []).append(i)
    sample = [0.0] * len(sums)
    for _dev, idx in by_device.items():
        for i, v in zip(idx, torch.stack([sums[i] for i in idx]).cpu().tolist()):
            sample[i] = float(v)
    dtype = "+".join(sorted(dtypes))
    exact = hashlib.sha256((structure.hexdigest() + dtype + ",".join(repr(v) for v in sample)).encode())
    return {"fingerprint": exact.hexdigest()[:16], "structure": structure.hexdigest()[:16], "dtype": dtype,
            "sample": sample}


def same_weights(recorded: dict, current: dict) -> bool:
    """The same weights: the exact fingerprint, or the same structure with sums equal within
    bf16 / fp16 rounding when the dtypes differ (a model calibrated in fp32, served in fp16)."""
    if recorded.get("fingerprint") == current["fingerprint"]:
        return True
    if recorded.get("structure") != current["structure"] or recorded.get("dtype") == current["dtype"]:
        return False
    a, b = recorded.get("sample") or [], current["sample"]
    if len(a) != len(b):
        return False
    # pairs (sum w, sum |w|) per parameter: the sums may differ by the rounding of every term
    return all(abs(a[i] - b[i]) <= 2 ** -7 * max(a[i + 1], b[i + 1]) + 1e-6 and
               abs(a[i + 1] - b[i + 1]) <= 2 ** -7 * max(a[i + 1], b[i + 1]) + 1e-6 for i in range(0, len(a), 2))


# ---- calibrating -------------------------------------------------------------------------------

def calibrate_model(pipe, prompts=None, *, num_images_per_prompt: int = 1, fpr: float = 0.01,
                    num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None, seed: int = 0,
                    metrics=CALIBRATED_METRICS, batch_size: int = 8, progress: bool = True) -> dict:
    """Thresholds at false-positive rate `fpr` and SAIL's target from prompts that are not
    memorized (default: the built-in generic captions), at the first sampling step with these
    settings. The result is JSON-able; save() writes it, threshold="auto" finds it."""
    from . import __version__
    from .detection import detect
    from .evaluation import calibrate
    from .metrics import METRICS

    source = "built-in generic captions" if prompts is None else "given prompts"
    prompts = validate.prompts(generic_prompts() if prompts is None else prompts, "prompts")
    if len(prompts) < 20:
        raise BadArgument(f"calibrating needs at least 20 normal prompts (a 1% threshold of fewer is their "
                          f"maximum), got {len(prompts)}")
    fpr = validate.finite(fpr, "fpr", above=0)
    if not fpr < 1:
        raise BadArgument(f"fpr must be in (0, 1), got {fpr}")
    metrics = list(validate.metrics(metrics, METRICS))
    st = Settings.resolve(pipe, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          num_images_per_prompt=num_images_per_prompt)
    n, num_inference_steps, guidance_scale = st.num_images_per_prompt, st.num_inference_steps, st.guidance_scale
    res = detect(pipe, prompts, metrics=tuple(metrics), num_images_per_prompt=n,
                 num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                 generator=torch.Generator("cpu").manual_seed(seed), batch_size=batch_size, progress=progress)
    settings = {"num_images_per_prompt": n, "num_inference_steps": num_inference_steps,
                "guidance_scale": float(guidance_scale), "fpr": fpr, "seed": seed, "steps": 1}
    cal = {"sharpfast_version": __version__, "pipeline": type(pipe).__name__, "weights": weights_fingerprint(pipe),
           "settings": settings,
           "prompts": {"source": source, "count": len(prompts),
                       "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]},
           "unet_calls": res.config["unet_calls"], "unet_rows": res.config["unet_rows"]}
    for m in metrics:
        s = res.scores[m]
        if not bool(torch.isfinite(s).all()):
            from .errors import NonFiniteOutput

            raise NonFiniteOutput(f"calibration: the {m} score of a normal prompt is not finite")
        cal[m] = {"threshold": calibrate(s, fpr=fpr), "fpr": fpr, "prompts": len(prompts),
                  "num_images_per_prompt": n, "steps": 1, "num_inference_steps": num_inference_steps,
                  "median": float(s.median())}
    if "sharpness" in cal:
        cal["sharpness"]["target"] = calibrate(res.scores["sharpness"], fpr=TARGET_ABOVE)
        cal["sharpness"]["target_above"] = TARGET_ABOVE
    return cal


def save(cal: dict, path: str) -> str:
    """Write atomically (a temporary file beside it, then a rename): a crash leaves the old file or the new."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(cal, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load(path: str, pipe=None) -> dict:
    """A calibration file; with `pipe`, refused (OutputMismatch) if it was made for other weights."""
    with open(path, encoding="utf-8") as f:
        cal = json.load(f)
    if pipe is not None and "weights" in cal and not same_weights(cal["weights"], weights_fingerprint(pipe)):
        theirs = cal["weights"].get("fingerprint")
        raise OutputMismatch(f"{path} was calibrated for other weights (fingerprint {theirs}, "
                             f"this model {weights_fingerprint(pipe)['fingerprint']}); calibrate this model with "
                             f"sharpfast calibrate")
    return cal


# ---- threshold="auto" --------------------------------------------------------------------------

def _beside(pipe):
    root = getattr(pipe, "name_or_path", None) or getattr(pipe, "config", {}).get("_name_or_path")
    return os.path.join(str(root), CALIBRATION_FILE) if root else None


def shipped_threshold(pipe, metric: str = "sharpness", key: str = "threshold") -> float | None:
    """The level in calibration.json beside the model, if any (no lookup in the cache, no
    calibrating): key "threshold" is the detection threshold of `metric`, "target" SAIL's."""
    f = _beside(pipe)
    if not f or not os.path.isfile(f):
        return None
    with open(f, encoding="utf-8") as fh:
        cal = json.load(fh)
    return float(cal[metric][key]) if key in cal.get(metric, {}) else None


@dataclass(frozen=True)
class Resolved:
    """A resolved calibration value and where it came from."""
    value: float
    source: str  # where it came from, for logs and reports


def cache_dir() -> str:
    """The per-user calibration cache folder ($SHARPFAST_CACHE, else the XDG cache)."""
    root = os.environ.get("SHARPFAST_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "sharpfast")
    return os.path.join(root, "calibration")


def cache_path(fingerprint: dict, **settings) -> str:
    """Where the per-user cache keeps the calibration of these weights at these settings."""
    s: dict = {k: settings.get(k) for k in DEFAULTS}
    s["guidance_scale"] = float(s["guidance_scale"])
    key = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join(cache_dir(), f"{fingerprint['fingerprint']}-{key}.json")


_MEMO: dict = {}
_LOCKS: dict = {}
_LOCKS_GUARD = threading.Lock()


def _settings(pipe, **kw) -> dict:
    """The calibration settings of a call: DEFAULTS, steps and guidance from the pipeline."""
    st = Settings.resolve(pipe, num_inference_steps=kw.get("num_inference_steps"),
                          guidance_scale=kw.get("guidance_scale"))
    s = {**DEFAULTS, **{k: v for k, v in kw.items() if v is not None}}
    s["num_inference_steps"], s["guidance_scale"] = st.num_inference_steps, float(st.guidance_scale)
    return s


def _matches(cal: dict, metric: str, key: str, settings: dict, check_settings: bool) -> bool:
    entry = cal.get(metric, {})
    if key not in entry:
        return False
    if not check_settings:
        return True
    rec = cal.get("settings") or {k: entry.get(k) for k in ("num_images_per_prompt", "num_inference_steps")}
    keys = ("num_images_per_prompt", "num_inference_steps", "guidance_scale") + (("fpr",) if key == "threshold" else ())
    return all(rec.get(k) == settings[k] for k in keys if k in rec)


def resolve(pipe, metric: str = "sharpness", key: str = "threshold", *, calibrate: bool = True, progress: bool = True,
            **settings) -> Resolved:
    """The value of `key` ("threshold" or "target") of `metric` for this model, from the first of:
    calibration.json beside the model, the per-user cache, a calibration made now on the built-in
    prompts (then cached). settings: num_images_per_prompt, num_inference_steps, guidance_scale,
    fpr (defaults DEFAULTS) must match what the calibration was made with."""
    from .errors import MissingCalibration

    s = _settings(pipe, **settings)
    fp = weights_fingerprint(pipe)
    # 1. beside the model
    beside = _beside(pipe)
    if beside and os.path.isfile(beside):
        with open(beside, encoding="utf-8") as f:
            cal = json.load(f)
        if "weights" in cal and not same_weights(cal["weights"], fp):
            log.warning("ignoring %s: calibrated for other weights (fingerprint %s, this model %s)", beside,
                        cal["weights"].get("fingerprint"), fp["fingerprint"])
        elif _matches(cal, metric, key, s, check_settings=True):
            return Resolved(float(cal[metric][key]), f"{beside}")
    # 2. the cache, 3. calibrate now
    path = cache_path(fp, **s)
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(path, threading.Lock())
    with lock:  # one calibration per model and settings, whatever the number of threads asking
        cal = _MEMO.get(path)
        if cal is None and os.path.isfile(path):
            try:
                cal = load(path, pipe)
            except (OSError, ValueError) as err:
                log.warning("ignoring the cached calibration %s: %s", path, err)
                cal = None
        if cal is not None and _matches(cal, metric, key, s, check_settings=False):
            _MEMO[path] = cal
            where = f"cache {path}" if os.path.isfile(path) else "calibrated earlier in this process (not cached)"
            return Resolved(float(cal[metric][key]), where)
        if not calibrate:
            raise MissingCalibration(f"no calibration of {metric} for this model (weights {fp['fingerprint']}); run "
                                     f"sharpfast calibrate, or pass a number")
        metrics = list(dict.fromkeys([*CALIBRATED_METRICS, metric]))
        count = len(generic_prompts())
        per = 1 + sum(1 for m in metrics if m != "wen")  # CFG calls per batch: wen's + one per extra metric
        log.warning("no calibration for this model (weights %s) at %s: calibrating once on %d built-in generic "
                    "captions (about %d CFG calls of %d images); cached at %s. For thresholds that fit your "
                    "traffic run `sharpfast calibrate --prompts your_normal_prompts.txt`.", fp["fingerprint"],
                    {k: s[k] for k in ("num_inference_steps", "num_images_per_prompt", "guidance_scale")}, count,
                    per * math.ceil(count / 8), 8 * s["num_images_per_prompt"], path)
        cal = calibrate_model(pipe, None, num_images_per_prompt=s["num_images_per_prompt"], fpr=s["fpr"],
                              num_inference_steps=s["num_inference_steps"], guidance_scale=s["guidance_scale"],
                              seed=s["seed"], metrics=metrics, progress=progress)
        _MEMO[path] = cal
        try:
            save(cal, path)
            where = f"calibrated now on the built-in generic captions, cached at {path}"
        except OSError as err:  # a read-only home, a full disk: keep it for this process
            log.warning("could not cache the calibration at %s (%s); kept in memory for this process", path, err)
            where = f"calibrated now on the built-in generic captions (not cached: {err})"
        return Resolved(float(cal[metric][key]), where)
