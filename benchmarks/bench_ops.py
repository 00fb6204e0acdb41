"""Fused ops against the unfused torch sequences they replace, on the CPU, fp32.

Sizes: SD 1.5 latents (B=8, 4x64x64) and SDXL latents (B=4, 4x128x128). Target: the cpp backend
at least 1.5x faster than the unfused torch sequence. Both sides are timed in the same run,
interleaved, by the same clock; the ratio is asserted and the effective bandwidth printed.

    pytest benchmarks/bench_ops.py --benchmark-only -s     # pytest-benchmark table + ratios
    python benchmarks/bench_ops.py                         # just the table
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from sharpfast import ops

SIZES = {"sd15": (8, 4, 64, 64), "sdxl": (4, 4, 128, 128)}
K, H, W = 4, 0.01, 7.5
TARGET = 1.5


def _unfused(name, t):
    """The plain torch sequence each fused op replaces (what one writes without sharpfast)."""
    if name == "cfg_combine":
        def f():
            d = t["c"] - t["u"]
            return t["u"] + W * d, torch.linalg.vector_norm(d.flatten(1), dim=1)
    elif name == "rademacher_perturb":
        def f():
            v = torch.randint(0, 2, (K, *t["x"].shape[1:]), dtype=t["x"].dtype) * 2 - 1
            return (t["x"][None] + H * v[:, None]).flatten(0, 1)
    elif name == "hutchinson_reduce":
        v = t["v"]  # the unfused path stores its probes

        def f():
            B = t["y0"].shape[0]
            diff = t["y"].view(K, B, -1) - t["y0"].view(1, B, -1)
            return (v.view(K, 1, -1) * diff).sum(dim=(0, 2)) / (K * H)
    elif name == "fd_direction":
        def f():
            d = t["c"] - t["u"]
            n = torch.linalg.vector_norm(d.flatten(1), dim=1).view(-1, *([1] * (d.dim() - 1)))
            return t["x"] + H * d / n
    else:
        def f():
            r = (t["c1"] - t["u1"]) - (t["c"] - t["u"])
            return torch.linalg.vector_norm(r.flatten(1), dim=1)
    return f


def _fused(name, t, backend):
    calls = {
        "cfg_combine": lambda: ops.cfg_combine(t["u"], t["c"], W, backend=backend),
        "rademacher_perturb": lambda: ops.rademacher_perturb(t["x"], K, H, 0, backend=backend),
        "hutchinson_reduce": lambda: ops.hutchinson_reduce(t["y"], t["y0"], K, H, 0, backend=backend),
        "fd_direction": lambda: ops.fd_direction(t["x"], t["u"], t["c"], H, backend=backend),
        "diff_of_diffs_norm": lambda: ops.diff_of_diffs_norm(t["u"], t["c"], t["u1"], t["c1"], backend=backend),
    }
    return calls[name]


def _bytes(name, shape):
    """Bytes the fused op must move (fp32): reads + writes."""
    n = torch.Size(shape).numel() * 4
    return {"cfg_combine": 3 * n, "rademacher_perturb": n + K * n, "hutchinson_reduce": K * n + n,
            "fd_direction": 4 * n, "diff_of_diffs_norm": 4 * n}[name]


def _inputs(shape):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B = shape[0]
    return {"u": r(*shape), "c": r(*shape), "x": r(*shape), "u1": r(*shape), "c1": r(*shape),
            "y": r(K * B, *shape[1:]), "y0": r(*shape), "v": torch.randint(0, 2, (K, *shape[1:])).float() * 2 - 1}


def compare(name, shape, backend="cpp", rounds=15):
    """Median seconds of the unfused sequence and the fused op, interleaved in one run."""
    t = _inputs(shape)
    base, fused = _unfused(name, t), _fused(name, t, backend)
    for f in (base, fused):  # warm up
        f()
    tb, tf = [], []
    for _ in range(rounds):
        for f, acc in ((base, tb), (fused, tf)):
            s = time.perf_counter()
            f()
            acc.append(time.perf_counter() - s)
    return statistics.median(tb), statistics.median(tf)


OPS = ["cfg_combine", "rademacher_perturb", "hutchinson_reduce", "fd_direction", "diff_of_diffs_norm"]


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", OPS)
def test_cpp_beats_unfused_torch(benchmark, name, size):
    if "cpp" not in ops.available_backends():
        pytest.skip("C++ extension not built")
    shape = SIZES[size]
    t_base, t_fused = compare(name, shape)
    speedup = t_base / t_fused
    gbs = _bytes(name, shape) / t_fused / 1e9
    benchmark.group = f"{name}-{size}"
    benchmark.extra_info.update(unfused_ms=t_base * 1e3, speedup=speedup, gb_per_s=gbs)
    benchmark.pedantic(_fused(name, _inputs(shape), "cpp"), rounds=10, warmup_rounds=1)
    print(f"\n{name:20s} {size:5s} unfused {t_base * 1e3:7.2f} ms  cpp {t_fused * 1e3:7.2f} ms  "
          f"x{speedup:5.2f}  {gbs:6.1f} GB/s")
    assert speedup >= TARGET, f"{name} {size}: cpp only {speedup:.2f}x the unfused torch sequence"


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backends {ops.available_backends()}")
    print(f"{'op':20s} {'size':5s} {'unfused ms':>10s} {'cpp ms':>8s} {'speedup':>8s} {'GB/s':>6s}")
    for name in OPS:
        for size, shape in SIZES.items():
            tb, tf = compare(name, shape)
            print(f"{name:20s} {size:5s} {tb * 1e3:10.2f} {tf * 1e3:8.2f} {tb / tf:8.2f} "
                  f"{_bytes(name, shape) / tf / 1e9:6.1f}")


if __name__ == "__main__":
    main()
