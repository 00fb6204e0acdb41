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
from typing import Any

import numpy as np

from .settings import DEFAULT_METRICS, GUARD_METRIC

DEMO_METHODS = ("none", "wen_embedding", "sail", "transition", "sail+transition")
DEMO_PROMPTS = 6


def _mitigation_grid(pipe: Any, recs: list, device: Any, out_dir: str, say, progress: bool) -> None:
    """A few memorized prompts from the same noise under each demo method: copies and fidelity
    printed, OUT/before_after.png written (each cell's similarity to the training image under it,
    copies framed red, near copies at similarity >= 0.8 orange)."""
    from .adapters import ScoreModel
    from .harness.plots import image_grid
    from .mitigations import REGISTRY, mitigate
    from .progress import bar
    from .zoo.copying import COPY_CUT, LABEL_CUT, copy_stats
    from .zoo.digits_data import digit_images
    from .zoo.fidelity import fidelity

    train = digit_images()[0]
    shown = [r for r in recs if r["memorized"]][:DEMO_PROMPTS]
    model = ScoreModel(pipe)
    h, w = model.default_size()
    lat = model.noise_for_ids(range(len(shown)), 1, h, w, seed=0)
    say(f"\nmitigation of {len(shown)} memorized prompts from the same noise (copy = its nearest training image is "
        f"the memorized one at similarity >= {COPY_CUT}; at >= {LABEL_CUT} beside it):")
    table = [f"{'method':16s} {'copies':>7s} {f'@{LABEL_CUT}':>7s} {'similarity':>10s} {'right digit':>11s}"]
    cols, notes = {}, {}
    with bar(None, total=len(DEMO_METHODS), desc="mitigating", unit="method", enabled=progress) as b:
        for m in DEMO_METHODS:
            out = mitigate(pipe, [r["prompt"] for r in shown], m, REGISTRY[m].default, latents=lat.to(device),
                           output_type="pt")
            imgs = (out.images.float() * 2 - 1).cpu()
            stats = [copy_stats(im[None], train, r["train_index"]) for im, r in zip(imgs, shown)]
            copies = [bool(c[0]) for c, _ in stats]
            sims = [float(v[0]) for _, v in stats]
            strict = sum(bool(c) and v >= LABEL_CUT for c, v in zip(copies, sims))
            fid = fidelity(imgs, [r["digit"] for r in shown])
            cols[m] = imgs
            notes[m] = [(v, "copy" if c else "near" if v >= COPY_CUT else None) for c, v in zip(copies, sims)]
            table.append(f"{m:16s} {sum(copies):4d}/{len(shown):<2d} {strict:4d}/{len(shown):<2d} "
                         f"{np.mean(sims):10.3f} "
                         f"{int(fid.sum()):8d}/{len(shown):<2d}")
            b.update(1)
    say("\n".join(table))
    rows = [[train[r["train_index"]].numpy()] + [cols[m][k].numpy() for m in DEMO_METHODS] for k, r in enumerate(shown)]
    cells = [[(None, None)] + [notes[m][k] for m in DEMO_METHODS] for k in range(len(shown))]
    image_grid(rows, [r["prompt"] for r in shown], ["training image", *DEMO_METHODS],
               os.path.join(out_dir, "before_after.png"),
               f"same prompt, same initial noise; under each output its similarity to the training image "
               f"(red frame: a copy: that training image is the nearest, similarity >= {COPY_CUT}; orange: "
               f"similarity >= {COPY_CUT} but another training image is nearer)", notes=cells,
               caption="similarity: Pearson correlation of the 16x16 pixels with the prompt's training image "
                       "(1: the same image up to brightness and contrast)")


def _detection(pipe: Any, recs: list, progress: bool, say) -> tuple:
    """Scores of the evaluation prompts with the noise `sharpfast eval detect` draws for them (seed
    42 + each prompt's id), so the table is the README's; prints it and returns (scores, curves)."""
    import sharpfast

    from .adapters import ScoreModel
    from .harness.detect_eval import PromptSets
    from .harness.prompt_sets import bundled_records

    model = ScoreModel(pipe)
    ix = PromptSets(bundled_records("digits"))
    ids = [ix.noise_ids[ix.index[r["prompt"]]] for r in recs]
    h, w = model.default_size()
    lat = model.noise_for_ids(ids, 1, h, w, seed=42)
    res = sharpfast.detect(model, [r["prompt"] for r in recs], metrics=DEFAULT_METRICS, latents=lat,
                           batch_size=16, progress=progress)
    labels = np.array([r["memorized"] for r in recs], dtype=int)
    say(f"\n{'metric':10s} {'AUC':>6s} {'TPR@1%FPR':>10s}   (step 1, n=1; the README's table)")
    curves = {}
    for m in DEFAULT_METRICS:
        e = sharpfast.evaluate(res.scores[m], labels)
        curves[m] = (np.array(e["roc"]["fpr"]), np.array(e["roc"]["tpr"]), e["auc"])
        say(f"{m:10s} {e['auc']:6.3f} {e['tpr_at_1pct_fpr']:10.3f}")
    return res, labels, curves


def run(out_dir: str = "sharpfast-demo", device: str = "cpu", progress: bool = True, stream=None) -> int:
    """The demo: score the bundled model's prompt sets, mitigate a few, write OUT; returns 0."""
    from . import zoo
    from .calibration import shipped_threshold
    from .harness.plots import roc_figure

    say = (lambda *a: print(*a, file=stream, flush=True)) if stream else (lambda *a: None)
    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    with zoo.quiet_loading():
        pipe = zoo.load("digits", device=device)
    recs = zoo.prompts("digits", "eval")
    say(f"digits model: {len(recs)} prompts ({sum(r['memorized'] for r in recs)} memorized), device {device}")
    res, labels, curves = _detection(pipe, recs, progress, say)
    roc_figure({"digits model, step 1, n=1": curves}, os.path.join(out_dir, "roc.png"),
               f"digits model: {int(labels.sum())} memorized vs {int((labels == 0).sum())} normal prompts")
    thr = shipped_threshold(pipe, GUARD_METRIC)  # 1% FPR on generic captions kept apart
    flagged = res.scores[GUARD_METRIC] > thr
    say(f"the guard's threshold ({GUARD_METRIC}, 1% FPR on held-out generic captions): {thr:.4g}; flagged "
        f"{int(flagged[labels == 1].sum())}/{int(labels.sum())} memorized, "
        f"{int(flagged[labels == 0].sum())}/{int((labels == 0).sum())} non-memorized")
    say("(TPR@1%FPR above puts the cut at 1% of THESE normal prompts, chosen on the set it is scored on; the "
        "shipped threshold was calibrated on other captions, as a deployment would be, so its rates differ)")
    with open(os.path.join(out_dir, "results.jsonl"), "w", encoding="utf-8") as f:
        for r, rec, fl in zip(recs, res.to_records(), flagged.tolist()):
            f.write(json.dumps({**rec, "memorized": r["memorized"], "duplicates": r["duplicates"],
                                "copy_rate": r["copy_rate"], "flagged": fl}) + "\n")
    pipe.set_progress_bar_config(disable=True)  # the mitigations' own sampling loops: one bar of ours instead
    _mitigation_grid(pipe, recs, device, out_dir, say, progress)
    say(f"\nwrote {out_dir}/results.jsonl, {out_dir}/roc.png, {out_dir}/before_after.png "
        f"in {time.time() - t0:.0f} s")
    return 0
