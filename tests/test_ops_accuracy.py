"""Every backend against a float64 reference, on fresh random inputs of awkward shapes.

Tolerance (the flash-attention rule): a backend's error against the float64 truth may be at
most twice the error of the torch reference run in the same dtype, plus a few ulps of the
output scale. Outputs are poisoned with NaN before each native run.
"""

import pytest
import torch
from conftest import DTYPES, SHAPES, randn

from sharpfast import ops
from sharpfast.ops import _backends, reference

ULPS = {torch.float32: 4 * 2.0**-23, torch.float16: 2 * 2.0**-10, torch.bfloat16: 2 * 2.0**-7,
        torch.float64: 4 * 2.0**-52}


def fresh_seed():
    """A new seed per test run, printed (pytest shows it with a failure; SHARPFAST_TEST_SEED replays it)."""
    from helpers import fresh_seed as named

    return named("ops accuracy")


def run(fn, backend, *args, **kw):
    with _backends.poisoned_outputs():
        out = fn(*args, backend=backend, **kw)
    return out if isinstance(out, tuple) else (out,)


def check(outs, refs, truths, what, magnitude=0.0):
    """outs: backend in dtype; refs: torch reference in dtype; truths: torch reference in fp64.
    magnitude: size of the summed terms when a reduction cancels (its rounding scale)."""
    for o, r, t in zip(outs, refs, truths):
        assert not torch.isnan(o).any(), f"{what}: an element was not written (NaN poison survived)"
        assert o.shape == r.shape and o.dtype == r.dtype, what
        err = (o.double() - t).abs().max().item()
        ref_err = (r.double() - t).abs().max().item()
        scale = max(t.abs().max().item(), magnitude) + 1e-30
        ulp = ULPS[o.dtype] if o.dtype in ULPS else ULPS[torch.float32]
        assert err <= 2 * ref_err + ulp * scale, f"{what}: error {err:.3g} vs reference's own {ref_err:.3g}"


def three_ways(fn, backend, tensors, **kw):
    outs = run(fn, backend, *tensors, **kw)
    refs = run(fn, "torch", *tensors, **kw)
    truths = run(fn, "torch", *[t.double() for t in tensors], **kw)
    return outs, refs, truths


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_cfg_combine(native, dtype, shape):
    s = fresh_seed()
    u, c = randn(shape, dtype, s), randn(shape, dtype, s + 1)
    w = 7.5
    # u + w (c - u) cancels where c - u ~ -u / w: the rounding scale is the terms'
    magnitude = (u.double().abs() + w * (c.double() - u.double()).abs()).max().item()
    check(*three_ways(ops.cfg_combine, native, (u, c), guidance_scale=w), f"cfg_combine {native} {dtype} {shape} "
          f"seed {s}", magnitude)


@pytest.mark.parametrize("central", [False, True])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_rademacher_perturb(native, dtype, shape, central):
    x = randn(shape, dtype, fresh_seed())
    kw = dict(num_probes=3, h=0.37, seed=fresh_seed(), central=central)
    outs, refs, truths = three_ways(ops.rademacher_perturb, native, (x,), **kw)
    check(outs, refs, truths, f"perturb {native} {dtype}")
    assert torch.equal(outs[0], refs[0]), "same rounding as the reference: x + h v in fp32, then cast"


@pytest.mark.parametrize("central", [False, True])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_hutchinson_reduce(native, dtype, shape, central):
    K, h, seed = 3, 0.25, fresh_seed()
    n = 2 * K if central else K
    y = randn((n * shape[0], *shape[1:]), dtype, fresh_seed())
    y0 = None if central else randn(shape, dtype, fresh_seed())
    tensors = (y,) if central else (y, y0)

    def fn(y, y0=None, *, backend):
        return ops.hutchinson_reduce(y, y0, K, h, seed, central, backend=backend)

    rows = y.double().reshape(n, *shape)
    terms = (rows[:K] - (rows[K:] if central else y0.double()[None])).abs()
    magnitude = terms.reshape(K, shape[0], -1).sum(dim=(0, 2)).max().item() / (n * h)
    check(*three_ways(fn, native, tensors), f"hutchinson_reduce {native} {dtype} {shape}", magnitude)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_fd_direction(native, dtype, shape):
    s = fresh_seed()
    x, u, c = randn(shape, dtype, s), randn(shape, dtype, s + 1), randn(shape, dtype, s + 2)
    # x + h d/||d|| can cancel (x near -h d/||d||): the rounding scale is the terms', not the result's
    # (seen: shape (1, 1), fp64, a result of 0.026 from terms of 0.3 had 20 ulps of the result)
    magnitude = x.double().abs().max().item() + 0.3
    check(*three_ways(ops.fd_direction, native, (x, u, c), h=0.3), f"fd_direction {native} {dtype} seed {s}",
          magnitude)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_diff_of_diffs_norm(native, dtype, shape):
    s = fresh_seed()
    ts = tuple(randn(shape, dtype, s + i) for i in range(4))
    # (c2 - u2) - (c - u) cancels: the rounding scale is the terms' (per element, summed in the norm)
    rows = ts[0].shape[0]
    magnitude = torch.stack([t.double().reshape(rows, -1) for t in ts]).abs().sum(0).norm(dim=1).max().item()
    check(*three_ways(ops.diff_of_diffs_norm, native, ts), f"diff_of_diffs_norm {native} {dtype} seed {s}",
          magnitude)


def test_reference_formulas_in_float64():
    """The torch reference itself against the formulas written out with plain float64 math."""
    u, c, x = (randn((3, 2, 5), torch.float64, i) for i in range(3))
    g, n = reference.cfg_combine(u, c, 3.0)
    torch.testing.assert_close(g, u + 3.0 * (c - u))
    torch.testing.assert_close(n, torch.stack([(c[b] - u[b]).pow(2).sum().sqrt() for b in range(3)]))
    shifted = reference.fd_direction(x, u, c, 0.5)
    for b in range(3):
        d = c[b] - u[b]
        torch.testing.assert_close(shifted[b], x[b] + 0.5 * d / d.norm())
    v = ops.rademacher_signs(2, 10, 5, dtype=torch.float64)
    p = reference.rademacher_perturb(x, 2, 0.1, 5)
    torch.testing.assert_close(p[1 * 3 + 2], x[2] + 0.1 * v[1].reshape(2, 5))


def test_zero_difference_has_no_direction(backend):
    x, u = randn((2, 9), torch.float32, 0), randn((2, 9), torch.float32, 1)
    c = u.clone()
    c[1] += 1.0
    out = ops.fd_direction(x, u, c, 0.5, backend=backend)
    assert torch.equal(out[0], x[0]), "row with c == u must stay unshifted (no NaN)"
    torch.testing.assert_close(out[1], x[1] + 0.5 / 3.0)


def test_non_contiguous_inputs(backend):
    base = randn((4, 6, 8), torch.float32, 3)
    u = base.transpose(1, 2)  # non-contiguous view
    c = randn((4, 8, 6), torch.float32, 4)
    g, n = ops.cfg_combine(u, c, 2.0, backend=backend)
    g_ref, n_ref = reference.cfg_combine(u.contiguous(), c, 2.0)
    torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(n, n_ref)
    assert torch.equal(base, randn((4, 6, 8), torch.float32, 3)), "inputs must not be modified"


def test_thread_count_does_not_change_results():
    if "cpp" not in ops.available_backends():
        pytest.skip("C++ extension not built")
    y = randn((3 * 2, 4, 33, 31), torch.float32, 7)
    y0 = randn((2, 4, 33, 31), torch.float32, 8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.hutchinson_reduce(y, y0, 3, 0.1, 1, backend="cpp")
    finally:
        torch.set_num_threads(before)
    many = ops.hutchinson_reduce(y, y0, 3, 0.1, 1, backend="cpp")
    assert torch.equal(one, many)


def test_every_float16_value_round_trips(native):
    """fp16 -> fp32 -> fp16 is exact for all 65536 bit patterns (subnormals, inf, NaN)."""
    u = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16).reshape(256, 256)
    zero = torch.zeros_like(u)
    g, _ = ops.cfg_combine(zero, u, 1.0, backend=native)  # 0 + 1 * (u - 0): u, with -0 -> +0
    want = (zero.float() + 1.0 * (u.float() - zero.float())).half()
    nan = torch.isnan(u)
    assert torch.equal(torch.isnan(g), nan)
    assert torch.equal(g[~nan].view(torch.int16), want[~nan].view(torch.int16))
    assert torch.equal(g[~nan & (u != 0)], u[~nan & (u != 0)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rounding_to_16_bits_matches_torch(native, dtype):
    """fp32 -> fp16/bf16 rounding (ties to even, subnormals, overflow) bit for bit as torch."""
    g = torch.Generator().manual_seed(fresh_seed())
    exps = torch.randint(-30, 14, (64, 512), generator=g).double()  # subnormal to near the fp16 maximum
    u = (torch.randn(64, 512, generator=g, dtype=torch.float64) * 2.0**exps).to(dtype)
    c = (torch.randn(64, 512, generator=g, dtype=torch.float64) * 2.0**exps).to(dtype)
    got, _ = ops.cfg_combine(u, c, 0.37, backend=native)
    want = (u.float() + 0.37 * (c.float() - u.float())).to(dtype)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
