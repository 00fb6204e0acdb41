"""Latency of the serving guard and of SAIL against plain generation, ratios in one run.

Targets (issues 5, 14): guard on unflagged prompts at most 1.02x plain generation, a flagged
request (decided at step 1, SAIL, one generation) at most 1.5x; SAIL end to end
(optimization plus generation) at most 1.5x; SAIL at least 3x faster than the reference-style loop
(objective="reference", 8 candidates, 10 Adam steps, no early exit). UNet calls are reported.

Default: the bundled digits model (50-step DDIM, CPU) on memorized prompts. --sd15: a
random-weight SD 1.5-sized UNet (for the GPU check; threshold from its own step-1 scores).

    pytest benchmarks/bench_sail.py --benchmark-only -s
    python benchmarks/bench_sail.py [--sd15 --device cuda --dtype float16] [--batch 4]
"""
from __future__ import annotations

import argparse
import statistics

import pytest
import torch
from bench_detect import interleaved_times  # the benchmarks' timing helpers live there (same folder)

import sharpfast

DEFAULT = "sail (paper, k1 s3)"  # sharpfast.sail's defaults (lr 0.7)


def setup(sd15=False, device="cpu", dtype=torch.float32, batch=4, sample_size=64, steps=50):
    if sd15:
        from sharpfast.testing import sd15_sized_pipeline

        pipe = sd15_sized_pipeline(dtype=dtype, device=device, sample_size=sample_size)
        prompts = [f"prompt number {i}" for i in range(batch)]
        det = sharpfast.detect(pipe, prompts, metrics=("wen", "sharpness"), progress=False,
                               generator=torch.Generator().manual_seed(0))
        thr = {m: float(v.median()) for m, v in det.scores.items()}
        thr["target"] = float(det.scores["sharpness"].min()) / 2  # unreachable: every Adam step is taken
    else:
        from sharpfast import zoo
        from sharpfast.calibration import shipped_threshold

        pipe = zoo.load("digits", device=device, dtype=dtype)
        prompts = [r["prompt"] for r in zoo.prompts("digits", "memorized")[:batch]]
        thr = {"wen": shipped_threshold(pipe, "wen"), "sharpness": shipped_threshold(pipe, "sharpness"),
               "target": shipped_threshold(pipe, "sharpness", "target")}
    pipe.set_progress_bar_config(disable=True)
    return pipe, prompts, steps, thr


def measure(sd15=False, device="cpu", dtype=torch.float32, batch=4, reps=7, sample_size=64, steps=50):
    pipe, prompts, steps, thr = setup(sd15, device, dtype, batch, sample_size, steps)
    kw = dict(num_inference_steps=steps, output_type="pt" if not sd15 else "latent")
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    info = {}

    def run_sail(name, k, s):
        info[name] = sharpfast.sail(pipe, prompts, generator=g(), threshold=thr["target"], candidates=k,
                                    max_steps=s, return_info=True, **kw)[1]

    def run_ref():
        info["ref"] = sharpfast.sail(pipe, prompts, generator=g(), objective="reference", candidates=8, max_steps=10,
                                     max_rounds=1, threshold=-1e30, return_info=True, **kw)[1]

    def run_guard():  # the hook is on pipe.unet only inside this row (its set-up is timed too)
        with sharpfast.guard(pipe, metric="wen", threshold=float("inf"), mitigation="sail") as guarded:
            guarded(prompts, generator=g(), **kw)

    def run_guard_flagged():  # every prompt flagged: decided at step 1, SAIL, one generation
        with sharpfast.guard(pipe, metric="wen", threshold=-1e30, mitigation="sail") as guarded:
            guarded(prompts, generator=g(), **kw)

    fns = {"plain": lambda: pipe(prompts, generator=g(), **kw), "guard (wen, unflagged)": run_guard,
           "guard (wen, flagged)": run_guard_flagged}
    for k, s in ((1, 3), (4, 3)):
        fns[f"sail (paper, k{k} s{s})"] = lambda k=k, s=s: run_sail(f"sail (paper, k{k} s{s})", k, s)
    fns["reference loop (k8 s10)"] = run_ref
    flagged_calls = _count_unet_calls(pipe, run_guard_flagged)
    secs = interleaved_times(fns, reps)
    calls = {"plain": steps, "guard (wen, unflagged)": steps, "guard (wen, flagged)": flagged_calls,
             "reference loop (k8 s10)": info["ref"]["unet_calls"]}
    med = statistics.median
    # ratios paired within a round (the same moment of the machine), then the median over rounds
    rows = {k: dict(seconds=med(v), vs_plain=med(a / b for a, b in zip(v, secs["plain"])),
                    calls=calls[k] if k in calls else info[k]["unet_calls"]) for k, v in secs.items()}
    rows["reference loop (k8 s10)"]["vs_sail"] = med(a / b for a, b in zip(secs["reference loop (k8 s10)"],
                                                                           secs[DEFAULT]))
    return rows, info


def _count_unet_calls(pipe, fn) -> int:
    n = [0]
    h = pipe.unet.register_forward_pre_hook(lambda m, a: n.__setitem__(0, n[0] + 1))
    try:
        fn()
    finally:
        h.remove()
    return n[0]


def report(rows, info, batch, steps=50):
    print(f"\n{batch} prompts, {steps}-step DDIM")
    print(f"  {'':26s} {'seconds':>8s} {'x plain':>8s} {'UNet calls':>10s}")
    for name, r in rows.items():
        print(f"  {name:26s} {r['seconds']:8.3f} {r['vs_plain']:8.2f} {r['calls']:10d}")
    s = info[DEFAULT]
    ratio = rows["reference loop (k8 s10)"]["vs_sail"]
    print(f"  {DEFAULT}: accepted {int(s['accepted'].sum())}/{len(s['accepted'])} images, {s['adam_steps']} Adam "
          f"steps; reference loop / SAIL time: {ratio:.1f}x")


@pytest.mark.parametrize("batch", [4])
def test_sail_and_guard_latency(benchmark, batch):
    rows, info = measure(batch=batch, reps=7)
    report(rows, info, batch)
    benchmark.extra_info.update({k: {kk: vv for kk, vv in v.items()} for k, v in rows.items()})
    benchmark.pedantic(lambda: None, rounds=1)
    assert all(targets_met(rows).values()), targets_met(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sd15", action="store_true", help="random-weight SD 1.5-sized UNet instead of the digits model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--sample-size", type=int, default=64, help="--sd15: latent side (64 = 512 px, as SD 1.5)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps of every generation")
    a = p.parse_args()
    rows, info = measure(a.sd15, a.device, getattr(torch, a.dtype), a.batch, a.reps, a.sample_size, a.steps)
    report(rows, info, a.batch, a.steps)
    missed = [name for name, ok in targets_met(rows).items() if not ok]
    if missed and a.steps == 50:  # the targets are for 50-step generation (the dry run uses 2)
        print(f"  TARGET MISSED: {', '.join(missed)}")
        return 1
    return 0


def targets_met(rows) -> dict:
    return {"guard <= 1.02x plain": rows["guard (wen, unflagged)"]["vs_plain"] <= 1.02,
            "flagged guard request <= 1.5x plain": rows["guard (wen, flagged)"]["vs_plain"] <= 1.5,
            "SAIL <= 1.5x plain": rows[DEFAULT]["vs_plain"] <= 1.5,
            "reference loop >= 3x SAIL": rows["reference loop (k8 s10)"]["vs_sail"] >= 3}


if __name__ == "__main__":
    import sys

    sys.exit(main())
