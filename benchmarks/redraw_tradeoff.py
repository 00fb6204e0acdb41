"""Redraw docs/digits_tradeoff.png from the recorded sweep (benchmarks/results/digits_sweep_all.json,
the numbers of docs/mitigation.md's sweep table) with the current figure code, without rerunning
the sweep (about two hours on 2 cores):

    .venv/bin/python benchmarks/redraw_tradeoff.py
"""
import json
import os
import sys

from sharpfast.harness.plots import tradeoff_figure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    src = os.path.join(ROOT, "benchmarks", "results", "digits_sweep_all.json")
    out = (argv or sys.argv[1:] or [os.path.join(ROOT, "docs", "digits_tradeoff.png")])[0]
    with open(src, encoding="utf-8") as f:
        data = json.load(f)
    series = {m: [(p["fidelity"], p["copies"], p["setting"]) for p in pts] for m, pts in data["series"].items()}
    tradeoff_figure(series, out, "digits model: every setting of the sweep (51 memorized prompts x 5 seeds); lower "
                    "right is better", chosen=("sail", "k1s3lr0.7"), copy_cut=data["copy_cut"], zoom=0.95)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
