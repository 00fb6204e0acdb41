"""Where calibrations live and how "auto" finds one: calibration.json beside the model, the
per-user cache (bounded, oldest pruned), a per-process memo, or a calibration made once and
cached; each lookup with its source (`Resolved`). Bad files (truncated, NaN, other weights or
settings) are recalibrated."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Optional

from ..adapters import adapt
from ..errors import OutputMismatch
from ..settings import BATCH_SIZE, FPR
from .fingerprint import model_name, same_weights, weights_fingerprint
from .measure import CALIBRATED_METRICS, QUICK, builtin_kind, calibrate_model, generic_prompts

log = logging.getLogger("sharpfast.calibration")

CALIBRATION_FILE = "calibration.json"
# num_inference_steps and guidance_scale default to the pipeline's own (sharpfast.settings)
DEFAULTS: dict = {"num_images_per_prompt": 1, "num_inference_steps": None, "guidance_scale": None, "fpr": FPR,
                  "seed": 0, "height": None, "width": None}
MAX_MEMO = 64  # calibrations kept in memory per process (the least recently used go first)
MAX_CACHE_FILES = 256  # files in the per-user cache (the oldest are removed beyond it)


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


def load(path: str, pipe: Optional[Any] = None) -> dict:
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

def _beside(pipe: Any) -> Any:
    root = getattr(pipe, "name_or_path", None) or getattr(pipe, "config", {}).get("_name_or_path")
    return os.path.join(str(root), CALIBRATION_FILE) if root else None


def shipped_threshold(pipe: Any, metric: str = "sharpness", key: str = "threshold") -> float | None:
    """The level in calibration.json beside the model, if any (no lookup in the cache, no
    calibrating): key "threshold" is the detection threshold of `metric`, "target" SAIL's."""
    f = _beside(pipe)
    if not f or not os.path.isfile(f):
        return None
    with open(f, encoding="utf-8") as fh:
        cal = json.load(fh)
    return float(cal[metric][key]) if key in cal.get(metric, {}) else None


def shipped_policy(pipe: Any) -> Optional[dict]:
    """The guard policy calibration.json beside the model holds for these weights ({"policy":
    text, ...}), or None (no file, no policy, other weights, not readable)."""
    f = _beside(pipe)
    if not f or not os.path.isfile(f):
        return None
    cal = _read_json(f)
    entry = cal.get("policy") if isinstance(cal, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("policy"), str):
        return None
    if isinstance(cal.get("weights"), dict) and not same_weights(cal["weights"], weights_fingerprint(pipe)):
        return None
    return entry


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


def cache_path(fingerprint: dict, **settings: Any) -> str:
    """Where the per-user cache keeps the calibration of these weights at these settings."""
    s: dict = {k: settings.get(k) for k in DEFAULTS}
    s["guidance_scale"] = float(s["guidance_scale"])
    if settings.get("builtin", "full") != "full":
        s["builtin"] = settings["builtin"]
    key = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join(cache_dir(), f"{fingerprint['fingerprint']}-{key}.json")


_MEMO: dict = {}
_LOCKS: dict = {}
_LOCKS_GUARD = threading.Lock()


def _settings(pipe: Any, **kw: Any) -> dict:
    """The calibration settings of a call: DEFAULTS, steps and guidance from the pipeline."""
    st = adapt(pipe).resolve(num_inference_steps=kw.get("num_inference_steps"),
                          guidance_scale=kw.get("guidance_scale"), height=kw.get("height"), width=kw.get("width"))
    s = {**DEFAULTS, **{k: v for k, v in kw.items() if v is not None}}
    s["num_inference_steps"], s["guidance_scale"] = st.num_inference_steps, float(st.guidance_scale)
    s["height"], s["width"] = st.height, st.width
    if builtin_kind() != "full":  # a quick calibration is cached apart from the full one
        s["builtin"] = builtin_kind()
    return s


def _value(cal: dict, metric: str, key: str) -> Optional[float]:
    """The calibrated value, or None where the file does not hold a valid one (not a JSON object,
    a missing entry, a value that is not a finite number: NaN would flag nothing, -inf everything;
    a value the metric's scores cannot take, such as a negative norm: it too flags everything)."""
    from ..scores import REGISTRY

    entry = cal.get(metric) if isinstance(cal, dict) else None
    v = entry.get(key) if isinstance(entry, dict) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    if metric in REGISTRY and not REGISTRY[metric].in_range(float(v)):
        return None
    return float(v)


def _problem(cal: dict, metric: str, key: str) -> Optional[str]:
    """Why a calibration file cannot be used for `metric`/`key` (None: it can)."""
    if not isinstance(cal, dict):
        return f"it holds a JSON {type(cal).__name__}, not an object"
    if "weights" in cal and not isinstance(cal["weights"], dict):
        return "its 'weights' is not an object"
    if "settings" in cal and not isinstance(cal["settings"], dict):
        return "its 'settings' is not an object"
    if metric in cal and key in (cal[metric] if isinstance(cal[metric], dict) else {}) \
            and _value(cal, metric, key) is None:
        m = _metric_range(metric)
        return (f"its {metric} {key} is {cal[metric][key]!r}, not a finite number" + (f" in [{m[0]:g}, {m[1]:g}], the "
                f"range of {metric}'s scores" if m else ""))
    return None


def _metric_range(metric: str) -> Optional[tuple]:
    from ..scores import REGISTRY

    m = REGISTRY.get(metric)
    return None if m is None else (m.low, m.high)


def _matches(cal: dict, metric: str, key: str, settings: dict, check_settings: bool, default_size=None) -> bool:
    if _value(cal, metric, key) is None:
        return False
    if not check_settings:
        return True
    entry = cal[metric]
    rec = dict(cal.get("settings") or {k: entry.get(k) for k in ("num_images_per_prompt", "num_inference_steps")})
    if default_size is not None:  # a file of before the size was recorded: made at the model's own size
        rec.setdefault("height", default_size[0])
        rec.setdefault("width", default_size[1])
    keys = ("num_images_per_prompt", "num_inference_steps", "guidance_scale", "height", "width") + \
        (("fpr",) if key == "threshold" else ())
    return all(rec.get(k) == settings[k] for k in keys if k in rec)


def _read_json(path: str) -> Any:
    """A JSON file's content, or None with a warning naming the file when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as err:
        log.warning("ignoring the calibration file %s: %s", path, err)
        return None


def _from_beside(pipe: Any, fp: dict, metric: str, key: Any, s: Any) -> Optional[Resolved]:
    beside = _beside(pipe)
    if not beside or not os.path.isfile(beside):
        return None
    cal = _read_json(beside)
    if cal is None:
        return None
    why = _problem(cal, metric, key)
    if why:
        log.warning("ignoring the calibration file %s: %s", beside, why)
    elif "weights" in cal and not same_weights(cal["weights"], fp):
        log.warning("ignoring %s: calibrated for other weights (fingerprint %s, this model %s)", beside,
                    cal["weights"].get("fingerprint"), fp["fingerprint"])
    else:
        from ..adapters import adapt

        if _matches(cal, metric, key, s, check_settings=True, default_size=adapt(pipe).default_size()):
            return Resolved(float(cal[metric][key]), f"{beside}")
    return None


def _cached(path: str, pipe: Any, metric: str, key: str) -> Any:
    """The cached calibration at `path`, or None (with a warning naming the file: it is then
    recomputed and overwritten) when it does not parse as valid thresholds or is for other weights."""
    cal = _read_json(path)
    if cal is None:
        return None
    why = _problem(cal, metric, key)
    if why is None and "weights" in cal and not same_weights(cal["weights"], weights_fingerprint(pipe)):
        why = "calibrated for other weights"
    if why:
        log.warning("ignoring the cached calibration %s: %s; recalibrating", path, why)
        return None
    return cal


def _remember(path: str, cal: dict) -> None:
    """Keep `cal` in the bounded in-memory table (least recently used out first)."""
    _MEMO.pop(path, None)
    _MEMO[path] = cal
    while len(_MEMO) > MAX_MEMO:
        _MEMO.pop(next(iter(_MEMO)))


def _prune(folder: str) -> None:
    """Remove the oldest cache files beyond MAX_CACHE_FILES (best effort: another process may race)."""
    try:
        files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".json")]
        files.sort(key=lambda f: os.path.getmtime(f))
        for f in files[:max(0, len(files) - MAX_CACHE_FILES)]:
            os.remove(f)
    except OSError:
        pass


def resolve(pipe: Any, metric: str = "sharpness", key: str = "threshold", *, calibrate: bool = True,
            progress: bool = True, **settings: Any) -> Resolved:
    """The value of `key` ("threshold" or "target") of `metric` for this model, from the first of:
    calibration.json beside the model, the per-user cache, a calibration made now on the built-in
    prompts (then cached). settings: num_images_per_prompt, num_inference_steps, guidance_scale,
    fpr (defaults DEFAULTS) must match what the calibration was made with."""
    from ..errors import MissingCalibration

    s = _settings(pipe, **settings)
    fp = weights_fingerprint(pipe)
    found = _from_beside(pipe, fp, metric, key, s)  # 1. beside the model
    if found is not None:
        return found
    # 2. the cache, 3. calibrate now
    path = cache_path(fp, **s)
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(path, threading.Lock())
    with lock:  # one calibration per model and settings, whatever the number of threads asking
        cal = _MEMO.get(path)
        if cal is None and os.path.isfile(path):
            cal = _cached(path, pipe, metric, key)
        if cal is not None and _matches(cal, metric, key, s, check_settings=False):
            _remember(path, cal)
            where = f"cache {path}" if os.path.isfile(path) else "calibrated earlier in this process (not cached)"
            return Resolved(float(cal[metric][key]), where)
        if not calibrate:
            raise MissingCalibration(f"no calibration of {metric} for this model (weights {fp['fingerprint']}); run "
                                     f"sharpfast calibrate, or pass a number")
        metrics = list(dict.fromkeys([*CALIBRATED_METRICS, metric]))
        kind = s.get("builtin", "full")
        count = len(generic_prompts(kind))
        per = 1 + sum(1 for m in metrics if m != "wen")  # CFG calls per batch: wen's + one per extra metric
        log.warning("no calibration for %s (weights %s) at %s: calibrating once on %d built-in generic captions "
                    "(%d batches x %d CFG calls of %d images; SHARPFAST_CALIBRATION=quick takes %d), cached at %s. "
                    "For thresholds that fit your traffic: sharpfast calibrate --model %s --prompts "
                    "your_normal_prompts.txt", model_name(pipe), fp["fingerprint"],
                    {k: s[k] for k in ("num_inference_steps", "num_images_per_prompt", "guidance_scale", "height",
                                       "width")}, count,
                    math.ceil(count / BATCH_SIZE), per, BATCH_SIZE * s["num_images_per_prompt"], QUICK, path,
                    getattr(pipe, "name_or_path", None) or "YOUR_MODEL_DIR")
        cal = calibrate_model(pipe, kind, num_images_per_prompt=s["num_images_per_prompt"], fpr=s["fpr"],
                              num_inference_steps=s["num_inference_steps"], guidance_scale=s["guidance_scale"],
                              seed=s["seed"], metrics=metrics, progress=progress, height=s["height"],
                              width=s["width"])
        _remember(path, cal)
        try:
            save(cal, path)
            _prune(cache_dir())
            where = f"calibrated now on the {cal['prompts']['source']}, cached at {path}"
        except OSError as err:  # a read-only home, a full disk: keep it for this process
            log.warning("could not cache the calibration at %s (%s); kept in memory for this process", path, err)
            where = f"calibrated now on the {cal['prompts']['source']} (not cached: {err})"
        return Resolved(float(cal[metric][key]), where)
