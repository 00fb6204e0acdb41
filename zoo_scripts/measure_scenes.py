"""Measure how often each caption of the scenes model copies a training scene; write prompts.json.

    python -m zoo_scripts.measure_scenes --model DIR [--seeds 10] [--seed 0]

As measure_digits.py, with the scenes judge (scenes_judge.py): every duplicated and template
caption, 100 in-distribution captions of new scenes and 36 narrow captions ("a small red
circle") are generated from `--seeds` noises (DDIM 50, CFG 7.5, seeds 1000.., kept apart from
the evaluation seeds). A duplicated caption is "memorized" when it copies its own scene on at
least half the seeds; a template caption's copy is a copy of any template scene. For the other
captions copy_rate is the share of generations that copy any fixed scene. 200 further captions
of new scenes make calibration.json (thresholds at 1% FPR) and are stored as the "calibration"
split. Writes prompts.json, calibration.json and the model card README.md into DIR.
"""
from __future__ import annotations

import json
import os

import numpy as np

from sharpfast.zoo.copying import LABEL_CUT, generate
from sharpfast.zoo.scenes_data import COLOURS, SHAPES, SIZES, build, caption, random_scene
from sharpfast.zoo.scenes_judge import ScenesJudge
from zoo_scripts.measure_digits import MEASURE_SEED0, calibration_from, measure_args, write_calibration

NON_MEMORIZED = 100
CALIBRATION = 200


CALIBRATION_SOURCE = "captions of new generic scenes kept apart from the evaluation sets"


def scene_prompts(n: int, seed: int, taken: set) -> list[dict]:
    """Captions of new generic scenes (never a fixed scene's caption), with their attributes."""
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    for _ in range(20 * n):  # bounded: repeats are rare
        s = random_scene(rng)
        c = caption(s, rng)
        if c not in taken:
            taken.add(c)
            out.append(dict(prompt=c, memorized=False, train_index=None, duplicates=0, kind="generic",
                            attributes=s.attributes()))
        if len(out) == n:
            break
    return out


def narrow_prompts() -> list[dict]:
    return [dict(prompt=f"a {size} {colour} {shape}", memorized=False, train_index=None, duplicates=0, kind="narrow",
                 attributes={"background": None, "objects": [[colour, shape]]})
            for size in SIZES for colour in COLOURS for shape in SHAPES]


def fixed_prompts(data) -> list[dict]:
    return [dict(prompt=f.caption, memorized=None, train_index=f.index, duplicates=f.duplicates, kind=f.kind,
                 attributes=f.scene.attributes()) for f in data.fixed]


def measure(pipe, judge: ScenesJudge, records: list[dict], seeds, batch_prompts: int = 16, progress=True):
    """Adds copy_rate, mean_similarity and fidelity to each record (in place) and returns them."""
    from sharpfast.progress import bar as progress_bar

    bar = progress_bar(pipe, total=len(records), desc="copy rates", enabled=progress)
    for start in range(0, len(records), batch_prompts):
        chunk = records[start:start + batch_prompts]
        imgs = generate(pipe, [r["prompt"] for r in chunk], seeds)
        imgs = imgs.view(len(chunk), len(seeds), *imgs.shape[1:])
        for r, im in zip(chunk, imgs):
            if r["train_index"] is not None:
                copies, sim = judge.copy_stats(im, r["train_index"], LABEL_CUT)  # the labels' cut
            else:
                copies, sim = judge.copies_any(im, LABEL_CUT)
            r["copy_rate"] = round(float(copies.double().mean()), 4)
            r["mean_similarity"] = round(float(sim.mean()), 4)
            r["fidelity"] = round(float(judge.fidelity(im, [r] * len(im)).mean()), 4)
        bar.update(len(chunk))
    bar.close()
    return records


def _stats(rs):
    return {"prompts": len(rs), "copy_rate": round(float(np.mean([r["copy_rate"] for r in rs])), 4),
            "fidelity": round(float(np.mean([r["fidelity"] for r in rs])), 4)}


def model_card(model_dir: str, doc: dict, cal: dict) -> str:
    """README.md of the model directory: how it was trained and what it memorizes."""
    info_path = os.path.join(model_dir, "train_info.json")
    info = json.load(open(info_path, encoding="utf-8")) if os.path.exists(info_path) else {}
    judge_path = os.path.join(model_dir, "judge", "judge_info.json")
    judge = json.load(open(judge_path, encoding="utf-8")) if os.path.exists(judge_path) else {}
    s = doc["summary"]
    lines = ["# scenes: an RGB text-to-image pipeline that memorizes, for sharpfast", "",
             "A stock diffusers `StableDiffusionPipeline` (tiny UNet2DConditionModel, AutoencoderKL with 32x32 RGB "
             "images and 4x8x8 latents, CLIP text encoder with a word-level vocabulary, DDIM) trained on rendered "
             "scenes (one or two coloured circles, squares or triangles of two sizes at five positions on six "
             "backgrounds) with compositional LAION-style captions. Some scenes are duplicated under one caption of "
             "their own (2x to 64x, verbatim memorization); a template group of 18 scenes shares one layout and one "
             "caption template with a varying badge (template memorization).", "",
             "Trained by `python -m zoo_scripts.train_scenes --out DIR` "
             + ", ".join(f"{k}={info[k]}" for k in ("seed", "vae_steps", "pretrain_steps", "unet_steps", "batch_size",
                                                    "ema") if k in info)
             + (f"; final UNet loss {info['final_unet_loss']:.4f}, {info['seconds'] / 60:.1f} minutes on "
                f"{info['threads']} CPU threads (torch {info['torch']})." if "seconds" in info else "."),
             "Measured by `python -m zoo_scripts.measure_scenes --model DIR` "
             f"({len(doc['seeds'])} seeds, DDIM 50 steps, CFG 7.5; a copy: the nearest fixed scene, by the "
             f"correlation of the RGB pixels (each channel centred) against the VAE's reconstruction of each, is "
             f"the caption's own "
             f"(any template scene for a template caption) with correlation >= {doc['copy_threshold']}; fidelity: "
             "the share of the caption's attributes an attribute classifier sees"
             + (f", held-out accuracy {judge['held_out']}" if judge else "") + ").", "",
             "| set | prompts | copy rate | fidelity |", "| --- | --- | --- | --- |"]
    for k, v in s["duplicated_by_level"].items():
        lines.append(f"| duplicated {k} | {v['prompts']} | {v['copy_rate']:.2f} | {v['fidelity']:.2f} |")
    for k in ("template", "memorized", "duplicated_low", "non_memorized", "narrow"):
        if k in s:
            v = s[k]
            lines.append(f"| {k} | {v['prompts']} | {v['copy_rate']:.2f} | {v['fidelity']:.2f} |")
    lines += ["", "Detection thresholds at 1% FPR (calibration.json, step 1, n=1): "
              + ", ".join(f"{m} {c['threshold']:.4g}" for m, c in cal.items()
                          if isinstance(c, dict) and "threshold" in c)
              + f". SAIL's target: {cal['sharpness']['target']:.4g}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    a, pipe = measure_args(__doc__, "scenes", argv)
    if a.calibration_only:
        with open(os.path.join(a.model, "prompts.json"), encoding="utf-8") as f:
            calibration = json.load(f)["splits"]["calibration"]
        write_calibration(a.model, calibration_from(pipe, [r["prompt"] for r in calibration], CALIBRATION_SOURCE))
        return
    data = build(seed=a.seed)
    judge = ScenesJudge(pipe, a.model, a.seed)
    seeds = list(range(MEASURE_SEED0, MEASURE_SEED0 + a.seeds))
    fixed = fixed_prompts(data)
    taken = {r["prompt"] for r in fixed}
    generic = scene_prompts(NON_MEMORIZED, 12345, taken)
    calibration = scene_prompts(CALIBRATION, 777, taken)  # `taken` keeps it apart from every other set
    narrow = narrow_prompts()
    measure(pipe, judge, fixed + generic + narrow, seeds)
    for r in fixed:
        r["memorized"] = r["copy_rate"] >= 0.5
    dups = [r for r in fixed if r["kind"] == "duplicated"]
    splits = {"memorized": [r for r in dups if r["memorized"]], "non_memorized": generic,
              "duplicated_low": [r for r in dups if not r["memorized"]], "narrow": narrow,
              "template": [r for r in fixed if r["kind"] == "template"], "calibration": calibration}
    levels = sorted({r["duplicates"] for r in dups})
    summary = {"duplicated_by_level": {f"{lv}x": _stats([r for r in dups if r["duplicates"] == lv]) for lv in levels},
               **{k: _stats(v) for k, v in splits.items() if v and k != "calibration"}}
    doc = {"model": "scenes", "data_seed": a.seed, "seeds": seeds, "copy_threshold": LABEL_CUT,
           "sampler": {"scheduler": "DDIM", "num_inference_steps": 50, "guidance_scale": 7.5},
           "memorized_rule": "duplicated caption that copies its own training scene on >= 50% of seeds",
           "summary": summary, "splits": splits}
    with open(os.path.join(a.model, "prompts.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps(summary, indent=1))
    cal = calibration_from(pipe, [r["prompt"] for r in calibration], CALIBRATION_SOURCE)
    write_calibration(a.model, cal)
    with open(os.path.join(a.model, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(a.model, doc, cal))


if __name__ == "__main__":
    main()
