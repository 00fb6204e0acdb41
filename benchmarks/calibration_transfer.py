"""What a user loses by not calibrating on their own data: on the bundled digits model, the
thresholds of `sharpfast calibrate` with the built-in generic captions against the shipped
calibration (generic digit captions of the model's own kind), judged on the evaluation sets:
false-positive rate on the 100 non-memorized prompts, TPR on the 51 memorized.

    .venv/bin/python benchmarks/calibration_transfer.py        # ~1 minute on CPU
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main() -> dict:
    import sharpfast
    from sharpfast import calibration, zoo

    pipe = zoo.load("digits")
    pipe.set_progress_bar_config(disable=True)
    recs = zoo.prompts("digits", "eval")
    labels = np.array([r["memorized"] for r in recs], dtype=bool)
    # the evaluation's scores (the demo's noise: one generator, seed 42)
    res = sharpfast.detect(pipe, [r["prompt"] for r in recs], metrics=("wen", "sharpness"), batch_size=32,
                           generator=torch.Generator().manual_seed(42), progress=False)
    shipped = json.load(open(os.path.join(zoo.path("digits"), calibration.CALIBRATION_FILE)))
    generic = calibration.calibrate_model(pipe, None, progress=False)
    out = {}
    print(
        f"{'metric':10s} {'calibration':34s} {'threshold':>10s} {'FPR (100 normal)':>17s} {'TPR (51 memorized)':>19s}"
    )
    for m in ("wen", "sharpness"):
        s = res.scores[m].numpy()
        for name, cal in (("shipped (digit captions, 148)", shipped), ("built-in generic captions (320)", generic)):
            thr = cal[m]["threshold"]
            fpr, tpr = float((s[~labels] > thr).mean()), float((s[labels] > thr).mean())
            out[f"{m}/{name}"] = {"threshold": thr, "fpr": fpr, "tpr": tpr}
            print(f"{m:10s} {name:34s} {thr:10.4g} {fpr:17.2f} {tpr:19.2f}")
    print("generic captions' median score / shipped threshold:",
          {m: round(generic[m]["median"] / shipped[m]["threshold"], 3) for m in ("wen", "sharpness")})
    return out


if __name__ == "__main__":
    main()
