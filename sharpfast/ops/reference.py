"""The torch backend: readable reference implementations of the fused ops.

Each function computes in float32 (float64 for float64 inputs), returns the elementwise
result in the input dtype and per-sample reductions in the accumulation dtype. They support
autograd and any device. The native backends (C++, CUDA, Triton) must agree with these.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ._hash import rademacher_signs


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of a storage dtype: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(B, D) view in the accumulation dtype."""
    return t.to(acc_dtype(t.dtype)).reshape(t.shape[0], -1)


def _row_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dim=1)


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> tuple:
    """eps_u + g (eps_c - eps_u)."""
    u, c = as_rows(eps_uncond), as_rows(eps_cond)
    d = c - u
    guided = (u + guidance_scale * d).to(eps_uncond.dtype).reshape(eps_uncond.shape)
    return guided, _row_norm(d)


def rademacher_perturb(x: Tensor, num_probes: int, h: Any, seed: int, central: bool = False) -> torch.Tensor:
    """x + h v_k for each Rademacher probe v_k (and x - h v_k when central)."""
    rows = as_rows(x)
    v = rademacher_signs(num_probes, rows.shape[1], seed, x.device, rows.dtype)[:, None, :]
    out = rows[None] + h * v
    if central:
        out = torch.cat([out, rows[None] - h * v])
    return out.to(x.dtype).reshape(-1, *x.shape[1:])


def hutchinson_reduce(y_probes: torch.Tensor, y0: Optional[torch.Tensor], num_probes: int, h: Any, seed: int,
                      central: bool = False) -> torch.Tensor:
    """The Hutchinson trace estimate from the probes' outputs (forward or central differences)."""
    y = as_rows(y_probes)
    n = 2 * num_probes if central else num_probes
    y = y.reshape(n, -1, y.shape[1])
    if central:
        diff, scale = y[:num_probes] - y[num_probes:], 1.0 / (2 * num_probes * h)
    else:
        assert y0 is not None, "forward differences need y0"
        diff, scale = y - as_rows(y0)[None], 1.0 / (num_probes * h)
    v = rademacher_signs(num_probes, y.shape[2], seed, y.device, y.dtype)[:, None, :]
    return (v * diff).sum(dim=(0, 2)) * scale


def fd_direction(x: Tensor, eps_uncond: torch.Tensor, eps_cond: torch.Tensor, h: Any) -> torch.Tensor:
    """x + h (eps_c - eps_u) / ||eps_c - eps_u|| per sample."""
    d = as_rows(eps_cond) - as_rows(eps_uncond)
    norm = _row_norm(d)[:, None]
    positive = norm > 0  # a zero difference has no direction: no shift
    scale = torch.where(positive, h / torch.where(positive, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    return (as_rows(x) + scale * d).to(x.dtype).reshape(x.shape)


def diff_of_diffs_norm(u0, c0, u1, c1) -> Any:
    """||(c1 - u1) - (c0 - u0)|| per sample."""
    return _row_norm((as_rows(c1) - as_rows(u1)) - (as_rows(c0) - as_rows(u0)))
