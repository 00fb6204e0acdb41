"""What the guard's flagged path costs: guarded / plain generation, ratios in one run.

Rows, each timed round-robin against plain `pipe(...)` with the same prompts and generators
(median of the per-round ratios, so that a slow moment of the machine falls on both):

    unflagged   guard(defaults, threshold inf): scoring only             target <= 1.05
    flagged     guard(defaults, every prompt flagged): decide at step 1,
                the model's calibrated mitigation (digits: drop_trigger,
                its word search; else transition), one generation        target <= 1.5
                (issue 32's bound for mitigated requests; 1.10 while the
                default was the zero-cost transition)
    always      guard(policy="always"): the mitigation planned before the
                generation on every prompt, none restarted              target <= 1.05
    tiered      guard(policy="always,0.01:s0t200", scenes' calibrated policy): every
                prompt mitigated, the tier decided at step 1 and switched
                online (no step restarted); wen_low's scoring call      target <= 1.05
    drop        guard(mitigation="drop_trigger", every prompt flagged):
                the trigger search (words + 2 CFG calls per prompt, 4
                batched network calls), the new prompts, one generation   target <= 1.5
    sail        guard(mitigation="sail_guard", every prompt flagged)     (reported)
    unflagged@n unflagged with metric="wen_low@n" (n probe noises: the
                scoring call on n times the rows)                        target <= 1.05

on the bundled digits model (4 memorized prompts, 50 DDIM steps) and on the SD 1.5-sized random
UNet of bench_sd15_cpu.py (860 M parameters, 4x16x16 latents, 2 prompts, 10 steps, no SAIL row,
to keep that part near 5 minutes on 2 cores; at 10 steps the flagged path's fixed costs, the
wen_low call and the restarted first step, weigh 5x more than at 50).

    python benchmarks/bench_guard.py                      # both models, prints the table
    python benchmarks/bench_guard.py --model digits       # one of them
    pytest benchmarks/bench_guard.py --benchmark-only -s  # the same, asserting the targets
"""
from __future__ import annotations

import argparse
import statistics

import torch
from bench_detect import interleaved_times  # the benchmarks' timing helpers (same folder)

import sharpfast

TARGETS = {"unflagged": 1.05, "flagged": 1.5, "always": 1.05, "tiered": 1.05, "drop": 1.5}
TIERED = "always,0.01:s0t200"


def _guard(pipe, kind: str, name: str):
    """The guard of one row (see the module's table)."""
    kind, _, n = kind.partition("@")
    metric = f"wen_low@{n}" if n else sharpfast.settings.GUARD_METRIC
    if kind == "tiered":
        return sharpfast.guard(pipe, policy=TIERED, name=name)
    method = {"sail": "sail_guard", "drop": "drop_trigger"}.get(kind, "auto")
    return sharpfast.guard(pipe, threshold=float("inf") if kind in ("unflagged", "always") else -1e30,
                           mitigation=method, name=name, metric=metric,
                           policy="always" if kind == "always" else None)


def setup(model: str, sd15_steps: int = 10):
    if model in ("digits", "scenes"):
        pipe = sharpfast.zoo.load(model)
        prompts = [r["prompt"] for r in sharpfast.zoo.prompts(model, "memorized")[:4]]
        steps = 50
    else:
        from sharpfast.testing import sd15_sized_pipeline

        pipe = sd15_sized_pipeline(sample_size=16)
        prompts = ["a photo of a cat", "an oil painting of a harbour"]
        steps = sd15_steps
    pipe.set_progress_bar_config(disable=True)
    return pipe, prompts, steps


def measure(model: str, reps: int = 5, sd15_steps: int = 10, warmup: bool = True, rows: tuple = ()) -> dict:
    pipe, prompts, steps = setup(model, sd15_steps)
    kw = dict(num_inference_steps=steps, output_type="latent")
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(len(prompts))]  # noqa: E731
    probe = sharpfast.guard(pipe, threshold=-1e30, name="flagged")
    used = probe.mitigation
    probe.remove()  # each row makes its own guard: its hook is on only while that row runs

    def run(kind):
        def fn():
            g = _guard(pipe, kind, kind)
            try:
                out = g(prompts, generator=gens(), **kw)
            finally:
                g.remove()
            return out
        return fn

    fns = {"plain": lambda: pipe(prompts, generator=gens(), **kw), "unflagged": run("unflagged"),
           "flagged": run("flagged"), "always": run("always"), "tiered": run("tiered"), "drop": run("drop")}
    if model == "digits":
        fns["sail"] = run("sail")
    fns.update({r: run(r) for r in rows if r.startswith("unflagged@")})
    if rows:
        fns = {k: f for k, f in fns.items() if k == "plain" or k in rows}
    if not warmup:  # no full warm-up call per row: one short call of each row warms torch and the hooks
        short = dict(kw, num_inference_steps=2)
        pipe(prompts, generator=gens(), **short)
        for kind in [k for k in fns if k != "plain"]:
            g = _guard(pipe, kind, "warm")
            try:
                g.calibrate(num_inference_steps=steps)  # (the tiers' cuts: resolved before any timing)
                g(prompts, generator=gens(), **short)
            finally:
                g.remove()
    secs = interleaved_times(fns, reps, warmup=warmup)
    med = statistics.median
    rows = {k: {"seconds": med(v), "vs_plain": med(a / b for a, b in zip(v, secs["plain"]))} for k, v in secs.items()}
    if "flagged" in rows:
        rows["flagged"]["mitigation"] = used
    return rows


def report(model, rows) -> str:
    lines = [f"{model}: {'row':10s} {'seconds':>8s} {'vs plain':>9s}"]
    for k, r in rows.items():
        base = k.partition("@")[0]
        target = f"  (target <= {TARGETS[base]})" if base in TARGETS else ""
        lines.append(f"{'':{len(model) + 2}s}{k:10s} {r['seconds']:8.3f} {r['vs_plain']:8.3f}x{target}"
                     f"{'  ' + r['mitigation'] if 'mitigation' in r else ''}")
    return "\n".join(lines)


def test_guard_flagged_path(benchmark):
    rows = benchmark.pedantic(lambda: measure("digits"), rounds=1, iterations=1)
    print(report("digits", rows))
    for k, target in TARGETS.items():
        assert rows[k]["vs_plain"] <= target, (k, rows[k])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("digits", "scenes", "sd15", "both"), default="both",
                    help="both: digits and sd15; scenes: the second bundled model (its policy is the tiered row)")
    ap.add_argument("--reps", type=int, default=0, help="rounds (default 5; 2 for sd15)")
    ap.add_argument("--sd15-steps", type=int, default=10, help="sampler steps on the SD 1.5-sized UNet (default 10; "
                    "50 as served: about 10 minutes a round of the three rows on 2 cores)")
    ap.add_argument("--no-warmup", action="store_true", help="no warm-up call per row (the first round is timed)")
    ap.add_argument("--rows", default="", help="comma list of the rows to time beside plain (default: all; "
                    "unflagged@4: scoring only with wen_low@4)")
    a = ap.parse_args()
    for m in (("digits", "sd15") if a.model == "both" else (a.model,)):
        rows = measure(m, a.reps or (2 if m == "sd15" else 5), a.sd15_steps, warmup=not a.no_warmup,
                       rows=tuple(r for r in a.rows.split(",") if r))
        print(report(m, rows), flush=True)
