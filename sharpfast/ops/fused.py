"""Public fused ops of sharpfast.

Every op takes ``backend="auto" | "torch" | "cpp" | "cuda" | "triton"``. "torch" is the
readable reference (``reference.py``); the native backends run as ``torch.library`` custom
operators (``_custom.py``) and all of them support autograd. "auto" picks cuda (else triton)
for CUDA tensors, cpp for CPU tensors, torch when nothing native is built.

Shapes: tensors are batches (B, ...) with B >= 1; "per sample" means over all non-batch
elements. Elementwise outputs keep the input dtype; per-sample reductions are float32
(float64 for float64 inputs) and accumulate in float32 or wider. Non-contiguous inputs are
accepted (native backends copy them to contiguous memory first). Values are not checked for
NaN / inf, which would need a device sync; they propagate to the outputs.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from . import _backends, _custom, _validate, reference
from ._backends import resolve


def _contig(*ts: Any) -> list:
    return [t.contiguous() if t is not None else None for t in ts]


def _native(op: str, backend: str, tensors, *args: Any) -> Any:
    """Run a native op. Plain eager calls without autograd go straight to the kernels (the
    custom-operator machinery costs tens of microseconds a call, as much as the kernel at SD
    sizes); under torch.compile, with gradients or with tensor subclasses (fake tensors), the
    registered torch.library operator runs instead."""
    tensors = _contig(*tensors)
    plain = not torch.compiler.is_compiling() and all(t is None or type(t) is torch.Tensor for t in tensors)
    if plain and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        return getattr(_backends.kernels(backend), op)(*tensors, *args)
    return getattr(_custom, op)(*tensors, *args, backend)


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float, *,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance and Wen et al.'s metric in one pass over memory.

    Returns ``(guided, diff_norm)``: ``guided = u + w (c - u)`` in the input dtype, and
    ``diff_norm[b] = ||c_b - u_b||_2`` over all non-batch elements.
    """
    _validate.tensor(eps_uncond, "eps_uncond")
    _validate.like(eps_cond, "eps_cond", eps_uncond, "eps_uncond")
    w = _validate.finite(guidance_scale, "guidance_scale")
    name = resolve(backend, eps_uncond.device)
    if name == "torch":
        return reference.cfg_combine(eps_uncond, eps_cond, w)
    return _native("cfg_combine", name, (eps_uncond, eps_cond), w)


def rademacher_perturb(x: torch.Tensor, num_probes: int, h: float, seed: int, central: bool = False, *,
                       backend: str = "auto") -> torch.Tensor:
    """The probe batch ``x + h v_k`` for k = 0..num_probes-1 (then ``x - h v_k`` when central).

    Output shape ``(num_probes * B, ...)`` (``(2 * num_probes * B, ...)`` when central), probe-major:
    row ``k * B + b`` is sample b shifted along probe k. ``v_k`` has Rademacher entries (+1/-1)
    that are a pure function of (seed, k, element index within a sample), identical on every
    backend (see :func:`sharpfast.ops.rademacher_signs`).
    """
    _validate.tensor(x, "x")
    K = _validate.count(num_probes, "num_probes")
    h = _validate.positive(h, "h")
    seed = _validate.seed(seed)
    name = resolve(backend, x.device)
    if name == "torch":
        return reference.rademacher_perturb(x, K, h, seed, bool(central))
    return _native("rademacher_perturb", name, (x,), K, h, seed, bool(central))


def hutchinson_reduce(y_probes: torch.Tensor, y0: Optional[torch.Tensor], num_probes: int, h: float, seed: int,
                      central: bool = False, *, backend: str = "auto") -> torch.Tensor:
    """Per-sample Hutchinson trace from function values at the probe points.

    ``y_probes`` holds f at the rows of :func:`rademacher_perturb` (same num_probes, h, seed,
    central); ``y0`` holds f at the base points (required unless central). Returns, shape (B,),
    ``(1/K) sum_k v_k . (y_k - y0) / h``, or ``(1/K) sum_k v_k . (y_k+ - y_k-) / (2h)`` when central.
    The probes are regenerated from the seed, never stored.
    """
    _validate.tensor(y_probes, "y_probes")
    K = _validate.count(num_probes, "num_probes")
    h = _validate.positive(h, "h")
    seed = _validate.seed(seed)
    n = 2 * K if central else K
    if y_probes.shape[0] % n:
        raise ValueError(f"y_probes has {y_probes.shape[0]} rows, not a multiple of "
                         f"{'2 * ' if central else ''}num_probes = {n}")
    B = y_probes.shape[0] // n
    if y0 is None:
        if not central:
            raise ValueError("y0 is required for forward differences (central=False)")
    else:
        _validate.tensor(y0, "y0")
        want = (B, *y_probes.shape[1:])
        if tuple(y0.shape) != want:
            raise ValueError(f"y0 must have shape {want} (B = y_probes rows / {n}), got {tuple(y0.shape)}")
        if y0.dtype != y_probes.dtype:
            raise TypeError(f"y0 must have the dtype of y_probes ({y_probes.dtype}), got {y0.dtype}")
        if y0.device != y_probes.device:
            raise ValueError(f"y0 is on {y0.device} but y_probes is on {y_probes.device}")
    name = resolve(backend, y_probes.device)
    if name == "torch":
        return reference.hutchinson_reduce(y_probes, y0, K, h, seed, bool(central))
    return _native("hutchinson_reduce", name, (y_probes, y0), K, h, seed, bool(central))


def fd_direction(x: torch.Tensor, eps_uncond: torch.Tensor, eps_cond: torch.Tensor, h: float, *,
                 backend: str = "auto") -> torch.Tensor:
    """The finite-difference point of the sharpness metric: ``x + h (c - u) / ||c - u||`` per sample.

    A sample whose difference is exactly zero has no direction and is returned unshifted.
    """
    _validate.tensor(x, "x")
    _validate.like(eps_uncond, "eps_uncond", x, "x")
    _validate.like(eps_cond, "eps_cond", x, "x")
    h = _validate.positive(h, "h")
    name = resolve(backend, x.device)
    if name == "torch":
        return reference.fd_direction(x, eps_uncond, eps_cond, h)
    return _native("fd_direction", name, (x, eps_uncond, eps_cond), h)


def diff_of_diffs_norm(u0: torch.Tensor, c0: torch.Tensor, u1: torch.Tensor, c1: torch.Tensor, *,
                       backend: str = "auto") -> torch.Tensor:
    """``||(c1 - u1) - (c0 - u0)||_2`` per sample: the change of the guidance difference between two points."""
    _validate.tensor(u0, "u0")
    for t, n in ((c0, "c0"), (u1, "u1"), (c1, "c1")):
        _validate.like(t, n, u0, "u0")
    name = resolve(backend, u0.device)
    if name == "torch":
        return reference.diff_of_diffs_norm(u0, c0, u1, c1)
    return _native("diff_of_diffs_norm", name, (u0, c0, u1, c1))
