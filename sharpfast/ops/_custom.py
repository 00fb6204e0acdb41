"""The native backends as PyTorch custom operators (``torch.library``).

One operator per fused op, with the backend ("cpp", "cuda" or "triton") as a string argument.
Each has a fake implementation, so ``torch.compile`` and CUDA-graph capture can trace through
it without graph breaks, and an autograd formula written with torch ops, so every native
backend supports gradients (checked by ``torch.autograd.gradcheck`` in float64). The backward
formulas do not depend on the backend.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from . import _backends
from ._hash import rademacher_signs
from .reference import acc_dtype, as_rows


def _impl(backend: str) -> Any:
    return _backends.kernels(backend)


def _safe_unit(d: Tensor) -> tuple:
    """(d / ||d||, ||d||) per row, with a zero direction where ||d|| = 0."""
    norm = torch.linalg.vector_norm(d, dim=1, keepdim=True)
    positive = norm > 0
    unit = torch.where(positive, d / torch.where(positive, norm, torch.ones_like(norm)), torch.zeros_like(d))
    return unit, norm


def _unrow(g: Tensor, like: Tensor) -> Tensor:
    return g.reshape(like.shape).to(like.dtype)


# ---- cfg_combine ---------------------------------------------------------------------

@torch.library.custom_op("sharpfast::cfg_combine", mutates_args=())
def cfg_combine(eps_uncond: Tensor, eps_cond: Tensor, guidance_scale: float, backend: str) -> tuple[Tensor, Tensor]:
    guided, norm = _impl(backend).cfg_combine(eps_uncond, eps_cond, guidance_scale)
    return guided, norm


@cfg_combine.register_fake
def _(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float, backend: str) -> tuple:
    return torch.empty_like(eps_uncond), eps_uncond.new_empty(eps_uncond.shape[0], dtype=acc_dtype(eps_uncond.dtype))


def _cfg_setup(ctx: Any, inputs: Any, output: Any) -> None:
    eps_uncond, eps_cond, guidance_scale, _ = inputs
    ctx.save_for_backward(eps_uncond, eps_cond)
    ctx.w = guidance_scale


def _cfg_backward(ctx: Any, g_guided, g_norm) -> tuple:
    u, c = ctx.saved_tensors
    unit, _ = _safe_unit(as_rows(c) - as_rows(u))
    gg, gn = as_rows(g_guided), g_norm.to(unit.dtype)[:, None]
    grad_c = ctx.w * gg + gn * unit
    grad_u = (1.0 - ctx.w) * gg - gn * unit
    return _unrow(grad_u, u), _unrow(grad_c, c), None, None


cfg_combine.register_autograd(_cfg_backward, setup_context=_cfg_setup)


# ---- rademacher_perturb --------------------------------------------------------------

@torch.library.custom_op("sharpfast::rademacher_perturb", mutates_args=())
def rademacher_perturb(x: Tensor, num_probes: int, h: float, seed: int, central: bool, backend: str) -> Tensor:
    return _impl(backend).rademacher_perturb(x, num_probes, h, seed, central)


@rademacher_perturb.register_fake
def _(x: Tensor, num_probes: int, h: Any, seed: int, central: Optional[bool], backend: str) -> Any:
    n = 2 * num_probes if central else num_probes
    return x.new_empty((n * x.shape[0], *x.shape[1:]))


def _perturb_setup(ctx: Any, inputs: Any, output: Any) -> None:
    x = inputs[0]
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype


def _perturb_backward(ctx: Any, g: Any) -> tuple:
    grad = g.to(acc_dtype(g.dtype)).reshape(-1, *ctx.x_shape).sum(dim=0)
    return grad.to(ctx.x_dtype), None, None, None, None, None


rademacher_perturb.register_autograd(_perturb_backward, setup_context=_perturb_setup)


# ---- hutchinson_reduce ---------------------------------------------------------------

@torch.library.custom_op("sharpfast::hutchinson_reduce", mutates_args=())
def hutchinson_reduce(y_probes: Tensor, y0: Optional[Tensor], num_probes: int, h: float, seed: int, central: bool,
                      backend: str) -> Tensor:
    return _impl(backend).hutchinson_reduce(y_probes, y0, num_probes, h, seed, central)


@hutchinson_reduce.register_fake
def _(y_probes: torch.Tensor, y0: torch.Tensor, num_probes: int, h: Any, seed: int, central: Optional[bool],
      backend: str) -> Any:
    n = 2 * num_probes if central else num_probes
    return y_probes.new_empty(y_probes.shape[0] // n, dtype=acc_dtype(y_probes.dtype))


def _hutch_setup(ctx: Any, inputs: Any, output: Any) -> None:
    y_probes, y0, num_probes, h, seed, central, _ = inputs
    ctx.meta = (y_probes.shape, y_probes.dtype, None if y0 is None else (y0.shape, y0.dtype))
    ctx.args = (num_probes, h, seed, central)


def _hutch_backward(ctx: Any, g_trace) -> tuple:
    (y_shape, y_dtype, y0_meta), (K, h, seed, central) = ctx.meta, ctx.args
    n = 2 * K if central else K
    D = y_shape.numel() // y_shape[0]
    v = rademacher_signs(K, D, seed, g_trace.device, acc_dtype(y_dtype))[:, None, :]  # (K, 1, D)
    g = g_trace.to(v.dtype)[None, :, None] / (n * h)  # (1, B, 1)
    grad_plus = v * g  # (K, B, D)
    grad_y = torch.cat([grad_plus, -grad_plus]) if central else grad_plus
    grad_y0 = None
    if y0_meta is not None:
        grad_y0 = torch.zeros(y0_meta[0], dtype=y0_meta[1], device=g_trace.device) if central else \
            (-grad_plus.sum(dim=0)).reshape(y0_meta[0]).to(y0_meta[1])
    return grad_y.reshape(y_shape).to(y_dtype), grad_y0, None, None, None, None, None


hutchinson_reduce.register_autograd(_hutch_backward, setup_context=_hutch_setup)


# ---- fd_direction --------------------------------------------------------------------

@torch.library.custom_op("sharpfast::fd_direction", mutates_args=())
def fd_direction(x: Tensor, eps_uncond: Tensor, eps_cond: Tensor, h: float, backend: str) -> Tensor:
    return _impl(backend).fd_direction(x, eps_uncond, eps_cond, h)


@fd_direction.register_fake
def _(x: Tensor, eps_uncond: torch.Tensor, eps_cond: torch.Tensor, h: Any, backend: str) -> Any:
    return torch.empty_like(x)


def _fd_setup(ctx: Any, inputs: Any, output: Any) -> None:
    x, u, c, h, _ = inputs
    ctx.save_for_backward(u, c)
    ctx.h, ctx.x_dtype = h, x.dtype


def _fd_backward(ctx: Any, g: Any) -> tuple:
    u, c = ctx.saved_tensors
    unit, norm = _safe_unit(as_rows(c) - as_rows(u))
    gr = as_rows(g)
    # d/dd of h d/||d||: (h/||d||) (I - unit unit^T); zero where the difference is zero
    scale = torch.where(norm > 0, ctx.h / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    grad_d = scale * (gr - unit * (unit * gr).sum(dim=1, keepdim=True))
    return g.to(ctx.x_dtype), _unrow(-grad_d, u), _unrow(grad_d, c), None, None


fd_direction.register_autograd(_fd_backward, setup_context=_fd_setup)


# ---- diff_of_diffs_norm --------------------------------------------------------------

@torch.library.custom_op("sharpfast::diff_of_diffs_norm", mutates_args=())
def diff_of_diffs_norm(u0: Tensor, c0: Tensor, u1: Tensor, c1: Tensor, backend: str) -> Tensor:
    return _impl(backend).diff_of_diffs_norm(u0, c0, u1, c1)


@diff_of_diffs_norm.register_fake
def _(u0, c0, u1, c1, backend: str) -> Any:
    return u0.new_empty(u0.shape[0], dtype=acc_dtype(u0.dtype))


def _dod_setup(ctx: Any, inputs: Any, output: Any) -> None:
    ctx.save_for_backward(*inputs[:4])


def _dod_backward(ctx: Any, g: Any) -> tuple:
    u0, c0, u1, c1 = ctx.saved_tensors
    unit, _ = _safe_unit((as_rows(c1) - as_rows(u1)) - (as_rows(c0) - as_rows(u0)))
    gr = g.to(unit.dtype)[:, None] * unit
    return _unrow(gr, u0), _unrow(-gr, c0), _unrow(-gr, u1), _unrow(gr, c1), None


diff_of_diffs_norm.register_autograd(_dod_backward, setup_context=_dod_setup)
