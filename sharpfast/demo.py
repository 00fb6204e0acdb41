"""`sharpfast demo`: detection and mitigation on the bundled digits model, end to end, offline.

1. loads the bundled pipeline (a stock StableDiffusionPipeline) and its prompt sets;
2. scores every memorized and non-memorized prompt at the first sampling step (wen, sharpness;
   n=1, one CFG call plus one for the finite difference) and prints the AUC / TPR table;
3. flags prompts with the model's shipped threshold (1% FPR on held-out generic captions);
4. mitigates a few memorized prompts from the same initial noise and judges each output (copy of
   the training image? the prompted digit?);
5. writes OUT/results.jsonl (one line per prompt), OUT/roc.png and OUT/before_after.png.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

DEMO_METHODS = ("none", "wen_embedding", "sail", "transition", "sail+transition")
DEMO_PROMPTS = 6


def _mitigation_grid(pipe, recs, device, out_dir, say) -> None:
    """A few memorized prompts from the same noise under each demo method: copies and fidelity
    printed, OUT/before_after.png written."""
    from .harness.plots import image_grid
    from .mitigations import REGISTRY, mitigate
    from .score import ScoreModel
    from .zoo.copying import copy_stats
    from .zoo.digits_data import digit_images
    from .zoo.fidelity import fidelity

    train = digit_images()[0]
    shown = [r for r in recs if r["memorized"]][:DEMO_PROMPTS]
    model = ScoreModel(pipe)
    h, w = model.default_size()
    lat = model.noise_for_ids(range(len(shown)), 1, h, w, seed=0)
    say(f"\nmitigation of {len(shown)} memorized prompts from the same noise (copy = reproduces its training image):")
    say(f"{'method':14s} {'copies':>7s} {'right digit':>11s}")
    cols = {}
    for m in DEMO_METHODS:
        out = mitigate(pipe, [r["prompt"] for r in shown], m, REGISTRY[m].default, latents=lat.to(device),
                       output_type="pt")
        imgs = (out.images.float() * 2 - 1).cpu()
        copies = [bool(copy_stats(im[None], train, r["train_index"])[0][0]) for im, r in zip(imgs, shown)]
        fid = fidelity(imgs, [r["digit"] for r in shown])
        cols[m] = imgs
        say(f"{m:14s} {sum(copies):4d}/{len(shown):<2d} {int(fid.sum()):8d}/{len(shown):<2d}")
    rows = [[train[r["train_index"]].numpy()] + [cols[m][k].numpy() for m in DEMO_METHODS] for k, r in enumerate(shown)]
    image_grid(rows, [r["prompt"][:48] for r in shown], ["training image", *DEMO_METHODS],
               os.path.join(out_dir, "before_after.png"), "same prompt, same initial noise")


def run(out_dir: str = "sharpfast-demo", device: str = "cpu", progress: bool = True, stream=None) -> int:
    """The demo: score the bundled model's prompt sets, mitigate a few, write OUT; returns 0."""
    import sharpfast

    from . import zoo
    from .calibration import shipped_threshold
    from .harness.plots import roc_figure

    say = (lambda *a: print(*a, file=stream, flush=True)) if stream else (lambda *a: None)
    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    pipe = zoo.load("digits", device=device)
    pipe.set_progress_bar_config(disable=True)
    recs = zoo.prompts("digits", "eval")
    say(f"digits model: {len(recs)} prompts ({sum(r['memorized'] for r in recs)} memorized), device {device}")

    res = sharpfast.detect(pipe, [r["prompt"] for r in recs], metrics=("wen", "sharpness"), batch_size=32,
                           generator=torch.Generator("cpu").manual_seed(42), progress=progress)
    labels = np.array([r["memorized"] for r in recs], dtype=int)
    say(f"\n{'metric':10s} {'AUC':>6s} {'TPR@1%FPR':>10s}   (step 1, n=1)")
    curves, thresholds = {}, {}
    for m in ("wen", "sharpness"):
        e = sharpfast.evaluate(res.scores[m], labels)
        curves[m] = (np.array(e["roc"]["fpr"]), np.array(e["roc"]["tpr"]), e["auc"])
        thresholds[m] = shipped_threshold(pipe, m)  # 1% FPR on generic captions kept apart
        say(f"{m:10s} {e['auc']:6.3f} {e['tpr_at_1pct_fpr']:10.3f}")
    roc_figure({"digits model, step 1, n=1": curves}, os.path.join(out_dir, "roc.png"))
    flagged = res.scores["sharpness"] > thresholds["sharpness"]
    say(f"shipped threshold (sharpness, 1% FPR on held-out generic captions): {thresholds['sharpness']:.4g}; flagged "
        f"{int(flagged[labels == 1].sum())}/{int(labels.sum())} memorized, "
        f"{int(flagged[labels == 0].sum())}/{int((labels == 0).sum())} non-memorized")
    with open(os.path.join(out_dir, "results.jsonl"), "w", encoding="utf-8") as f:
        for r, rec, fl in zip(recs, res.to_records(), flagged.tolist()):
            f.write(json.dumps({**rec, "memorized": r["memorized"], "duplicates": r["duplicates"],
                                "copy_rate": r["copy_rate"], "flagged": fl}) + "\n")

    _mitigation_grid(pipe, recs, device, out_dir, say)
    say(f"\nwrote {out_dir}/results.jsonl, {out_dir}/roc.png, {out_dir}/before_after.png "
        f"in {time.time() - t0:.0f} s")
    return 0
