"""Detection quality (ROC AUC, TPR at low FPR) and threshold calibration, via scikit-learn."""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import BadArgument


def _array(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x.cpu() if hasattr(x, "cpu") else x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise BadArgument(f"{name} is empty")
    if not np.isfinite(a).all():
        raise BadArgument(f"{name} has NaN or inf values")
    return a


def evaluate(scores: Any, labels: Any) -> dict:
    """ROC of `scores` (higher = memorized) against `labels` (1 / True = memorized).

    Returns auc, tpr_at_1pct_fpr, tpr_at_3pct_fpr (the largest TPR whose FPR does not exceed it)
    and the curve (fpr, tpr, thresholds as lists).
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    s = _array(scores, "scores")
    y = _array(labels, "labels")
    if s.shape != y.shape:
        raise BadArgument(f"scores ({s.size}) and labels ({y.size}) differ in length")
    if not np.isin(y, (0, 1)).all():
        raise BadArgument("labels must be 0/1 or booleans")
    if y.min() == y.max():
        raise BadArgument("labels hold one class only: an ROC needs memorized and non-memorized prompts")
    fpr, tpr, thr = roc_curve(y, s)

    def tpr_at(limit: float) -> float:
        return float(tpr[fpr <= limit + 1e-12].max())

    return {"auc": float(roc_auc_score(y, s)), "tpr_at_1pct_fpr": tpr_at(0.01), "tpr_at_3pct_fpr": tpr_at(0.03),
            "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thr.tolist()},
            "positives": int(y.sum()), "negatives": int(y.size - y.sum())}


def calibrate(scores_of_normal_prompts, fpr: float = 0.01) -> float:
    """Threshold that flags at most a fraction `fpr` of normal prompts (flagged: score > threshold)."""
    if not 0 < fpr < 1:
        raise BadArgument(f"fpr must be in (0, 1), got {fpr}")
    s = _array(scores_of_normal_prompts, "scores_of_normal_prompts")
    return float(np.quantile(s, 1.0 - fpr, method="higher"))


class CombinedDetector:
    """A calibrated combination of per-metric scores: each metric is standardized by the normal
    prompts' median and robust scale (1.4826 x the median absolute deviation) of its log score,
    and the combined score is the mean of those z-scores (higher = more memorized).

    Fitted on prompts that are not memorized only (a model's calibration prompts), so it never
    sees the prompts it is scored on, and needs no memorized examples:

        det = CombinedDetector(("wen", "wen_low")).fit(detect(pipe, normal_prompts).scores)
        combined = det.score(detect(pipe, prompts).scores)
    Log scores: the norms it combines are positive and their spread grows with their size; a
    metric that can be negative (anisotropy, attn_entropy) is standardized as it is.
    """

    def __init__(self, metrics: Any) -> None:
        self.metrics = tuple(metrics)
        if len(self.metrics) < 1:
            raise BadArgument("CombinedDetector needs at least one metric")
        self.center: dict[str, float] = {}
        self.scale: dict[str, float] = {}
        self.log: dict[str, bool] = {}

    def _values(self, scores: Any, m, fitting: bool = False) -> Any:
        v = _array(scores[m], f"scores[{m!r}]")
        if fitting:
            self.log[m] = bool((v > 0).all())
        return np.log(np.maximum(v, 1e-30)) if self.log[m] else v

    def fit(self, normal_scores: dict) -> CombinedDetector:
        """Fit each member's median and MAD on normal prompts' scores; returns self."""
        for m in self.metrics:
            v = self._values(normal_scores, m, fitting=True)
            if v.size < 10:
                raise BadArgument(f"fitting needs at least 10 normal prompts, got {v.size}")
            med = float(np.median(v))
            mad = float(np.median(np.abs(v - med))) * 1.4826
            self.center[m], self.scale[m] = med, mad if mad > 0 else float(v.std()) or 1.0
        return self

    def score(self, scores: dict) -> np.ndarray:
        """The combined score: the maximum of the members' robust z-scores."""
        if not self.center:
            raise BadArgument("fit the CombinedDetector on normal prompts first")
        z = [(self._values(scores, m) - self.center[m]) / self.scale[m] for m in self.metrics]
        return np.mean(z, axis=0)

    @property
    def name(self) -> str:
        """The detector's name, its members joined by '+'."""
        return "combined(" + "+".join(self.metrics) + ")"

    def to_dict(self) -> dict:
        """The fitted detector as a JSON-able dict."""
        return {"metrics": list(self.metrics), "center": self.center, "scale": self.scale, "log": self.log}

    @classmethod
    def from_dict(cls, d: dict) -> CombinedDetector:
        """A detector from to_dict's output."""
        det = cls(d["metrics"])
        det.center, det.scale, det.log = dict(d["center"]), dict(d["scale"]), dict(d["log"])
        return det
