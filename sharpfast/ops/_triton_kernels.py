"""Triton backend of the fused ops: each kernel beside its launcher.

Imported lazily (only when the Triton backend is used). Runs on CUDA tensors, and on CPU
tensors under ``TRITON_INTERPRET=1`` (set before triton is first imported), which is how CI
tests it. Reductions write one float64 partial per (sample, block) and are summed in a fixed
order afterwards, so results are deterministic. The torch references are in ``reference.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _hash
from ._hash import seed_key

BLOCK = 1024
# Globals read inside @triton.jit code must be tl.constexpr (compiled Triton refuses any other
# global; the interpreter does not check). The values are _hash's, the one source of them.
MIX_C1 = tl.constexpr(_hash.MIX_C1)
MIX_C2 = tl.constexpr(_hash.MIX_C2)
WEYL = tl.constexpr(_hash.WEYL)
# Integer arguments equal to 1 are compile-time constants by default in compiled Triton; D and
# key0 are used as tensors (.to) and so are never specialized (do_not_specialize).
_poison = False  # test hook: outputs and partials start as NaN (see set_poison)


def set_poison(on: bool) -> None:
    global _poison
    _poison = bool(on)


def _new(shape, dtype, device) -> torch.Tensor:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if _poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * tl.full((), MIX_C1, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), MIX_C2, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _signs(key0, k, offs):
    """Rademacher signs (+1 / -1, float32) of probe k at flat element indices offs."""
    kkey = _mix32(key0.to(tl.uint32) + tl.cast(k, tl.uint32) * tl.full((), WEYL, tl.uint32))
    i = offs.to(tl.uint32)
    bits = (_mix32(_mix32(i >> 5) ^ kkey) >> (i & 31)) & 1
    return 1.0 - 2.0 * bits.to(tl.float32)


@triton.jit
def _cast_to(x, ptr):
    """x (fp32 / fp64) as ptr's element type, rounding to nearest even. bf16 is rounded by hand:
    the interpreter truncates fp32 -> bf16, the compiled path rounds, and this agrees with both."""
    if ptr.dtype.element_ty == tl.bfloat16:
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(x != x, (u >> 16) | 0x40, r)  # NaN stays NaN
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ptr.dtype.element_ty)


@triton.jit
def _row_block(D, nc, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // nc
    offs = (pid % nc) * BLOCK + tl.arange(0, BLOCK)
    return pid, row, offs, offs < D, row * D.to(tl.int64)


@triton.jit(do_not_specialize=["D"])
def _cfg_combine_kernel(u_ptr, c_ptr, g_ptr, part_ptr, D, nc, w, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid, row, offs, m, base = _row_block(D, nc, BLOCK)
    u = tl.load(u_ptr + base + offs, mask=m, other=0).to(ACC)
    d = tl.load(c_ptr + base + offs, mask=m, other=0).to(ACC) - u
    tl.store(g_ptr + base + offs, _cast_to(u + w * d, g_ptr), mask=m)
    tl.store(part_ptr + pid, tl.sum(d * d, axis=0).to(tl.float64))


@triton.jit(do_not_specialize=["D"])
def _sq_diff_kernel(u_ptr, c_ptr, part_ptr, D, nc, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid, row, offs, m, base = _row_block(D, nc, BLOCK)
    d = tl.load(c_ptr + base + offs, mask=m, other=0).to(ACC) - tl.load(u_ptr + base + offs, mask=m, other=0).to(ACC)
    tl.store(part_ptr + pid, tl.sum(d * d, axis=0).to(tl.float64))


@triton.jit(do_not_specialize=["D"])
def _dod_kernel(u0_ptr, c0_ptr, u1_ptr, c1_ptr, part_ptr, D, nc, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid, row, offs, m, base = _row_block(D, nc, BLOCK)
    p = base + offs
    d1 = tl.load(c1_ptr + p, mask=m, other=0).to(ACC) - tl.load(u1_ptr + p, mask=m, other=0).to(ACC)
    d0 = tl.load(c0_ptr + p, mask=m, other=0).to(ACC) - tl.load(u0_ptr + p, mask=m, other=0).to(ACC)
    r = d1 - d0
    tl.store(part_ptr + pid, tl.sum(r * r, axis=0).to(tl.float64))


@triton.jit(do_not_specialize=["D"])
def _shift_kernel(x_ptr, u_ptr, c_ptr, scale_ptr, out_ptr, D, nc, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid, row, offs, m, base = _row_block(D, nc, BLOCK)
    p = base + offs
    s = tl.load(scale_ptr + row).to(ACC)
    d = tl.load(c_ptr + p, mask=m, other=0).to(ACC) - tl.load(u_ptr + p, mask=m, other=0).to(ACC)
    x = tl.load(x_ptr + p, mask=m, other=0).to(ACC)
    tl.store(out_ptr + p, _cast_to(x + s * d, out_ptr), mask=m)


@triton.jit(do_not_specialize=["D", "key0"])
def _perturb_kernel(x_ptr, out_ptr, B, D, K, nc, h, key0, CENTRAL: tl.constexpr, ACC: tl.constexpr,
                    BLOCK: tl.constexpr):
    # program (k, block of elements): the signs are computed once and applied to every sample
    pid, k, offs, m, _ = _row_block(D, nc, BLOCK)
    D64 = D.to(tl.int64)
    hs = h * _signs(key0, k, offs).to(ACC)
    for b in range(B):
        x = tl.load(x_ptr + b * D64 + offs, mask=m, other=0).to(ACC)
        tl.store(out_ptr + (k * B + b) * D64 + offs, _cast_to(x + hs, out_ptr), mask=m)
        if CENTRAL:
            tl.store(out_ptr + ((K + k) * B + b) * D64 + offs, _cast_to(x - hs, out_ptr), mask=m)


@triton.jit(do_not_specialize=["D", "key0"])
def _hutchinson_kernel(y_ptr, y0_ptr, part_ptr, B, D, K, nc, key0, CENTRAL: tl.constexpr, ACC: tl.constexpr,
                       BLOCK: tl.constexpr):
    pid, b, offs, m, base = _row_block(D, nc, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=ACC)
    if not CENTRAL:
        y0 = tl.load(y0_ptr + base + offs, mask=m, other=0).to(ACC)
    D64 = D.to(tl.int64)
    for k in range(K):
        yk = tl.load(y_ptr + (k * B + b) * D64 + offs, mask=m, other=0).to(ACC)
        if CENTRAL:
            ref = tl.load(y_ptr + ((K + k) * B + b) * D64 + offs, mask=m, other=0).to(ACC)
        else:
            ref = y0
        acc += _signs(key0, k, offs).to(ACC) * (yk - ref)
    tl.store(part_ptr + pid, tl.sum(acc, axis=0).to(tl.float64))


# ---- launchers -----------------------------------------------------------------------

def _acc(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _acc_torch(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _geometry(t: torch.Tensor):
    B = t.shape[0]
    D = t.numel() // B
    return B, D, triton.cdiv(D, BLOCK)


def _row_sums(partial: torch.Tensor, B: int) -> torch.Tensor:
    return partial.view(B, -1).sum(dim=1)


def cfg_combine(u, c, w):
    B, D, nc = _geometry(u)
    guided = _new(u.shape, u.dtype, u.device)
    partial = _new(B * nc, torch.float64, u.device)
    _cfg_combine_kernel[(B * nc,)](u, c, guided, partial, D, nc, float(w), ACC=_acc(u), BLOCK=BLOCK)
    return guided, _row_sums(partial, B).sqrt().to(_acc_torch(u))


def rademacher_perturb(x, num_probes, h, seed, central=False):
    B, D, nc = _geometry(x)
    n = 2 * num_probes if central else num_probes
    out = _new((n * B, *x.shape[1:]), x.dtype, x.device)
    _perturb_kernel[(num_probes * nc,)](x, out, B, D, num_probes, nc, float(h), seed_key(seed), CENTRAL=central,
                                        ACC=_acc(x), BLOCK=BLOCK)
    return out


def hutchinson_reduce(y_probes, y0, num_probes, h, seed, central=False):
    n = 2 * num_probes if central else num_probes
    B = y_probes.shape[0] // n
    D = y_probes.numel() // y_probes.shape[0]
    nc = triton.cdiv(D, BLOCK)
    partial = _new(B * nc, torch.float64, y_probes.device)
    y0_arg = y_probes if y0 is None else y0  # not read when central
    _hutchinson_kernel[(B * nc,)](y_probes, y0_arg, partial, B, D, num_probes, nc, seed_key(seed), CENTRAL=central,
                                  ACC=_acc(y_probes), BLOCK=BLOCK)
    scale = 1.0 / (n * h)
    return (_row_sums(partial, B) * scale).to(_acc_torch(y_probes))


def fd_direction(x, u, c, h):
    B, D, nc = _geometry(x)
    partial = _new(B * nc, torch.float64, x.device)
    _sq_diff_kernel[(B * nc,)](u, c, partial, D, nc, ACC=_acc(x), BLOCK=BLOCK)
    sq = _row_sums(partial, B)
    scale = torch.where(sq > 0, h / sq.clamp_min(torch.finfo(torch.float64).tiny).sqrt(), torch.zeros_like(sq))
    out = _new(x.shape, x.dtype, x.device)
    _shift_kernel[(B * nc,)](x, u, c, scale, out, D, nc, ACC=_acc(x), BLOCK=BLOCK)
    return out


def diff_of_diffs_norm(u0, c0, u1, c1):
    B, D, nc = _geometry(u0)
    partial = _new(B * nc, torch.float64, u0.device)
    _dod_kernel[(B * nc,)](u0, c0, u1, c1, partial, D, nc, ACC=_acc(u0), BLOCK=BLOCK)
    return _row_sums(partial, B).sqrt().to(_acc_torch(u0))
