"""Hutchinson trace estimation of a Jacobian with one batched call of the function."""
from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from . import _validate
from .fused import hutchinson_reduce, rademacher_perturb


def hutchinson_trace(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, num_probes: int, h: float,
                     seed: int = 0, central: bool = False, *, y0: Optional[torch.Tensor] = None,
                     backend: str = "auto") -> torch.Tensor:
    """Per-sample estimate of tr(d fn / d x) at x, shape (B,).

    ``fn`` maps a batch (N, ...) to a batch (N, ...) sample by sample (a score function, say).
    Each Jacobian-vector product is a finite difference along a Rademacher probe v_k:
    ``J v_k ~ (fn(x + h v_k) - fn(x)) / h`` (or the central difference), and
    ``tr J ~ (1/K) sum_k v_k . J v_k``. ``fn`` is called ONCE, on a batch holding the base
    points and all K probe points (forward differences; pass ``y0 = fn(x)`` if you already have
    it, and only the probe points are evaluated) or the 2K probe points (central).

    For a linear ``fn`` the finite difference is exact, so the estimate is exact (up to rounding)
    for a diagonal Jacobian. The probes are a pure function of ``seed``: the same seed gives the
    same estimate on every backend.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    _validate.tensor(x, "x")
    probes = rademacher_perturb(x, num_probes, h, seed, central, backend=backend)
    B = x.shape[0]
    need_base = not central and y0 is None
    inputs = torch.cat([x, probes]) if need_base else probes
    y = fn(inputs)
    if not isinstance(y, torch.Tensor) or y.shape != inputs.shape:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"fn must map a batch of shape {tuple(inputs.shape)} to the same shape, got {got}")
    if need_base:
        y0, y = y[:B], y[B:]
    elif y0 is not None and y0.dtype != y.dtype:
        y0 = y0.to(y.dtype)
    return hutchinson_reduce(y, None if central else y0, num_probes, h, seed, central, backend=backend)
