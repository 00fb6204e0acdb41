"""Detection quality (ROC AUC, TPR at low FPR) and threshold calibration, via scikit-learn."""
from __future__ import annotations

import numpy as np


def _array(x, name):
    a = np.asarray(x.cpu() if hasattr(x, "cpu") else x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has NaN or inf values")
    return a


def evaluate(scores, labels) -> dict:
    """ROC of `scores` (higher = memorized) against `labels` (1 / True = memorized).

    Returns auc, tpr_at_1pct_fpr, tpr_at_3pct_fpr (the largest TPR whose FPR does not exceed it)
    and the curve (fpr, tpr, thresholds as lists).
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    s = _array(scores, "scores")
    y = _array(labels, "labels")
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0/1 or booleans")
    if y.min() == y.max():
        raise ValueError("labels hold one class only: an ROC needs memorized and non-memorized prompts")
    fpr, tpr, thr = roc_curve(y, s)

    def tpr_at(limit):
        return float(tpr[fpr <= limit + 1e-12].max())

    return {"auc": float(roc_auc_score(y, s)), "tpr_at_1pct_fpr": tpr_at(0.01), "tpr_at_3pct_fpr": tpr_at(0.03),
            "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thr.tolist()},
            "positives": int(y.sum()), "negatives": int(y.size - y.sum())}


def calibrate(scores_of_normal_prompts, fpr: float = 0.01) -> float:
    """Threshold that flags at most a fraction `fpr` of normal prompts (flagged: score > threshold)."""
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    s = _array(scores_of_normal_prompts, "scores_of_normal_prompts")
    return float(np.quantile(s, 1.0 - fpr, method="higher"))
