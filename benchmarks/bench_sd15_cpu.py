"""Serving overheads on a real-sized network, on a CPU: ratios in one run.

The tiny digits UNet (about 1 ms a row) cannot tell sharpfast's own overhead from compute. This
uses a random-weight UNet with Stable Diffusion 1.5's architecture (860 M parameters, fp32) and
measures, each as a ratio against its baseline timed in the same rounds (round-robin, median of
the per-round ratios):

    detection   sharpness (fd) at step 1 / one bare CFG UNet call       target <= 2.1
    scan        scan prompts/s / prompts/s of the bare CFG forwards     target >= 0.9
    guard       guard (wen, unflagged) / plain 50-step generation       target <= 1.02
    SAIL        sail() defaults (k1 s3, every step taken) / plain       target <= 1.5

Detection and scan run at a 4x32x32 latent (256 px; scan: 8 prompts in batches of 2, so its
fixed end-of-scan merge and histogram are part of the cost); the 50-step generations at
4x16x16 (128 px), to keep the whole benchmark near 12 minutes on 2 cores.

    python benchmarks/bench_sd15_cpu.py                 # prints the table (about 10 min)
    pytest benchmarks/bench_sd15_cpu.py --benchmark-only -s   # the same, asserting the targets
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from bench_detect import interleaved_times  # the benchmarks' timing helpers (same folder)
from bench_scan import bare_forward_rate

import sharpfast

TARGETS = {"detect": ("<=", 2.1), "scan": (">=", 0.9), "guard": ("<=", 1.02), "sail": ("<=", 1.5)}


def _paired(a, b):
    return statistics.median(x / y for x, y in zip(a, b))


def detection(pipe, rounds):
    from sharpfast.adapters import ScoreModel
    from sharpfast.scores import step_metrics

    model = ScoreModel(pipe)
    h, w = model.default_size()
    sched = model.scheduler(50)
    t = sched.timesteps[0]
    prompts = ["a photograph of a red bicycle"]
    cond = model.encode(prompts, 1, h, w)
    x = sched.scale_model_input(model.initial_latents(sched, 1, h, w, torch.Generator().manual_seed(0)), t)
    ab = model.alpha_bar(sched, t)
    before = model.stats["unet_calls"]
    with torch.no_grad():
        step_metrics(model, x, t, ab, cond, ("wen", "sharpness"), 7.5, prompts=prompts, n=1)
        calls = model.stats["unet_calls"] - before
        secs = interleaved_times({
            "cfg": lambda: model.predict(x, t, cond),
            "sharpness": lambda: step_metrics(model, x, t, ab, cond, ("wen", "sharpness"), 7.5, prompts=prompts, n=1),
        }, rounds)
    return dict(ratio=_paired(secs["sharpness"], secs["cfg"]), seconds=statistics.median(secs["sharpness"]),
                base=statistics.median(secs["cfg"]), calls=calls, unit="s per prompt vs one CFG call")


def scan(pipe, rounds, batch=2, count=8):
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "p.txt")
        with open(src, "w") as f:
            f.writelines(f"a photograph of object number {i}\n" for i in range(count))
        k = [0]

        def run_scan():  # a fresh output folder each time: a full scan, never a resume
            k[0] += 1
            sharpfast.scan(pipe, src, os.path.join(d, f"out{k[0]}"), metrics=("wen", "sharpness"), batch_size=batch,
                           progress=False)

        rates = {"scan": [], "bare": []}
        run_scan()  # warm-up
        for _ in range(rounds):
            s = time.perf_counter()
            run_scan()
            rates["scan"].append(count / (time.perf_counter() - s))
            rates["bare"].append(bare_forward_rate(pipe, batch, calls_per_batch=2, reps=count // batch))
    return dict(ratio=_paired(rates["scan"], rates["bare"]), seconds=statistics.median(rates["scan"]),
                base=statistics.median(rates["bare"]), calls=2, unit="prompts/s vs bare forwards")


def generation(pipe, rounds, size=128, steps=50):
    prompts = ["a photograph of a red bicycle"]
    kw = dict(num_inference_steps=steps, height=size, width=size, output_type="latent")
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    info = {}

    def run_guard():
        with sharpfast.guard(pipe, threshold=float("inf"), mitigation=None) as guarded:
            guarded(prompts, generator=g(), **kw)

    def run_sail():  # threshold 0 is never reached: every Adam step is taken (the worst case)
        info["sail"] = sharpfast.sail(pipe, prompts, generator=g(), threshold=0.0, return_info=True, **kw)[1]

    pipe(prompts, generator=g(), **{**kw, "num_inference_steps": 2})  # warm-up
    secs = interleaved_times({"plain": lambda: pipe(prompts, generator=g(), **kw), "guard": run_guard,
                              "sail": run_sail}, rounds, warmup=False)
    return {
        "guard": dict(ratio=_paired(secs["guard"], secs["plain"]), seconds=statistics.median(secs["guard"]),
                      base=statistics.median(secs["plain"]), calls=steps, unit="s vs plain 50-step generation"),
        "sail": dict(ratio=_paired(secs["sail"], secs["plain"]), seconds=statistics.median(secs["sail"]),
                     base=statistics.median(secs["plain"]), calls=info["sail"]["unet_calls"],
                     unit=f"s vs plain ({info['sail']['adam_steps']} Adam steps)"),
    }


def measure(rounds=2, gen_rounds=2, sample_size=32, only=("detect", "scan", "generation")):
    from sharpfast.testing import sd15_sized_pipeline

    torch.manual_seed(0)
    pipe = sd15_sized_pipeline(sample_size=sample_size)
    pipe.set_progress_bar_config(disable=True)
    rows = {}
    if "detect" in only:
        rows["detect"] = detection(pipe, rounds)
    if "scan" in only:
        rows["scan"] = scan(pipe, rounds)
    if "generation" in only:
        rows.update(generation(pipe, gen_rounds))
    return rows


def report(rows):
    print(f"\nSD 1.5-sized UNet (860 M, random weights), fp32, CPU ({torch.get_num_threads()} threads)")
    print(f"  {'row':8s} {'ratio':>7s} {'target':>8s} {'UNet calls':>10s}  {'value':>9s} {'baseline':>9s}  unit")
    for name, r in rows.items():
        op, lim = TARGETS[name]
        print(f"  {name:8s} {r['ratio']:7.3f} {op + str(lim):>8s} {r['calls']:10d}  {r['seconds']:9.2f} "
              f"{r['base']:9.2f}  {r['unit']}")


def met(rows):
    return {k: (r["ratio"] <= TARGETS[k][1]) if TARGETS[k][0] == "<=" else (r["ratio"] >= TARGETS[k][1])
            for k, r in rows.items()}


def test_sd15_sized_overheads(benchmark):
    rows = measure()
    report(rows)
    benchmark.extra_info.update(rows)
    benchmark.pedantic(lambda: None, rounds=1)
    assert all(met(rows).values()), met(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds of the detection and scan rows")
    p.add_argument("--gen-rounds", type=int, default=2, help="rounds of the 50-step generation rows")
    p.add_argument("--only", default="detect,scan,generation", help="comma list of detect, scan, generation")
    a = p.parse_args()
    s = time.perf_counter()
    rows = measure(a.rounds, a.gen_rounds, only=tuple(a.only.split(",")))
    report(rows)
    print(f"  targets met: {met(rows)}; {time.perf_counter() - s:.0f} s in all")


if __name__ == "__main__":
    main()
