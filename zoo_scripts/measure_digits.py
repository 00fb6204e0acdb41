"""Measure how often each caption of the digits model copies a training image; write prompts.json.

    python -m zoo_scripts.measure_digits --model DIR [--seeds 10] [--seed 0]

Every duplicated caption, a set of in-distribution generic captions and a set of narrow captions
(naming only the digit) are generated from `--seeds` initial noises (DDIM, 50 steps, CFG 7.5, the
seeds 1000..1000+S-1, kept apart from the evaluation seeds). Labels follow Stable Diffusion's
memorized-prompt lists: a duplicated caption is "memorized" when it copies its own training image
on at least half the seeds; duplicated captions that copy less are the "duplicated_low" split.
For generic and narrow captions, copy_rate is the share of generations that copy ANY training
image (copying.py). The file records the seeds, threshold and per-level summary. Then the
detection thresholds at 1% FPR on 200 further generic captions go to calibration.json.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from sharpfast.calibration import TARGET_ABOVE as SAIL_TARGET_ABOVE  # one home: sharpfast.calibration
from sharpfast.zoo.copying import LABEL_CUT, copy_stats, generate, nearest
from sharpfast.zoo.digits_data import NAMES, build, calibration_prompts, generic_prompts, narrow_prompts  # noqa: F401

MEASURE_SEED0 = 1000
def measure(pipe, records: list[dict], train: torch.Tensor, seeds, batch_prompts: int = 16, progress=True):
    """Adds copy_rate and mean_similarity to each record (in place) and returns them."""
    from sharpfast.progress import bar as progress_bar

    bar = progress_bar(pipe, total=len(records), desc="copy rates", enabled=progress)
    for start in range(0, len(records), batch_prompts):
        chunk = records[start:start + batch_prompts]
        imgs = generate(pipe, [r["prompt"] for r in chunk], seeds).view(len(chunk), len(seeds), 1, *train.shape[2:])
        for r, im in zip(chunk, imgs):
            if r["train_index"] is not None:
                copies, sim = copy_stats(im, train, r["train_index"], LABEL_CUT)  # the labels' cut
            else:
                _, sim = nearest(im, train)
                copies = sim >= LABEL_CUT
            r["copy_rate"] = round(float(copies.double().mean()), 4)
            r["mean_similarity"] = round(float(sim.mean()), 4)
        bar.update(len(chunk))
    bar.close()
    return records


# the metrics of the shipped calibration.json: wen and sharpness (SAIL's target), and wen_low, the
# serving guard's default metric
# wen_low@n: the guard's metric with n probe noises (its knob, chosen on the A halves: docs/guard.md)
SHIPPED_METRICS = ("wen", "sharpness", "wen_low", "wen_low@2", "wen_low@4", "wen_low@8")


def calibrate(pipe, data, exclude: set, fpr: float = 0.01, per_digit: int = 20) -> dict:
    """Detection thresholds at `fpr` on generic captions kept apart from the evaluation sets
    (per image: n=1, step 1, DDIM 50, CFG 7.5), written to calibration.json for SAIL and guard,
    and SAIL's target (the sharpness under which only 10% of those images are)."""
    recs = [
        r for r in generic_prompts(data, per_digit=per_digit, seed=777) if r["prompt"] not in exclude
    ]  # = calibration_prompts()
    return calibration_from(pipe, [r["prompt"] for r in recs], "generic digit captions kept apart from the "
                                                              "evaluation sets", fpr=fpr)


def calibration_from(pipe, prompts: list[str], source: str, fpr: float = 0.01) -> dict:
    """The calibration.json of a zoo model: thresholds at `fpr` of SHIPPED_METRICS on `prompts`
    (normal captions kept apart from every evaluation set; per image: n=1, step 1, DDIM 50, CFG
    7.5, seed 7) and SAIL's target (the sharpness under which only 10% of those images are)."""
    import sharpfast
    from sharpfast.calibration.measure import gate_cuts

    res = sharpfast.detect(pipe, prompts, metrics=SHIPPED_METRICS, batch_size=50,
                           generator=torch.Generator().manual_seed(7), progress=True)
    cal = {m: {"threshold": sharpfast.calibrate(res.scores[m], fpr=fpr), "fpr": fpr, "prompts": len(prompts),
               "num_images_per_prompt": 1, "steps": 1, "num_inference_steps": 50, "dtype": "float32",
               **gate_cuts(res.scores[m])}
           for m in SHIPPED_METRICS}
    # SAIL's stopping level: as flat as the flattest 10% of normal prompts' images
    cal["sharpness"]["target"] = sharpfast.calibrate(res.scores["sharpness"], fpr=SAIL_TARGET_ABOVE)
    cal["sharpness"]["target_above"] = SAIL_TARGET_ABOVE
    return {**calibration_record(pipe, len(prompts), source), **cal}


def calibration_record(pipe, count: int, source: str) -> dict:
    """What sharpfast.calibration records beside the thresholds: the weights they belong to and the settings."""
    from sharpfast import __version__
    from sharpfast.calibration import weights_fingerprint

    return {"sharpfast_version": __version__, "pipeline": type(pipe).__name__, "weights": weights_fingerprint(pipe),
            "settings": {"num_images_per_prompt": 1, "num_inference_steps": 50, "guidance_scale": 7.5, "fpr": 0.01,
                         "seed": 7, "steps": 1},
            "prompts": {"source": source, "count": count}}


def model_card(model_dir: str, doc: dict, cal: dict) -> str:
    """README.md of the model directory: how it was trained and what it memorizes."""
    info_path = os.path.join(model_dir, "train_info.json")
    info = json.load(open(info_path, encoding="utf-8")) if os.path.exists(info_path) else {}
    lines = ["# digits: a text-to-image pipeline that memorizes, for sharpfast", "",
             "A stock diffusers `StableDiffusionPipeline` (tiny UNet2DConditionModel, AutoencoderKL with 1-channel "
             "16x16 images and 4x8x8 latents, CLIP text encoder with a word-level vocabulary, DDIM) trained on "
             "scikit-learn's 1797 handwritten digits with LAION-style captions. Some images are duplicated with one "
             "caption of their own (2x to 32x): those captions make it copy the image.", "",
             "Trained by `python -m zoo_scripts.train_digits --out DIR` "
             + ", ".join(f"{k}={info[k]}" for k in ("seed", "vae_steps", "pretrain_steps", "unet_steps", "batch_size",
                                                    "tokenizer", "ema") if k in info)
             + (" (generic-only pretraining, then fine-tuning with the duplicated images)"
                if info.get("pretrain_steps") else "")
             + (f"; final UNet loss {info['final_unet_loss']:.4f}, {info['seconds'] / 60:.1f} minutes on "
                f"{info['threads']} CPU threads (torch {info['torch']})." if info else "."),
             "Measured by `python -m zoo_scripts.measure_digits --model DIR` "
             f"({len(doc['seeds'])} seeds, DDIM 50 steps, CFG 7.5; a copy: nearest training image is the duplicated "
             f"one with Pearson similarity >= {doc['copy_threshold']}).", "",
             "| set | prompts | copy rate |", "| --- | --- | --- |"]
    for k, v in doc["summary"]["duplicated_by_level"].items():
        lines.append(f"| duplicated {k} | {v['prompts']} | {v['copy_rate']:.2f} |")
    for k in ("memorized", "duplicated_low", "non_memorized", "narrow"):
        if k in doc["summary"]:
            v = doc["summary"][k]
            lines.append(f"| {k} | {v['prompts']} | {v['copy_rate']:.2f} |")
    lines += [
        "",
        "Detection thresholds at 1% FPR (calibration.json, step 1, n=1): "
        + ", ".join(f"{m} {c['threshold']:.4g}" for m, c in cal.items() if isinstance(c, dict) and "threshold" in c)
        + "."
        + (
            f" SAIL's target (sharpness under which {1 - cal['sharpness']['target_above']:.0%} of those images are): "
            f"{cal['sharpness']['target']:.4g}."
            if "target" in cal.get("sharpness", {})
            else ""
        ),
    ]
    return "\n".join(lines) + "\n"


def summarize(records: list[dict]) -> dict:
    def stats(rs):
        return {"prompts": len(rs), "copy_rate": round(float(np.mean([r["copy_rate"] for r in rs])), 4) if rs else None}

    levels = sorted({r["duplicates"] for r in records if r["duplicates"]})
    return {f"{lv}x": stats([r for r in records if r["duplicates"] == lv]) for lv in levels}


def measure_args(doc: str, name: str, argv=None):
    """(arguments, pipeline) of a measure script: --model, --seeds, --seed; the model loaded offline."""
    from diffusers import StableDiffusionPipeline

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", required=True, help=f"the trained {name} model directory; prompts.json goes there")
    p.add_argument("--seeds", type=int, default=10, help="generations per prompt (default 10)")
    p.add_argument("--seed", type=int, default=0, help="the data seed the model was trained with (default 0)")
    p.add_argument("--calibration-only", action="store_true",
                   help="rewrite calibration.json only (the model and its prompts.json unchanged)")
    a = p.parse_args(argv)
    pipe = StableDiffusionPipeline.from_pretrained(a.model, local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return a, pipe


def write_calibration(model: str, cal: dict) -> None:
    """calibration.json into the model directory (and printed). The guard policy chosen for these
    weights (its "policy" entry, made by zoo_scripts/choose_policy.py) is kept: a recalibration
    changes the thresholds, not what was chosen on half A."""
    from sharpfast.calibration import same_weights

    path = os.path.join(model, "calibration.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if "policy" in old and same_weights(old.get("weights", {}), cal["weights"]):
            cal = {**cal, "policy": old["policy"]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cal, f, indent=1)
    print(json.dumps({k: v for k, v in cal.items() if k != "weights"}, indent=1))


def main(argv=None):
    a, pipe = measure_args(__doc__, "digits", argv)
    data = build(seed=a.seed)
    if a.calibration_only:
        with open(os.path.join(a.model, "prompts.json"), encoding="utf-8") as f:
            splits = json.load(f)["splits"]
        write_calibration(a.model, calibrate(pipe, data, {r["prompt"] for k in ("non_memorized", "narrow")
                                                          for r in splits[k]}))
        return
    seeds = list(range(MEASURE_SEED0, MEASURE_SEED0 + a.seeds))
    dups = [dict(prompt=d.caption, memorized=None, digit=d.digit, train_index=d.train_index, duplicates=d.duplicates)
            for d in data.duplicates]
    generic, narrow = generic_prompts(data), narrow_prompts()
    measure(pipe, dups + generic + narrow, data.images, seeds)
    for r in dups:
        r["memorized"] = r["copy_rate"] >= 0.5
    splits = {"memorized": [r for r in dups if r["memorized"]], "non_memorized": generic,
              "duplicated_low": [r for r in dups if not r["memorized"]], "narrow": narrow}
    summary = {"duplicated_by_level": summarize(dups),
               **{k: {"prompts": len(v), "copy_rate": round(float(np.mean([r["copy_rate"] for r in v])), 4)}
                  for k, v in splits.items() if v}}
    doc = {"model": "digits", "data_seed": a.seed, "seeds": seeds, "copy_threshold": LABEL_CUT,
           "sampler": {"scheduler": "DDIM", "num_inference_steps": 50, "guidance_scale": 7.5},
           "memorized_rule": "duplicated caption that copies its own training image on >= 50% of seeds",
           "summary": summary, "splits": splits}
    with open(os.path.join(a.model, "prompts.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps(summary, indent=1))
    cal = calibrate(pipe, data, {r["prompt"] for r in generic + narrow})
    write_calibration(a.model, cal)
    with open(os.path.join(a.model, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(a.model, doc, cal))


if __name__ == "__main__":
    main()
