"""Redraw the docs' mitigation frontiers from their recorded runs with the current figure code,
without rerunning them:

    .venv/bin/python benchmarks/redraw_figures.py            # docs/digits_frontier.png, docs/digits_tradeoff.png

- docs/digits_frontier.png: benchmarks/results/digits_frontier_halfA.json (`sharpfast eval mitigate
  --model digits --half A --seeds 2 --sweep --method none,transition,attention_rescale,sail,
  sail+transition,sail_guard`: the summary rows of its mitigate.json);
- docs/digits_tradeoff.png: benchmarks/results/digits_sail_sweep_halfA.json (the same with
  --method none,sail,wen_embedding,random_tokens,sail_alpha).
Copies at the one cut (sharpfast.zoo.copying.COPY_CUT); methods no longer in the registry are left out.
"""
import json
import os
import sys

from sharpfast.harness.plots import tradeoff_figure
from sharpfast.mitigations import REGISTRY
from sharpfast.zoo.copying import COPY_CUT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def series_of(rows: list) -> dict:
    """{method: [(fidelity, copies at COPY_CUT, setting, CFG calls per image)]} of summary rows."""
    out: dict = {}
    for r in rows:
        if r["method"] in REGISTRY:
            out.setdefault(r["method"], []).append((r["fidelity"], r["copy_rate_at"][str(COPY_CUT)], r["setting"],
                                                    r["unet_calls_per_image"]))
    return out


def main(argv=None) -> int:
    out_dir = (argv or sys.argv[1:] or [os.path.join(ROOT, "docs")])[0]
    figures = [("digits_frontier_halfA.json", "digits_frontier.png", ("transition", "s0t450"), None,
                "digits model, half A (26 memorized prompts x 2 seeds): every setting of the trajectory and noise "
                "methods; lower right is better"),
               ("digits_sail_sweep_halfA.json", "digits_tradeoff.png", ("sail", "k1s3"), 0.9,
                "digits model, half A (26 memorized prompts x 2 seeds): SAIL against the paper's norm term and the "
                "prompt-side baselines; lower right is better")]
    for src, png, chosen, zoom, title in figures:
        path = os.path.join(RESULTS, src)
        if not os.path.exists(path):
            print(f"skipped {png}: {path} is not recorded")
            continue
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        out = os.path.join(out_dir, png)
        tradeoff_figure(series_of(rows), out, title, chosen=chosen, fidelity_floor=0.95, zoom=zoom)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
