"""`sharpfast eval mitigate`: does a mitigation stop the copying without losing the prompt?

For each method and setting, every memorized prompt is generated from the same `seeds` initial
noises (drawn exactly as the pipeline draws them) and each output is judged by
- copy: its nearest training image is the prompt's memorized image, with similarity at least
  COPY_THRESHOLD (Pearson correlation of the pixels, sharpfast.zoo.copying: the stand-in for SSCD);
  reported at the cuts CUTS too (0.8, 0.85, 0.9): outputs at 0.85-0.88 still look like the
  training image to a person, so one cut alone flatters a method;
- similarity: its Pearson correlation with the memorized image (lower is better);
- fidelity: a scikit-learn digit classifier calls it the prompted digit (the stand-in for CLIP score).
Rows go to `OUT/mitigate.jsonl` one (method, setting, prompt) at a time, so a killed run resumes;
the summary to `OUT/mitigate.json`, a grid of examples to `OUT/mitigate_grid.png` (each cell's
similarity printed, copies framed), the similarity histogram per method to
`OUT/similarity_hist.png` and the copy-against-fidelity curves (with --sweep) to `OUT/tradeoff.png`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .. import jsonl

CUTS = (0.8, 0.85, 0.9)


@dataclass(frozen=True)
class Method:
    """A mitigation: run(pipe, prompts, latents, setting, gen_kwargs) -> images in [-1, 1]."""

    run: Callable
    default: object
    sweep: tuple
    knob: str


def _generate(pipe, latents, gen_kwargs, prompts=None, prompt_embeds=None, negative_prompt_embeds=None):
    out = pipe(prompt=prompts, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
               latents=latents, output_type="pt", **gen_kwargs).images
    return out.float() * 2 - 1


def _none(pipe, prompts, latents, setting, gen_kwargs):
    return _generate(pipe, latents, gen_kwargs, prompts=prompts)


def _random_tokens(pipe, prompts, latents, setting, gen_kwargs):
    from ..baselines import random_tokens

    g = torch.Generator().manual_seed(1234)
    return _generate(pipe, latents, gen_kwargs, prompts=random_tokens(pipe, prompts, int(setting), g))


def _wen_embedding(pipe, prompts, latents, setting, gen_kwargs):
    from ..baselines import wen_embedding

    emb, null = wen_embedding(pipe, prompts, latents, target_ratio=float(setting),
                              num_inference_steps=gen_kwargs["num_inference_steps"])
    return _generate(pipe, latents, gen_kwargs, prompt_embeds=emb, negative_prompt_embeds=null)


def _sail(pipe, prompts, latents, setting, gen_kwargs):
    return _run_sail(pipe, prompts, latents, sail_setting(setting), gen_kwargs)


def _sail_reference(pipe, prompts, latents, setting, gen_kwargs):
    # the authors' loss and step size, every candidate through all steps (no early exit, one round):
    # the configuration benchmarks/bench_sail.py times as the "reference loop"
    kw = {"lr": 0.05, **sail_setting(setting)}
    return _run_sail(pipe, prompts, latents, {"objective": "reference", "max_rounds": 1, "threshold": -1e30, **kw},
                     gen_kwargs)


def _run_sail(pipe, prompts, latents, kwargs, gen_kwargs):
    import sharpfast

    out = sharpfast.sail(pipe, prompts, latents=latents, output_type="pt", **kwargs, **gen_kwargs)
    return out.images.float() * 2 - 1


_NUM = r"(\d*\.?\d+(?:e-?\d+)?)"


def sail_setting(setting) -> dict:
    """"k1s3lr0.7" -> 1 candidate, 3 Adam steps, lr 0.7 (lr optional: sail's default);
    a trailing "a3e-5" puts the paper's alpha ||x||^2 term (alpha 3e-5) in place of the projection
    onto the Gaussian shell."""
    import re

    m = re.fullmatch(rf"k(\d+)s(\d+)(?:lr{_NUM})?(?:a{_NUM})?", str(setting))
    if not m:
        raise ValueError(f"a SAIL setting looks like k1s3lr0.7 (1 candidate, 3 Adam steps, lr 0.7; lr optional) or "
                         f"k1s3lr0.7a1e-4 (alpha ||x||^2 instead of the projection), got {setting!r}")
    out = {"candidates": int(m.group(1)), "max_steps": int(m.group(2))}
    if m.group(3):
        out["lr"] = float(m.group(3))
    if m.group(4):
        out.update(alpha=float(m.group(4)), project=False)
    return out


METHODS = {
    "none": Method(_none, None, (None,), "-"),
    "random_tokens": Method(_random_tokens, 4, (1, 2, 4, 8, 16), "tokens added"),
    "wen_embedding": Method(_wen_embedding, 0.5, (0.9, 0.7, 0.5, 0.3, 0.15), "target / initial ||eps_Δ||"),
    "sail": Method(_sail, "k1s3", ("k4s2lr0.05", "k1s3lr0.3", "k4s3lr0.3", "k1s3lr0.5", "k1s3", "k1s3lr1"),
                   "candidates k, Adam steps s, lr (default 0.7)"),
    # the paper's regularizer: alpha ||x||^2 in the loss, no projection (alpha 0: neither);
    # on the digits model the sharpness gradient at x_T is about 2 alpha ||x|| at alpha 5e-5
    "sail_alpha": Method(_sail, "k1s3a3e-5", ("k1s3a0", "k1s3a1e-5", "k1s3a3e-5", "k1s3a1e-4", "k1s3a3e-4"),
                         "alpha of the norm term (k1 s3 lr 0.7, no projection)"),
    "sail_reference": Method(_sail_reference, "k8s10", ("k8s10", "k8s10lr0.1", "k8s10lr0.3", "k8s10lr0.7", "k8s10lr1"),
                             "the authors' loss, no early exit; lr (default 0.05)"),
}


def _key(method, setting, prompt):
    return json.dumps([method, setting, prompt])


def run(pipe, records: list[dict], train: torch.Tensor, *, methods=("none", "random_tokens", "wen_embedding"),
        seeds=(0, 1, 2, 3, 4), sweep=False, out_dir="sharpfast-eval", batch_prompts=8, num_inference_steps=50,
        guidance_scale=7.5, progress=True, grid_prompts=6) -> dict:
    """records: memorized prompts with prompt, digit and train_index."""
    from tqdm.auto import tqdm

    from ..score import ScoreModel
    from ..zoo.copying import copy_stats, nearest
    from ..zoo.fidelity import fidelity

    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; available: {', '.join(METHODS)}")
    if not records:
        raise ValueError("no memorized prompts to mitigate")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "mitigate.jsonl")
    done = jsonl.read(path, key="key")
    model = ScoreModel(pipe)
    h, w = model.default_size()
    gen_kwargs = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    jobs = [(m, s) for m in methods for s in (METHODS[m].sweep if sweep else (METHODS[m].default,))]
    bar = tqdm(total=len(jobs) * len(records), desc="mitigate", unit="prompt", disable=not progress)

    def judged(method, setting, chunk):
        lat = torch.cat([model.noise(1, h, w, torch.Generator("cpu").manual_seed(s))
                         for _ in chunk for s in seeds]).to(model.device)
        imgs = METHODS[method].run(pipe, [r["prompt"] for r in chunk for _ in seeds], lat, setting, gen_kwargs)
        return imgs.cpu().view(len(chunk), len(seeds), *train.shape[1:])

    with open(path, "a", encoding="utf-8") as f:
        for method, setting in jobs:
            for start in range(0, len(records), batch_prompts):
                chunk = records[start:start + batch_prompts]
                # records of an older version lack nearest_is_target (copies at other cuts): redone
                todo = [r for r in chunk if "nearest_is_target" not in done.get(_key(method, setting, r["prompt"]), {})]
                if todo:
                    recs = []
                    for r, im in zip(todo, judged(method, setting, todo)):
                        copies, sim = copy_stats(im, train, r["train_index"])
                        idx, _ = nearest(im, train)
                        recs.append({"key": _key(method, setting, r["prompt"]), "method": method, "setting": setting,
                                     "prompt": r["prompt"], "duplicates": r.get("duplicates"),
                                     "copies": copies.tolist(), "similarity": [round(float(v), 4) for v in sim],
                                     "nearest_is_target": (idx == int(r["train_index"])).tolist(),
                                     "fidelity": fidelity(im, [r["digit"]] * len(seeds)).tolist()})
                    jsonl.append(f, recs)
                    done.update({x["key"]: x for x in recs})
                bar.update(len(chunk))
    bar.close()
    summary = summarize(done, jobs, [r["prompt"] for r in records])
    with open(os.path.join(out_dir, "mitigate.json"), "w", encoding="utf-8") as fh:
        json.dump({"seeds": list(seeds), "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                   "prompts": len(records), "summary": summary}, fh, indent=1)
    shown = records[:grid_prompts]
    grid = {m: judged(m, METHODS[m].default, shown)[:, 0] for m in methods} if shown else {}
    sims = {m: [done[_key(m, METHODS[m].default, p)]["similarity"] for p in (r["prompt"] for r in records)
                if _key(m, METHODS[m].default, p) in done] for m in methods}
    _figures(summary, shown, train, methods, grid, out_dir, sweep, sims)
    return {"summary": summary}


def summarize(done: dict, jobs, prompts) -> list[dict]:
    rows = []
    for method, setting in jobs:
        recs = [done[_key(method, setting, p)] for p in prompts if _key(method, setting, p) in done]
        if not recs:
            continue
        cat = lambda k: np.concatenate([np.asarray(r[k], dtype=np.float64) for r in recs])  # noqa: E731
        sim, hit = cat("similarity"), cat("nearest_is_target").astype(bool)
        rows.append({"method": method, "setting": setting, "prompts": len(recs), "copy_rate": float(cat("copies").mean()),
                     "copy_rate_at": {str(c): float((hit & (sim >= c)).mean()) for c in CUTS},
                     "similarity": float(sim.mean()), "fidelity": float(cat("fidelity").mean())})
    return rows


def format_summary(summary: list[dict]) -> str:
    cuts = "".join(f" {'copies@' + str(c):>11s}" for c in CUTS)
    lines = [f"{'method':14s} {'setting':>12s} {'prompts':>7s}{cuts} {'similarity':>10s} {'fidelity':>8s}"]
    for r in summary:
        at = "".join(f" {r['copy_rate_at'][str(c)]:11.3f}" for c in CUTS)
        lines.append(f"{r['method']:14s} {str(r['setting']):>12s} {r['prompts']:7d}{at} "
                     f"{r['similarity']:10.3f} {r['fidelity']:8.3f}")
    return "\n".join(lines)


def _figures(summary, shown, train, methods, grid, out_dir, sweep, sims):
    from ..zoo.copying import COPY_THRESHOLD, copy_stats
    from .plots import image_grid, similarity_histogram, tradeoff_figure

    if shown:
        rows, notes = [], []
        for k, r in enumerate(shown):
            cells, marks = [train[r["train_index"]].numpy()], [(None, None)]
            for m in methods:
                img = grid[m][k:k + 1]
                copies, sim = copy_stats(img, train, r["train_index"])
                cells.append(img[0].numpy())
                marks.append((float(sim[0]), "copy" if bool(copies[0]) else
                              ("near" if float(sim[0]) >= min(CUTS) else None)))
            rows.append(cells)
            notes.append(marks)
        image_grid(rows, [r["prompt"] for r in shown], ["training image", *methods],
                   os.path.join(out_dir, "mitigate_grid.png"),
                   f"first seed of each method (default setting); similarity to the training image under each "
                   f"cell; red frame: copy (nearest, >= {COPY_THRESHOLD}), orange: >= {min(CUTS)}", notes=notes)
    if any(sims.values()):
        similarity_histogram({m: np.concatenate([np.asarray(v) for v in vs]) for m, vs in sims.items() if vs}, CUTS,
                             os.path.join(out_dir, "similarity_hist.png"))
    if sweep:
        series = {}
        for r in summary:
            series.setdefault(r["method"], []).append((r["fidelity"], r["copy_rate"], r["setting"]))
        tradeoff_figure(series, os.path.join(out_dir, "tradeoff.png"))
