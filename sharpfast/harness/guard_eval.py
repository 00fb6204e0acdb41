"""`sharpfast eval guard`: memorized prompts served as a user serves them, guarded against plain.

Every memorized prompt of the chosen half is generated once per seed by `pipe(...)` and once by
`sharpfast.guard(pipe)` with its defaults (or the metric / mitigation given), from the same
generators, in the same run, alternating which goes first per batch so that a slow moment of
the machine falls on both. Each output is judged against the prompt's own training image
(sharpfast.zoo.copying): copies at 0.8 (the nearest training image is the memorized one, Pearson
similarity >= 0.8), near copies at 0.8 (similarity >= 0.8 to its own training image, whichever is
nearest), fidelity (the digit classifier reads the prompted digit). Rows go to OUT/guard.jsonl one
batch at a time (a killed run resumes), the summary to OUT/guard.json.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np
import torch

from .. import engine
from ..zoo.copying import COPY_CUT as CUT
from ..zoo.copying import LABEL_CUT


def _judge(images: Any, records: list, judge: Any) -> dict:
    out: dict = {"fidelity": judge.fidelity(images, records).tolist()}
    if all(r.get("train_index") is not None for r in records):  # memorized: judged against their own image
        idx, _ = judge.nearest(images)
        target = torch.tensor([r["train_index"] for r in records])
        _, sim = judge.copy_stats(images, target)
        out.update(similarity=[round(float(v), 4) for v in sim], nearest_is_target=(idx == target).tolist())
    return out


def run(pipe: Any, records: list[dict], judge: Any, *, seeds: Any = (0, 1), metric: Optional[str] = None,
        mitigation: Optional[str] = "auto", setting: Any = None, out_dir: str = "sharpfast-eval",
        batch_prompts: int = 8, num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
        progress: bool = True, normal: Sequence[dict] = (), policy: Any = None) -> dict:
    """records: memorized prompts (prompt, train_index and what `judge`, sharpfast.zoo.judge,
    reads fidelity from); normal: prompts that are not memorized, through the same guard (their
    fidelity and time against plain). Memorized and normal prompts are never in one batch, so
    each kind's time ratio is its own. Returns the summary."""

    from ..adapters import adapt
    from ..guarding import DEFAULT_METRIC, Policy, guard

    st = adapt(pipe).resolve(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    num_inference_steps, guidance_scale = st.num_inference_steps, st.guidance_scale
    pol = None if policy is None else Policy.of(policy).text()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "guard.jsonl")
    config = {"metric": metric or DEFAULT_METRIC, "mitigation": mitigation, "setting": setting,
              "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "seeds": list(seeds),
              "policy": pol}
    mem = [dict(r, memorized=True) for r in records]
    nor = [dict(r, memorized=False, train_index=None) for r in normal]
    jobs = [(r, s) for r in mem + nor for s in seeds]
    kw = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, output_type="pt")
    from ..progress import bar as progress_bar

    # the guard calibrates (if it must) before the first timed request
    used: dict = {}
    with guard(pipe, metric=config["metric"], mitigation=mitigation, setting=setting, name="eval",
               policy=policy) as g:
        used.update(mitigation=g.mitigation, setting=g.setting, policy=g.config.policy.text(),
                    threshold=g.calibrate(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale))
        # rows are keyed by what the guard resolved, not what was asked: "auto" after the model's
        # calibrated policy (or its calibration: the gate's threshold) changed must not resume old rows
        resolved = {k: used[k] for k in ("mitigation", "setting", "policy", "threshold")}
        key = lambda r, s: json.dumps([config, resolved, r["prompt"], s], sort_keys=True, default=str)  # noqa: E731
        done = engine.read(path, key="key")
        todo = [(r, s) for r, s in jobs if key(r, s) not in done]
        bar = progress_bar(pipe, total=len(jobs), initial=len(jobs) - len(todo), desc="eval guard", unit="image",
                           enabled=progress)
        step, b = batch_prompts * len(seeds), 0
        with engine.CommitLog(path) as log:
            for kind in (True, False):
                mine = [(r, s) for r, s in todo if r["memorized"] == kind]
                for start in range(0, len(mine), step):
                    chunk = mine[start:start + step]
                    rows = _batch_rows(pipe, g, chunk, judge, kw, key, guard_first=bool(b % 2))
                    b += 1
                    log.commit(log.next_chunk(), rows)
                    done.update({x["key"]: x for x in rows})
                    bar.update(len(chunk))
    bar.close()
    summary = summarize([done[key(r, s)] for r, s in jobs], config)
    with open(os.path.join(out_dir, "guard.json"), "w", encoding="utf-8") as fh:
        json.dump({"config": config, "used": used, "prompts": len(records), "normal_prompts": len(nor),
                   "summary": summary}, fh, indent=1)
    return summary


def _batch_rows(pipe: Any, g: Any, chunk, judge: Any, kw, key: Any, guard_first: bool) -> list:
    """One batch generated plainly and through the guard from the same generators (in alternating
    order across batches), both judged: a row per (prompt, seed)."""
    caps = [r["prompt"] for r, _ in chunk]
    secs = {}

    def timed(name: str, call: Callable) -> Any:
        t = time.perf_counter()
        out = call(caps, generator=[torch.Generator().manual_seed(s) for _, s in chunk], **kw)
        secs[name] = time.perf_counter() - t
        return out

    if guard_first:
        go = timed("guard", g)
        po = timed("plain", pipe).images
    else:
        po = timed("plain", pipe).images
        go = timed("guard", g)
    recs = [r for r, _ in chunk]
    jp = _judge(po.float() * 2 - 1, recs, judge)
    jg = _judge(go.images.float() * 2 - 1, recs, judge)
    rows = []
    for i, (r, s) in enumerate(chunk):
        rep = go.memorization[i]
        rows.append({"key": key(r, s), "prompt": r["prompt"], "seed": s, "memorized": r["memorized"],
                     "plain": {k: v[i] for k, v in jp.items()}, "guard": {k: v[i] for k, v in jg.items()},
                     "flagged": rep["flagged"], "selected": rep["selected"], "mitigated": rep["mitigated"],
                     "check": rep["check"],
                     "setting": rep.get("setting"), "score": rep["score"], "seconds_plain": secs["plain"] / len(chunk),
                     "seconds_guard": secs["guard"] / len(chunk)})
    return rows


def _side_summary(rows: list[dict]) -> dict:
    out: dict = {"images": len(rows), "flagged": float(np.mean([r["flagged"] for r in rows])),
                 "mitigated": float(np.mean([r["mitigated"] for r in rows]))}
    for side in ("plain", "guard"):
        out[side] = {"fidelity": float(np.mean([r[side]["fidelity"] for r in rows]))}
        if "similarity" in rows[0][side]:
            sim = np.array([r[side]["similarity"] for r in rows])
            hit = np.array([r[side]["nearest_is_target"] for r in rows], dtype=bool)
            out[side].update({"copies_at_0.8": float((hit & (sim >= CUT)).mean()),
                              "near_at_0.8": float((sim >= CUT).mean()),
                              "copies_at_0.9": float((hit & (sim >= LABEL_CUT)).mean()),
                              "similarity": float(sim.mean())})
    out["fidelity_ratio"] = out["guard"]["fidelity"] / max(out["plain"]["fidelity"], 1e-12)
    out["time_ratio"] = sum(r["seconds_guard"] for r in rows) / sum(r["seconds_plain"] for r in rows)
    return out


def summarize(rows: list[dict], config: dict) -> dict:
    """The memorized prompts' summary (top level, as before) and, when there are normal prompts,
    theirs under "normal"."""
    mem = [r for r in rows if r.get("memorized", True)]
    nor = [r for r in rows if not r.get("memorized", True)]
    out = _side_summary(mem) if mem else {}
    if nor:
        out["normal"] = _side_summary(nor)
    return out


def format_summary(summary: dict) -> str:
    lines = [f"memorized prompts  {'copies@0.8':>10s} {'near@0.8':>9s} {'copies@0.9':>10s} {'similarity':>10s} "
             f"{'fidelity':>8s}"] if "plain" in summary else []
    for side in ("plain", "guard") if "plain" in summary else ():
        s = summary[side]
        lines.append(f"  {side:16s} {s['copies_at_0.8']:10.3f} {s['near_at_0.8']:9.3f} {s['copies_at_0.9']:10.3f} "
                     f"{s['similarity']:10.3f} {s['fidelity']:8.3f}")
    if "plain" in summary:
        lines.append(f"  flagged {summary['flagged']:.3f}, mitigated {summary['mitigated']:.3f}, fidelity ratio "
                     f"{summary['fidelity_ratio']:.3f}, guarded / plain time {summary['time_ratio']:.3f} "
                     f"({summary['images']} images)")
    n = summary.get("normal")
    if n:
        lines.append(f"normal prompts: mitigated {n['mitigated']:.3f}, fidelity {n['plain']['fidelity']:.3f} -> "
                     f"{n['guard']['fidelity']:.3f} (ratio {n['fidelity_ratio']:.3f}), guarded / plain time "
                     f"{n['time_ratio']:.3f} ({n['images']} images)")
    return "\n".join(lines)


def frontier(pipe: Any, records: list[dict], judge: Any, policies: Sequence[Any], *, out_dir: str,
             model: str = "", half: str = "", **kw: Any) -> list:
    """run() once per policy (each in out_dir/policy-<text>/, each resuming), then the policy
    frontier: guard_frontier.json (per policy: its text, the guard's mitigation, the summary) and
    guard_frontier.png (copies on memorized prompts, fidelity ratios, against the policy's gate)."""
    from ..guarding import Policy
    from .plots import policy_frontier

    points = []
    for p in policies:
        text = Policy.of(p).text()
        sub = os.path.join(out_dir, "policy-" + text.replace(":", "_").replace(",", "+"))
        s = run(pipe, records, judge, out_dir=sub, policy=text, **kw)
        with open(os.path.join(sub, "guard.json"), encoding="utf-8") as fh:
            points.append({"policy": text, "mitigation": json.load(fh)["used"]["mitigation"], "summary": s})
    with open(os.path.join(out_dir, "guard_frontier.json"), "w", encoding="utf-8") as fh:
        json.dump(points, fh, indent=1)
    policy_frontier(points, os.path.join(out_dir, "guard_frontier.png"), model, half)
    return points
