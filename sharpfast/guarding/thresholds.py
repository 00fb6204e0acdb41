"""The guard's thresholds per request setting (num_inference_steps, guidance_scale, height, width)."""
from __future__ import annotations

import logging
import threading
from typing import Any, Optional

from .. import validate
from ..errors import NotCalibrated

log = logging.getLogger("sharpfast.guard")


class Thresholds:
    """The threshold at a request's (num_inference_steps, guidance_scale, height, width): the given
    number, or for "auto" the model's calibration at that setting, resolved once each, when first
    needed (the first timestep, the guidance and the latent's size change the scores' scale; see
    sharpfast.calibration). With calibrate_new=False only settings resolved before (calibrate())
    are served: another raises NotCalibrated instead of calibrating inside a request."""

    def __init__(self, pipe: Any, metric: str, given, defaults: dict, default_size: tuple,
                 calibrate_new: bool = True) -> None:
        self.pipe, self.metric, self.given, self.defaults = pipe, metric, given, defaults
        self.default_size, self.calibrate_new = tuple(default_size), calibrate_new
        self.sources: dict = {}
        self._table: dict = {}
        self._lock = threading.Lock()

    def key(self, steps: Optional[int] = None, guidance=None, size: Any = None) -> tuple:
        """The table key of a request setting, the defaults filled in."""
        h, w = size or self.default_size
        return (int(steps or self.defaults["num_inference_steps"]),
                float(self.defaults["guidance_scale"] if guidance is None else guidance), int(h), int(w))

    def at(self, steps: Optional[int] = None, guidance=None, size: Any = None, *,
           allow_new: Optional[bool] = None, share: Optional[float] = None) -> float:
        """The threshold at a setting (resolved on first use where allowed): the cut above which
        `share` of the model's normal captions lie (None: the calibrated false-positive rate)."""
        if self.given != "auto" and share is None:
            return float(self.given)
        key = self.key(steps, guidance, size)
        from ..calibration.measure import gate_key

        cal_key = "threshold" if share is None else gate_key(share)
        with self._lock:
            if (*key, cal_key) not in self._table:
                if not (self.calibrate_new if allow_new is None else allow_new):
                    raise NotCalibrated(f"no calibrated threshold at {describe(key)}; this guard serves "
                                        f"{', '.join(describe(k) for k in self.settings_locked()) or 'no setting yet'}")
                from ..calibration import resolve

                found = resolve(self.pipe, self.metric, cal_key, num_inference_steps=key[0], guidance_scale=key[1],
                                height=key[2], width=key[3])
                value = validate.finite(found.value, f"the calibrated threshold ({found.source})", allow_inf=True)
                self._table[(*key, cal_key)] = value
                self.sources[(*key, cal_key)] = f"{found.source} ({describe(key)})"
                log.info("sharpfast.guard: %s %s %.4g at %s (%s)", self.metric, cal_key, value, describe(key),
                         found.source)
            return self._table[(*key, cal_key)]

    def source(self, steps: Optional[int] = None, guidance=None, size: Any = None, *,
               share: Optional[float] = None) -> str:
        """Where the threshold (or the cut of `share`, as `at` reads it) at a setting came from."""
        if self.given != "auto" and share is None:
            return "given"
        from ..calibration.measure import gate_key

        self.at(steps, guidance, size, share=share)
        return self.sources[(*self.key(steps, guidance, size), "threshold" if share is None else gate_key(share))]

    def size(self, height: Optional[int], width: Optional[int]) -> tuple:
        """(height, width) checked, the model's default filling a None."""
        dh, dw = self.default_size
        return (validate.integer(height or dh, "height"), validate.integer(width or dw, "width"))

    def settings(self) -> list:
        """The (steps, guidance, height, width) resolved so far."""
        with self._lock:
            return self.settings_locked()

    def settings_locked(self) -> list:
        """settings() with the lock held by the caller."""
        return list(dict.fromkeys(k[:4] for k in self._table))


def describe(key: tuple) -> str:
    """A setting key in words: '50 steps, guidance 7.5, 16x16'."""
    return f"{key[0]} steps, guidance {key[1]:g}, {key[2]}x{key[3]}"

