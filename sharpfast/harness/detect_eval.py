"""`sharpfast eval detect`: the paper's Table 1 (AUC, TPR at 1% FPR) per metric, steps and n.

Scores of every prompt are computed once per (n, steps) configuration with sharpfast.detect and
appended to `OUT/scores_n{n}_steps{s}.jsonl` a batch at a time, so a killed run resumes where it
stopped. Prompt i draws its initial noise from seed + i, whatever its batch. The report (table,
per duplication level, against the narrow set) goes to `OUT/detect.json`, the ROC curves to
`OUT/roc.png`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

from .. import engine
from ..errors import BadArgument
from ..roc import evaluate


def _score_config(pipe: Any, prompts: list, noise_ids, n: int, steps: int, metrics: Any, path: str, seed: int,
                  batch_size: int, hvp: str, num_inference_steps: int, guidance_scale: float, progress: bool) -> dict:
    from ..adapters import ScoreModel, denoiser
    from ..progress import bar as progress_bar

    # a record counts only for the same prompt at the same id under the same settings: a rerun with
    # other prompt files or settings into the same folder redoes those records, never reuses them
    settings = engine.fingerprint(dict(seed=seed, hvp=hvp, num_inference_steps=num_inference_steps,
                                       guidance_scale=guidance_scale, dtype=str(denoiser(pipe).dtype)))
    done = {i: r for i, r in engine.read(path).items()
            if isinstance(i, int) and i < len(prompts) and r.get("prompt") == prompts[i]
            and r.get("settings") == settings and r.get("noise_id") == noise_ids[i]}
    todo = [i for i in range(len(prompts)) if i not in done or any(m not in done[i] for m in metrics)]
    if not todo:
        return done

    def record(i: int, res, k: int) -> dict:
        return {"id": i, "prompt": prompts[i], **{m: float(res.scores[m][k]) for m in metrics}, "settings": settings,
                "noise_id": noise_ids[i]}

    with engine.CommitLog(path) as log, \
            progress_bar(pipe, total=len(todo), desc=f"eval detect n={n} steps={steps}", enabled=progress) as bar:
        recs = engine.run(ScoreModel(pipe), log, todo, prompt_of=prompts.__getitem__, noise_id_of=noise_ids.__getitem__,
                          n=n, seed=seed, batch_size=batch_size, record=record, bar=bar, metrics=metrics, steps=steps,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, hvp=hvp)
    done.update({r["id"]: r for r in recs})
    return done


def _auc_row(scores_pos, scores_neg) -> Any:
    e = evaluate(np.concatenate([scores_pos, scores_neg]),
                 np.concatenate([np.ones(len(scores_pos)), np.zeros(len(scores_neg))]))
    return e


def _cost(pipe: Any, prompts: list, metrics: Any, n: int, steps: int, batch_size: int, hvp: str,
          num_inference_steps: int, guidance_scale: float, seed: int) -> dict:
    """UNet calls per batch and seconds per prompt of `metrics` computed alone (one timed batch
    after one warm-up batch of the same prompts)."""
    import time

    import sharpfast

    from ..adapters import ScoreModel

    model = ScoreModel(pipe)
    h, w = model.default_size()
    k = min(batch_size, len(prompts))
    lat = model.noise_for_ids(list(range(k)), n, h, w, seed).to(model.device)
    kw = dict(metrics=tuple(metrics), num_images_per_prompt=n, steps=steps, num_inference_steps=num_inference_steps,
              guidance_scale=guidance_scale, latents=lat, batch_size=k, hvp=hvp, progress=False)
    sharpfast.detect(model, prompts[:k], **kw)
    start = time.perf_counter()
    res = sharpfast.detect(model, prompts[:k], **kw)
    return {"unet_calls": res.config["unet_calls"], "seconds_per_prompt": (time.perf_counter() - start) / k}


DEFAULT_COMBINED = (("wen", "wen_low"), ("wen", "sharpness"), ("wen", "channel_wen", "wen_low"))


class PromptSets:
    """The prompt sets indexed once: every distinct prompt, its noise id, and the groups scored."""

    def __init__(self, sets: dict) -> None:
        ev = sets["eval"]
        if not any(r["memorized"] for r in ev) or all(r["memorized"] for r in ev):
            raise BadArgument("the evaluation set needs memorized and non-memorized prompts")
        self.prompts = list(dict.fromkeys(r["prompt"] for recs in sets.values() for r in recs))
        self.index = {p: i for i, p in enumerate(self.prompts)}
        # a prompt's noise: seed + its line in the file it came from (as `sharpfast detect` and `scan`
        # draw it), or seed + its position in the sets for the bundled model's records
        row_of: dict = {}
        for recs in sets.values():
            for r in recs:
                row_of.setdefault(r["prompt"], r.get("row"))
        self.noise_ids = [i if row_of[p] is None else row_of[p] for i, p in enumerate(self.prompts)]
        self.mem = [self.index[r["prompt"]] for r in ev if r["memorized"]]
        self.non = [self.index[r["prompt"]] for r in ev if not r["memorized"]]
        self.dup = [r for recs in sets.values() for r in recs if r.get("duplicates") and r.get("kind") != "template"]
        self.levels = sorted({r["duplicates"] for r in self.dup})
        self.calib = [self.index[r["prompt"]] for r in sets.get("calibration", [])]
        self.narrow = [self.index[r["prompt"]] for r in sets.get("narrow", [])]
        self.template = list(sets.get("template", []))  # scenes: template memorization, apart

    def ids(self, recs: list) -> list:
        return [self.index[r["prompt"]] for r in recs]


def _metric_rows(report: dict, ix: PromptSets, scores: Any, m, n: int, s: Any, cost, panel) -> None:
    """One metric of one (n, steps): its table row and ROC, per duplication level, against the narrow set."""
    val = lambda ids: np.array([scores[i][m] for i in ids])  # noqa: E731
    e = _auc_row(val(ix.mem), val(ix.non))
    report["table"].append({"metric": m, "steps": s, "n": n, "auc": e["auc"], "tpr_at_1pct_fpr": e["tpr_at_1pct_fpr"],
                            "tpr_at_3pct_fpr": e["tpr_at_3pct_fpr"], **cost([m])})
    panel[m] = (np.array(e["roc"]["fpr"]), np.array(e["roc"]["tpr"]), e["auc"])
    for lv in ix.levels:
        recs = list({r["prompt"]: r for r in ix.dup if r["duplicates"] == lv}.values())
        e = _auc_row(val(ix.ids(recs)), val(ix.non))
        report["by_level"].append({"metric": m, "steps": s, "n": n, "duplicates": lv, "prompts": len(recs),
                                   "copy_rate": float(np.mean([r.get("copy_rate", np.nan) for r in recs])),
                                   "auc": e["auc"], "tpr_at_1pct_fpr": e["tpr_at_1pct_fpr"]})
    if ix.narrow:
        e = _auc_row(val(ix.mem), val(ix.narrow))
        report["narrow"].append({"metric": m, "steps": s, "n": n, "auc": e["auc"],
                                 "tpr_at_1pct_fpr": e["tpr_at_1pct_fpr"]})
    if ix.template:
        e = _auc_row(val(ix.ids(ix.template)), val(ix.non))
        report["template"].append({"metric": m, "steps": s, "n": n, "prompts": len(ix.template),
                                   "copy_rate": float(np.mean([r.get("copy_rate", np.nan) for r in ix.template])),
                                   "auc": e["auc"], "tpr_at_1pct_fpr": e["tpr_at_1pct_fpr"]})


def _combined_row(report: dict, ix: PromptSets, scores: Any, combo, n: int, s: Any, cost, panel) -> None:
    """A CombinedDetector fitted on the calibration prompts only, scored on the evaluation set."""
    from ..roc import CombinedDetector

    det = CombinedDetector(combo).fit({m: [scores[i][m] for i in ix.calib] for m in combo})
    comb = lambda ids: det.score({m: [scores[i][m] for i in ids] for m in combo})  # noqa: E731
    e = _auc_row(comb(ix.mem), comb(ix.non))
    row = {"metric": det.name, "steps": s, "n": n, "auc": e["auc"], "tpr_at_1pct_fpr": e["tpr_at_1pct_fpr"],
           "tpr_at_3pct_fpr": e["tpr_at_3pct_fpr"], "fitted_on": len(ix.calib), "detector": det.to_dict(),
           **cost(list(combo))}
    report["table"].append(row)
    report["combined"].append(row)
    panel[det.name] = (np.array(e["roc"]["fpr"]), np.array(e["roc"]["tpr"]), e["auc"])


def run(pipe: Any, sets: dict, *, ns=(1, 4), steps_list=(1, 5), metrics: Any = ("wen", "sharpness"),
        out_dir: str = "sharpfast-eval", seed: int = 42, batch_size: int = 16, hvp: str = "fd",
        num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None, progress: bool = True,
        combined=DEFAULT_COMBINED, costs: bool = True) -> dict:
    """sets: {"eval": records with prompt and memorized, optional "duplicated_low" / "narrow" /
    "template" (scored against the non-memorized set on its own) / "calibration" (normal prompts
    kept apart: the combined detectors are fitted on them only)}.
    combined: metric tuples whose CombinedDetector is reported (those whose metrics are all scored)."""
    from ..adapters import adapt
    from .plots import roc_figure

    st = adapt(pipe).resolve(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    num_inference_steps, guidance_scale = st.num_inference_steps, st.guidance_scale
    ix = PromptSets(sets)
    os.makedirs(out_dir, exist_ok=True)
    combos = [tuple(c) for c in combined if all(m in metrics for m in c)] if ix.calib else []
    report: dict = {"config": dict(ns=list(ns), steps=list(steps_list), metrics=list(metrics), seed=seed, hvp=hvp,
                                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                   memorized=len(ix.mem), non_memorized=len(ix.non), calibration=len(ix.calib)),
                    "table": [], "by_level": [], "narrow": [], "template": [], "combined": []}
    curves: dict = {}
    eval_prompts = [ix.prompts[i] for i in ix.mem[:batch_size // 2] + ix.non[:batch_size - batch_size // 2]]
    for n in ns:
        for s in steps_list:
            path = os.path.join(out_dir, f"scores_n{n}_steps{s}.jsonl")
            scores = _score_config(pipe, ix.prompts, ix.noise_ids, n, s, list(metrics), path, seed, batch_size, hvp,
                                   num_inference_steps, guidance_scale, progress)
            panel = curves.setdefault(f"steps={s}, n={n}", {})

            def cost(ms, n: int = n, s: Any = s) -> Any:
                if not costs:
                    return {"unet_calls": None, "seconds_per_prompt": None}
                return _cost(pipe, eval_prompts, ms, n, s, batch_size, hvp, num_inference_steps, guidance_scale, seed)

            for m in metrics:
                _metric_rows(report, ix, scores, m, n, s, cost, panel)
            for combo in combos:
                _combined_row(report, ix, scores, combo, n, s, cost, panel)
    with open(os.path.join(out_dir, "detect.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    roc_figure(curves, os.path.join(out_dir, "roc.png"),
               f"memorized ({len(ix.mem)}) vs non-memorized ({len(ix.non)})")
    return report


def format_report(report: dict) -> str:
    w = max([12] + [len(r["metric"]) for r in report["table"]])
    lines = [f"{'metric':{w}s} {'steps':>5s} {'n':>3s} {'AUC':>6s} {'TPR@1%':>7s} {'TPR@3%':>7s} {'UNet calls':>10s} "
             f"{'s/prompt':>9s}"]
    for r in report["table"]:
        calls = "" if r.get("unet_calls") is None else str(r["unet_calls"])
        sec = "" if r.get("seconds_per_prompt") is None else f"{r['seconds_per_prompt']:.4f}"
        lines.append(f"{r['metric']:{w}s} {r['steps']:5d} {r['n']:3d} {r['auc']:6.3f} {r['tpr_at_1pct_fpr']:7.3f} "
                     f"{r['tpr_at_3pct_fpr']:7.3f} {calls:>10s} {sec:>9s}")
    if report.get("combined"):
        lines.append(f"\ncombined detectors: fitted on {report['combined'][0]['fitted_on']} calibration prompts "
                     f"(normal, kept apart), scored on the evaluation set; UNet calls per batch")
    if report["by_level"]:
        lines.append("\nby duplication level (all duplicated captions of the level vs non-memorized):")
        lines.append(f"{'metric':12s} {'steps':>5s} {'n':>3s} {'dup':>4s} {'prompts':>7s} {'copy':>5s} {'AUC':>6s} "
                     f"{'TPR@1%':>7s}")
        for r in report["by_level"]:
            lines.append(f"{r['metric']:12s} {r['steps']:5d} {r['n']:3d} {r['duplicates']:4d} {r['prompts']:7d} "
                         f"{r['copy_rate']:5.2f} {r['auc']:6.3f} {r['tpr_at_1pct_fpr']:7.3f}")
    if report["narrow"]:
        lines.append("\nmemorized vs the narrow set (captions naming only the digit / one object):")
        for r in report["narrow"]:
            lines.append(f"{r['metric']:12s} {r['steps']:5d} {r['n']:3d} {r['auc']:6.3f} {r['tpr_at_1pct_fpr']:7.3f}")
    if report.get("template"):
        lines.append(f"\ntemplate captions ({report['template'][0]['prompts']}, copy rate "
                     f"{report['template'][0]['copy_rate']:.2f}) vs non-memorized:")
        for r in report["template"]:
            lines.append(f"{r['metric']:12s} {r['steps']:5d} {r['n']:3d} {r['auc']:6.3f} {r['tpr_at_1pct_fpr']:7.3f}")
    return "\n".join(lines)
