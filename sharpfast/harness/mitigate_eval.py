"""`sharpfast eval mitigate`: does a mitigation stop the copying without losing the prompt?

For each method and setting, every memorized prompt is generated from the same `seeds` initial
noises (drawn exactly as the pipeline draws them) and each output is judged by
- copy: its nearest training image is the prompt's memorized image, with similarity at least
  COPY_CUT, 0.8 (Pearson correlation of the pixels, sharpfast.zoo.copying: the one definition, the
  stand-in for SSCD); reported at the cuts CUTS too (0.8, 0.85, 0.9): outputs at 0.85-0.88 still
  look like the training image to a person, so the strict cut alone flatters a method;
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
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from .. import engine
from ..errors import BadArgument
from ..mitigations import REGISTRY
from ..zoo.copying import COPY_CUT, LABEL_CUT

CUTS = (COPY_CUT, 0.85, LABEL_CUT)


def _judged_run(pipe: Any, method: str, setting: Any, prompts: list, latents: Tensor, gen_kwargs) -> tuple:
    """(images in [-1, 1], CFG calls per image, seconds) of one registered mitigation."""
    from ..mitigations import mitigate

    out, info = mitigate(pipe, prompts, method, setting, latents=latents, output_type="pt", return_info=True,
                         **gen_kwargs)
    return out.images.float() * 2 - 1, info["unet_calls_per_image"], info["seconds"]


def halves(records: list[dict]) -> dict:
    """The memorized prompts split in two by position: "A" (even positions, where settings are
    chosen) and "B" (odd positions, where the chosen setting is reported)."""
    return {"A": records[0::2], "B": records[1::2], "all": records}


def _key(method: str, setting: Any, prompt: Any, settings: str = "") -> Any:
    return json.dumps([method, setting, prompt, settings])


def _judge(r, im, judge: Any, seeds: Any, calls, per_image_s) -> dict:
    """The judged record of one prompt's images (copies, similarity, nearest, fidelity, cost)."""
    copies, sim = judge.copy_stats(im, r["train_index"])
    idx, _ = judge.nearest(im)
    return {"prompt": r["prompt"], "duplicates": r.get("duplicates"), "copies": copies.tolist(),
            "similarity": [round(float(v), 4) for v in sim],
            "nearest_is_target": (idx == int(r["train_index"])).tolist(),
            "unet_calls_per_image": round(float(calls), 3), "seconds_per_image": round(float(per_image_s), 5),
            "fidelity": judge.fidelity(im, [r] * len(im)).tolist()}


class _Job:
    """One evaluation's generation: the same `seeds` noises for every prompt, judged by `judge`."""

    def __init__(self, pipe: Any, judge: Any, seeds: Any, gen_kwargs) -> None:
        from ..adapters import ScoreModel

        self.pipe, self.judge, self.seeds, self.gen_kwargs = pipe, judge, seeds, gen_kwargs
        self.model = ScoreModel(pipe)
        self.h, self.w = self.model.default_size()

    def images(self, method: str, setting: Any, chunk) -> tuple:
        """(images (prompts, seeds, *image), CFG calls per image, seconds per image) of one method."""
        m = self.model
        lat = torch.cat([m.noise(1, self.h, self.w, torch.Generator("cpu").manual_seed(s))
                         for _ in chunk for s in self.seeds]).to(m.device)
        imgs, calls, secs = _judged_run(self.pipe, method, setting, [r["prompt"] for r in chunk for _ in self.seeds],
                                        lat, self.gen_kwargs)
        shape = self.judge.references.shape[1:]
        return imgs.cpu().view(len(chunk), len(self.seeds), *shape), calls, secs / lat.shape[0]

    def records(self, method: str, setting: Any, chunk, settings: Any) -> list:
        images, calls, per_image_s = self.images(method, setting, chunk)
        return [{"key": _key(method, setting, r["prompt"], settings), "method": method, "setting": setting,
                 "settings": settings, **_judge(r, im, self.judge, self.seeds, calls, per_image_s)}
                for r, im in zip(chunk, images)]


def run(pipe: Any, records: list[dict], judge: Any, *, methods: Any = ("none", "random_tokens", "wen_embedding"),
        seeds: Any = (0, 1, 2, 3, 4), sweep: bool = False, out_dir: str = "sharpfast-eval", batch_prompts: int = 8,
        num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None, progress: bool = True,
        grid_prompts: int = 6, settings: Any = None) -> dict:
    """records: memorized prompts with prompt, train_index and what `judge` reads fidelity from
    (sharpfast.zoo.judge); settings: {method: setting} in place of a method's registry default
    (without --sweep).

    Rows are committed to `OUT/mitigate.jsonl` (a sharpfast.engine commit log) a batch at a time,
    each keyed by method, setting, prompt and a fingerprint of the seeds, steps, guidance and
    dtype: a rerun into the same folder with other settings generates anew, never reuses."""
    from ..adapters import adapt, denoiser
    from ..progress import bar as progress_bar

    st = adapt(pipe).resolve(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    num_inference_steps, guidance_scale = st.num_inference_steps, st.guidance_scale
    for m in methods:
        if m not in REGISTRY:
            raise BadArgument(f"unknown method {m!r}; available: {', '.join(REGISTRY)}")
    if not records:
        raise BadArgument("no memorized prompts to mitigate")
    fp = engine.fingerprint(dict(seeds=list(seeds), num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale, dtype=str(denoiser(pipe).dtype)))
    path = os.path.join(out_dir, "mitigate.jsonl")
    job = _Job(pipe, judge, seeds, dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale))
    default = {m: dict(settings or {}).get(m, REGISTRY[m].default) for m in methods}
    jobs = [(m, s) for m in methods for s in (REGISTRY[m].sweep if sweep else (default[m],))]
    with engine.CommitLog(path) as log, \
            progress_bar(pipe, total=len(jobs) * len(records), desc="eval mitigate", enabled=progress) as bar:
        done = {k: r for k, r in engine.read(path, key="key").items() if r.get("settings") == fp}
        for method, setting in jobs:
            for start in range(0, len(records), batch_prompts):
                chunk = records[start:start + batch_prompts]
                todo = [r for r in chunk if _key(method, setting, r["prompt"], fp) not in done]
                if todo:
                    recs = job.records(method, setting, todo, fp)
                    log.commit(log.next_chunk(), recs)
                    done.update({x["key"]: x for x in recs})
                bar.update(len(chunk))
    summary = summarize(done, jobs, [r["prompt"] for r in records], fp)
    _write_json(os.path.join(out_dir, "mitigate.json"),
                {"seeds": list(seeds), "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                 "prompts": len(records), "summary": summary})
    shown = records[:grid_prompts]
    grid = {m: job.images(m, default[m], shown)[0][:, 0] for m in methods} if shown else {}
    sims = {m: [done[_key(m, default[m], p, fp)]["similarity"] for p in (r["prompt"] for r in records)
                if _key(m, default[m], p, fp) in done] for m in methods}
    _figures(summary, shown, judge, methods, grid, out_dir, sweep, sims, default)
    return {"summary": summary}


def _write_json(path: str, obj) -> None:
    """Write obj as JSON through a temporary file and a rename: a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def summarize(done: dict, jobs, prompts: list, settings: str = "") -> list[dict]:
    rows = []
    for method, setting in jobs:
        keys = [_key(method, setting, p, settings) for p in prompts]
        recs = [done[k] for k in keys if k in done]
        if not recs:
            continue
        cat = lambda k: np.concatenate([np.asarray(r[k], dtype=np.float64) for r in recs])  # noqa: E731
        sim, hit = cat("similarity"), cat("nearest_is_target").astype(bool)
        rows.append(
            {
                "method": method,
                "setting": setting,
                "prompts": len(recs),
                "copy_rate": float(cat("copies").mean()),
                "copy_rate_at": {str(c): float((hit & (sim >= c)).mean()) for c in CUTS},
                "near_rate_at": {str(c): float((sim >= c).mean()) for c in CUTS},
                "similarity": float(sim.mean()),
                "fidelity": float(cat("fidelity").mean()),
                "unet_calls_per_image": float(np.mean([r["unet_calls_per_image"] for r in recs])),
                "seconds_per_image": float(np.mean([r["seconds_per_image"] for r in recs])),
            }
        )
    plain = [r for r in rows if r["method"] == "none"]
    for r in rows:  # the wall-time ratio to plain generation measured in the same run
        r["time_ratio"] = r["seconds_per_image"] / plain[0]["seconds_per_image"] if plain else None
    return rows


def format_summary(summary: list[dict]) -> str:
    cuts = "".join(f" {'copies@' + str(c):>11s}" for c in CUTS)
    lines = [f"{'method':17s} {'setting':>12s} {'prompts':>7s}{cuts} {'sim>=0.8':>8s} {'similarity':>10s} "
             f"{'fidelity':>8s} {'calls/img':>9s} {'time':>6s}"]
    for r in summary:
        at = "".join(f" {r['copy_rate_at'][str(c)]:11.3f}" for c in CUTS)
        ratio = "" if r.get("time_ratio") is None else f"{r['time_ratio']:5.2f}x"
        lines.append(f"{r['method']:17s} {str(r['setting']):>12s} {r['prompts']:7d}{at} "
                     f"{r['near_rate_at']['0.8']:8.3f} {r['similarity']:10.3f} {r['fidelity']:8.3f} "
                     f"{r['unet_calls_per_image']:9.1f} {ratio:>6s}")
    return "\n".join(lines)


def _figures(summary, shown, judge: Any, methods: Any, grid, out_dir: str, sweep, sims, default: dict) -> None:
    from .plots import image_grid, setting_label, similarity_histogram, tradeoff_figure

    named = {m: m if m == "none" else f"{m}\n{setting_label(m, default[m])}" for m in methods}

    if shown:
        rows, notes = [], []
        for k, r in enumerate(shown):
            cells = [judge.references[r["train_index"]].numpy()]
            marks: list[tuple[Optional[float], Optional[str]]] = [(None, None)]
            for m in methods:
                img = grid[m][k:k + 1]
                copies, sim = judge.copy_stats(img, r["train_index"])
                cells.append(img[0].numpy())
                marks.append((float(sim[0]), "copy" if bool(copies[0]) else
                              ("near" if float(sim[0]) >= COPY_CUT else None)))
            rows.append(cells)
            notes.append(marks)
        image_grid(rows, [r["prompt"] for r in shown], ["training image", *(named[m] for m in methods)],
                   os.path.join(out_dir, "mitigate_grid.png"),
                   f"first seed of each method (default setting); under each cell its similarity to the "
                   f"training image; red frame: a copy (that image is the nearest, similarity >= {COPY_CUT}); "
                   f"orange: similarity >= {COPY_CUT} but another training image is nearer", notes=notes,
                   caption=getattr(judge, "similarity_note", ""))
    if any(sims.values()):
        similarity_histogram({named[m].replace("\n", ", "): np.concatenate([np.asarray(v) for v in vs])
                              for m, vs in sims.items() if vs}, CUTS,
                             os.path.join(out_dir, "similarity_hist.png"))
    if sweep:
        series: dict = {}
        for r in summary:
            series.setdefault(r["method"], []).append((r["fidelity"], r["copy_rate_at"][str(COPY_CUT)], r["setting"],
                                                       r["unet_calls_per_image"]))
        tradeoff_figure(series, os.path.join(out_dir, "tradeoff.png"))
