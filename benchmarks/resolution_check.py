"""Calibration per resolution on the digits model (issue: other resolutions were misjudged).

For each image size, the guard's metric (wen_low, its default) is calibrated at that size on the
built-in generic captions (threshold="auto", 1% FPR), then the digits model's 100 normal and 51
memorized evaluation prompts are scored at that size with the noise `eval detect` draws; the share
flagged is reported against the size's own threshold and against the 16x16 one (what the server
used for every size before). The calibration captions are not evaluation prompts.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/resolution_check.py [--sizes 16,32,64] [--quick]
"""
import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16,32,64")
    ap.add_argument("--quick", action="store_true", help="calibrate on 64 built-in captions instead of 320")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "resolution_check.json"))
    a = ap.parse_args(argv)
    os.environ.setdefault("SHARPFAST_CACHE", tempfile.mkdtemp(prefix="sharpfast-res-"))
    if a.quick:
        os.environ["SHARPFAST_CALIBRATION"] = "quick"
    import numpy as np

    import sharpfast
    from sharpfast import calibration, zoo
    from sharpfast.adapters import ScoreModel

    pipe = zoo.load("digits")
    pipe.set_progress_bar_config(disable=True)
    model = ScoreModel(pipe)
    recs = zoo.prompts("digits", "eval")
    labels = np.array([r["memorized"] for r in recs], dtype=bool)
    rows, base = [], None
    for side in [int(s) for s in a.sizes.split(",")]:
        t = time.perf_counter()
        thr = calibration.resolve(pipe, "wen_low", "threshold", height=side, width=side, progress=False).value
        cal_s = time.perf_counter() - t
        lat = model.noise_for_ids(range(len(recs)), 1, side, side, seed=42)
        res = sharpfast.detect(model, [r["prompt"] for r in recs], metrics=("wen_low",), latents=lat, height=side,
                               width=side, batch_size=16, progress=False)
        s = res.scores["wen_low"].numpy()
        base = thr if base is None else base
        rows.append({"size": f"{side}x{side}", "threshold": thr, "calibration_s": round(cal_s, 1),
                     "normal_flagged": float((s[~labels] > thr).mean()),
                     "memorized_flagged": float((s[labels] > thr).mean()),
                     "normal_flagged_at_16x16_threshold": float((s[~labels] > base).mean()),
                     "memorized_flagged_at_16x16_threshold": float((s[labels] > base).mean())})
        print(json.dumps(rows[-1]), flush=True)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump({"calibration": "quick (64 captions)" if a.quick else "full (320 captions)", "rows": rows}, f,
                  indent=1)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
