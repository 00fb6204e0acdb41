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
from .settings import BATCH_SIZE, FPR, Settings

log = logging.getLogger("sharpfast.calibration")

CALIBRATION_FILE = "calibration.json"
TARGET_ABOVE = 0.9  # SAIL's target: the sharpness 90% of normal prompts' images lie above
CALIBRATED_METRICS = (
    "wen",
    "sharpness",
    "wen_low",
)  # calibrated together: the detectors, SAIL's target and the guard's default metric
# num_inference_steps and guidance_scale default to the pipeline's own (sharpfast.settings)
DEFAULTS = {"num_images_per_prompt": 1, "num_inference_steps": None, "guidance_scale": None, "fpr": FPR,
            "seed": 0, "height": None, "width": None}
MAX_MEMO = 64  # calibrations kept in memory per process (the least recently used go first)
MAX_CACHE_FILES = 256  # files in the per-user cache (the oldest are removed beyond it)
GENERIC_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "generic_prompts.txt")
_SAMPLE = 16  # weight elements read per parameter for the fingerprint


QUICK = 64  # built-in captions of a quick calibration (SHARPFAST_CALIBRATION=quick): a first try


def generic_prompts(kind: str = "full") -> list[str]:
    """The built-in everyday captions (see sharpfast/data/make_generic_prompts.py for how they were
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


def model_name(pipe) -> str:
    """How messages name the model: its directory, else its pipeline class."""
    return str(getattr(pipe, "name_or_path", "") or type(pipe).__name__)


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

def _prompt_set(prompts) -> tuple:
    """(prompts, their source) of calibrate_model's `prompts` argument."""
    if prompts is None or isinstance(prompts, str) and prompts in ("full", "quick"):
        kind = prompts or "full"
        return generic_prompts(kind), "built-in generic captions" + (" (quick)" if kind == "quick" else "")
    return validate.prompts(prompts, "prompts"), "given prompts"


def _scores(pipe, prompts, metrics, st, seed, batch_size, progress) -> tuple:
    """detect's scores of the calibration prompts a batch at a time, under a bar named for the
    model, with the time the rest will take logged after the first batch; (scores, UNet calls, rows)."""
    import time

    from .adapters import adapt
    from .detection import detect
    from .progress import bar as progress_bar

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


def _record(pipe, prompts, source, st, fpr, seed, calls, rows) -> dict:
    """What a calibration records besides its values: version, weights, settings, prompts, cost."""
    from . import __version__

    return {"sharpfast_version": __version__, "pipeline": type(pipe).__name__, "weights": weights_fingerprint(pipe),
            "settings": {"num_images_per_prompt": st.num_images_per_prompt, "num_inference_steps":
                         st.num_inference_steps, "guidance_scale": float(st.guidance_scale), "fpr": fpr, "seed": seed,
                         "steps": 1, "height": st.height, "width": st.width},
            "prompts": {"source": source, "count": len(prompts),
                        "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]},
            "unet_calls": calls, "unet_rows": rows}


def calibrate_model(pipe, prompts=None, *, num_images_per_prompt: int = 1, fpr: float = FPR,
                    num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None, seed: int = 0,
                    metrics=CALIBRATED_METRICS, batch_size: int = BATCH_SIZE, progress: bool = True,
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
    from .roc import calibrate
    from .scores import METRICS

    prompts, source = _prompt_set(prompts)
    if len(prompts) < 20:
        raise BadArgument(f"calibrating needs at least 20 normal prompts (a 1% threshold of fewer is their "
                          f"maximum), got {len(prompts)}")
    fpr = validate.finite(fpr, "fpr", above=0)
    if not fpr < 1:
        raise BadArgument(f"fpr must be in (0, 1), got {fpr}")
    metrics = list(validate.metrics(metrics, METRICS))
    st = Settings.resolve(pipe, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          num_images_per_prompt=num_images_per_prompt, height=height, width=width)
    validate.integer(batch_size, "batch_size")
    scores, calls, rows = _scores(pipe, prompts, metrics, st, seed, batch_size, progress)
    cal = _record(pipe, prompts, source, st, fpr, seed, calls, rows)
    for m in metrics:
        s = scores[m]
        if not bool(torch.isfinite(s).all()):
            from .errors import NonFiniteOutput

            raise NonFiniteOutput(f"calibration: the {m} score of a normal prompt is not finite")
        cal[m] = {"threshold": calibrate(s, fpr=fpr), "fpr": fpr, "prompts": len(prompts),
                  "num_images_per_prompt": st.num_images_per_prompt, "steps": 1,
                  "num_inference_steps": st.num_inference_steps, "median": float(s.median())}
    if "sharpness" in cal:
        cal["sharpness"]["target"] = calibrate(scores["sharpness"], fpr=TARGET_ABOVE)
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
    if settings.get("builtin", "full") != "full":
        s["builtin"] = settings["builtin"]
    key = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join(cache_dir(), f"{fingerprint['fingerprint']}-{key}.json")


_MEMO: dict = {}
_LOCKS: dict = {}
_LOCKS_GUARD = threading.Lock()


def _settings(pipe, **kw) -> dict:
    """The calibration settings of a call: DEFAULTS, steps and guidance from the pipeline."""
    st = Settings.resolve(pipe, num_inference_steps=kw.get("num_inference_steps"),
                          guidance_scale=kw.get("guidance_scale"), height=kw.get("height"), width=kw.get("width"))
    s = {**DEFAULTS, **{k: v for k, v in kw.items() if v is not None}}
    s["num_inference_steps"], s["guidance_scale"] = st.num_inference_steps, float(st.guidance_scale)
    s["height"], s["width"] = st.height, st.width
    if builtin_kind() != "full":  # a quick calibration is cached apart from the full one
        s["builtin"] = builtin_kind()
    return s


def _value(cal, metric: str, key: str) -> Optional[float]:
    """The calibrated value, or None where the file does not hold a valid one (not a JSON object,
    a missing entry, a value that is not a finite number: NaN would flag nothing, -inf everything)."""
    entry = cal.get(metric) if isinstance(cal, dict) else None
    v = entry.get(key) if isinstance(entry, dict) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _problem(cal, metric: str, key: str) -> Optional[str]:
    """Why a calibration file cannot be used for `metric`/`key` (None: it can)."""
    if not isinstance(cal, dict):
        return f"it holds a JSON {type(cal).__name__}, not an object"
    if "weights" in cal and not isinstance(cal["weights"], dict):
        return "its 'weights' is not an object"
    if "settings" in cal and not isinstance(cal["settings"], dict):
        return "its 'settings' is not an object"
    if metric in cal and key in (cal[metric] if isinstance(cal[metric], dict) else {}) \
            and _value(cal, metric, key) is None:
        return f"its {metric} {key} is {cal[metric][key]!r}, not a finite number"
    return None


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


def _read_json(path: str):
    """A JSON file's content, or None with a warning naming the file when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as err:
        log.warning("ignoring the calibration file %s: %s", path, err)
        return None


def _from_beside(pipe, fp, metric, key, s) -> Optional[Resolved]:
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
        from .adapters import adapt

        if _matches(cal, metric, key, s, check_settings=True, default_size=adapt(pipe).default_size()):
            return Resolved(float(cal[metric][key]), f"{beside}")
    return None


def _cached(path: str, pipe, metric: str, key: str):
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


def resolve(pipe, metric: str = "sharpness", key: str = "threshold", *, calibrate: bool = True, progress: bool = True,
            **settings) -> Resolved:
    """The value of `key` ("threshold" or "target") of `metric` for this model, from the first of:
    calibration.json beside the model, the per-user cache, a calibration made now on the built-in
    prompts (then cached). settings: num_images_per_prompt, num_inference_steps, guidance_scale,
    fpr (defaults DEFAULTS) must match what the calibration was made with."""
    from .errors import MissingCalibration

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
