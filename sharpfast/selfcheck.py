"""`sharpfast selfcheck`: every available backend of every fused op against the torch
reference on fresh random inputs, with a timing per op. Exits non-zero on a mismatch."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from . import ops

SHAPE = (8, 4, 64, 64)  # SD 1.5 latents
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def _cases(dtype: Any, device: Any) -> dict:
    g = torch.Generator().manual_seed(int(time.time()))
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    u, c, x, u1 = (r(*SHAPE) for _ in range(4))
    y = r(4 * SHAPE[0], *SHAPE[1:])
    return {
        "cfg_combine": lambda be: ops.cfg_combine(u, c, 7.5, backend=be),
        "rademacher_perturb": lambda be: ops.rademacher_perturb(x, 4, 0.01, 1, backend=be),
        "hutchinson_reduce": lambda be: ops.hutchinson_reduce(y, x, 4, 0.01, 1, backend=be),
        "fd_direction": lambda be: ops.fd_direction(x, u, c, 0.01, backend=be),
        "diff_of_diffs_norm": lambda be: ops.diff_of_diffs_norm(u, c, u1, x, backend=be),
    }


def _rel_err(a, b) -> Any:
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return max(((p.double() - q.double()).abs().max() / (q.double().abs().max() + 1e-12)).item() for p, q in zip(a, b))


def _time(fn: Callable, device: Any, reps: int = 10) -> Any:
    fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - s)
    return statistics.median(samples)


def run(device: str = "auto") -> int:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    backends = [b for b in ops.available_backends() if b == "torch" or
                (b == "cpp") == (dev.type == "cpu")]
    print(f"sharpfast selfcheck: torch {torch.__version__}, device {dev}, backends available: "
          f"{', '.join(ops.available_backends())}; checking {', '.join(backends)} on latents {SHAPE}")
    print(f"{'op':20s} {'dtype':9s} " + " ".join(f"{b + ' err':>11s} {b + ' ms':>9s}" for b in backends))
    failures = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for name, call in _cases(dtype, dev).items():
            ref = call("torch")
            cells = []
            for b in backends:
                err = _rel_err(call(b), ref)
                ok = err <= TOL[dtype]
                failures += not ok
                cells.append(f"{err:11.1e}{'' if ok else '!'} {_time(lambda: call(b), dev) * 1e3:9.3f}")
            print(f"{name:20s} {str(dtype).replace('torch.', ''):9s} " + " ".join(cells))
    print("selfcheck:", "OK" if failures == 0 else f"{failures} MISMATCHES against the torch reference")
    return 0 if failures == 0 else 1
