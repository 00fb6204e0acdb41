"""Does a combined detector see template memorization without losing the verbatim kind? (issue 32, item 2)

On the scenes model, step 1, one image per prompt (seed 42): wen_low alone, attn_entropy alone,
trace_delta alone, and the CombinedDetector (z-scores fitted on the 200 calibration captions only)
of wen_low with each. For each: AUC of the verbatim-memorized captions (82) and of the template
captions (18) against the non-memorized ones (100), and the share flagged at the calibration
captions' 1% cut (what a guard's 1% gate would flag).

    python benchmarks/scenes_combined_detectors.py      # about a minute on 2 cores
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

import sharpfast
from sharpfast import zoo
from sharpfast.roc import CombinedDetector, calibrate, evaluate

METRICS = ("wen_low", "attn_entropy", "trace_delta")
COMBOS = (("wen_low",), ("attn_entropy",), ("trace_delta",), ("wen_low", "attn_entropy"), ("wen_low", "trace_delta"))
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scenes_combined_detectors.json")


def scores() -> dict:
    """{set: {metric: per-prompt scores}} of the four scenes prompt sets."""
    pipe = zoo.load("scenes")
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for k in ("memorized", "non_memorized", "template", "calibration"):
        prompts = [r["prompt"] for r in zoo.prompts("scenes", k)]
        res = sharpfast.detect(pipe, prompts, metrics=METRICS, generator=torch.Generator().manual_seed(42),
                               batch_size=32, progress=True)
        out[k] = {m: res.scores[m].numpy() for m in METRICS}
    return out


def table(sc: dict) -> dict:
    """One row per detector: AUC and the share flagged at the calibration captions' 1% cut."""
    out = {}
    for combo in COMBOS:
        det = CombinedDetector(combo).fit({m: sc["calibration"][m] for m in combo})
        s = {k: np.asarray(det.score({m: sc[k][m] for m in combo})) for k in sc}
        cut = calibrate(torch.tensor(s["calibration"]), fpr=0.01)
        row: dict = {}
        for pos in ("memorized", "template"):
            y = np.r_[np.ones(len(s[pos])), np.zeros(len(s["non_memorized"]))]
            e = evaluate(np.r_[s[pos], s["non_memorized"]], y)
            row[pos] = {"auc": round(e["auc"], 3), "flagged_at_1pct_cut": round(float((s[pos] > cut).mean()), 3)}
        row["non_memorized_flagged_at_1pct_cut"] = round(float((s["non_memorized"] > cut).mean()), 3)
        out["+".join(combo)] = row
    return out


if __name__ == "__main__":
    rows = table(scores())
    for name, r in rows.items():
        print(f"{name:24s} verbatim AUC {r['memorized']['auc']:.3f} flagged {r['memorized']['flagged_at_1pct_cut']:.3f}"
              f" | template AUC {r['template']['auc']:.3f} flagged {r['template']['flagged_at_1pct_cut']:.3f}"
              f" | normal flagged {r['non_memorized_flagged_at_1pct_cut']:.3f}")
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump({"what": __doc__.splitlines()[0], "detectors": rows}, f, indent=1)
    print(f"wrote {OUT}")
