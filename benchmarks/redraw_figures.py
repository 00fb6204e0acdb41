"""Redraw the docs' mitigation frontiers from their recorded runs with the current figure code,
without rerunning them:

    .venv/bin/python benchmarks/redraw_figures.py            # docs/digits_frontier.png, docs/digits_tradeoff.png

- docs/digits_frontier.png: benchmarks/results/digits_frontier_halfA.json (`sharpfast eval mitigate
  --model digits --half A --seeds 2 --sweep --method none,transition,attention_rescale,sail,
  sail+transition,sail_guard`: the summary rows of its mitigate.json);
- docs/digits_tradeoff.png: benchmarks/results/digits_sail_sweep_halfA.json (the same with
  --method none,sail,wen_embedding,random_tokens,sail_alpha);
- docs/digits_guard_strength.png: benchmarks/results/digits_guard_frontier_halfA.json (`sharpfast
  eval guard --model digits --half A --seeds 4 --policy 0.01 --policy 0.01:s1t0 ...`: the guard at
  the 1% gate with each setting, its guard_frontier.json) and digits_guard_tiers_halfA.json (the
  same with per-prompt tiers, `--policy 0.01:s1.25t0,x3:s1t500g0.5 ...`) and
  digits_drop_trigger_frontier_halfA.json (the same with `--mitigation drop_trigger`), the
  calibrated policy ringed.
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


def guard_series(points: list) -> dict:
    """The guard's settings at one gate as a tradeoff series: memorized fidelity (guarded / plain)
    and copies per policy, plain pipe(...) as "none"."""
    from sharpfast.guarding import Policy
    from sharpfast.mitigations import REGISTRY as METHODS
    from sharpfast.settings import GUARD_MITIGATIONS

    base = dict(GUARD_MITIGATIONS)["transition"]
    out: dict = {"none": [(1.0, points[0]["summary"]["plain"]["copies_at_0.8"], None, 50.0)]}
    for p in points:
        pol = Policy.parse(p["policy"])
        name = p.get("mitigation", "transition")  # points before drop_trigger record none: transition
        own = base if name == "transition" else METHODS[name].default
        method, setting = (TIERS, pol.text()) if pol.tiers else (name, pol.setting or own)
        calls = 50.0 if name == "transition" else None  # drop_trigger's search grows with the prompt's words
        out.setdefault(method, []).append((p["summary"]["fidelity_ratio"], p["summary"]["guard"]["copies_at_0.8"],
                                           setting, calls))
    return out


TIERS = "transition, per-prompt tiers"  # the series of the tiered policies (labelled by their text)


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
    path = os.path.join(RESULTS, "digits_guard_frontier_halfA.json")
    if os.path.exists(path):
        from sharpfast import zoo
        from sharpfast.guarding import Policy

        points = []
        for name in ("digits_guard_frontier_halfA.json", "digits_guard_tiers_halfA.json",
                     "digits_drop_trigger_frontier_halfA.json"):
            if os.path.exists(os.path.join(RESULTS, name)):
                with open(os.path.join(RESULTS, name), encoding="utf-8") as f:
                    points += json.load(f)
        with open(os.path.join(zoo.path("digits"), "calibration.json"), encoding="utf-8") as f:
            entry = json.load(f)["policy"]
        pol = Policy.parse(entry["policy"])
        chosen = (TIERS, pol.text()) if pol.tiers else (entry.get("mitigation", "transition"), pol.setting)
        out = os.path.join(out_dir, "digits_guard_strength.png")
        normal = [p["summary"]["normal"] for p in points]
        fid = sorted({round(n["fidelity_ratio"], 3) for n in normal})
        mitigated = sorted({round(n["mitigated"], 3) for n in normal})
        tradeoff_figure(guard_series(points), out,
                        "digits model, half A (26 memorized prompts x 4 seeds) through sharpfast.guard at the 1% gate, "
                        "one point per mitigation and setting of the gate, or per policy with a stronger setting above "
                        "a multiple of the gate's margin (x: memorized prompts' fidelity, guarded / plain); the "
                        "calibrated policy ringed, the 0.95 budget dotted. Normal prompts (50 x 4, "
                        f"{'/'.join(f'{m:.1%}' for m in mitigated)} mitigated): fidelity guarded / plain "
                        f"{'-'.join(f'{f:.3f}' for f in fid)} at every setting", chosen=chosen,
                        fidelity_floor=0.95)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
