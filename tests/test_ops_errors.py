"""Bad input gets an error that names the argument; nothing passed in is modified."""
import math

import pytest
import torch

from sharpfast import ops


def x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def test_mismatched_shapes(backend):
    with pytest.raises(ValueError, match="eps_cond must have the shape of eps_uncond"):
        ops.cfg_combine(x(2, 3), x(2, 4), 7.5, backend=backend)
    with pytest.raises(ValueError, match="eps_cond must have the shape of x"):
        ops.fd_direction(x(2, 3), x(2, 3), x(3, 3), 0.1, backend=backend)
    with pytest.raises(ValueError, match="c1 must have the shape of u0"):
        ops.diff_of_diffs_norm(x(2, 3), x(2, 3), x(2, 3), x(2, 5), backend=backend)
    with pytest.raises(ValueError, match="not a multiple of"):
        ops.hutchinson_reduce(x(7, 3), x(2, 3), 3, 0.1, 0, backend=backend)
    with pytest.raises(ValueError, match="y0 must have shape"):
        ops.hutchinson_reduce(x(6, 3), x(2, 4), 3, 0.1, 0, backend=backend)
    with pytest.raises(ValueError, match="y0 is required"):
        ops.hutchinson_reduce(x(6, 3), None, 3, 0.1, 0, backend=backend)


def test_dtypes(backend):
    with pytest.raises(TypeError, match="eps_uncond must be float32, float16, bfloat16 or float64"):
        ops.cfg_combine(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64), 1.0, backend=backend)
    with pytest.raises(TypeError, match="eps_cond must have the dtype of eps_uncond"):
        ops.cfg_combine(x(2, 3), x(2, 3, dtype=torch.float16), 1.0, backend=backend)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.rademacher_perturb([1.0, 2.0], 2, 0.1, 0, backend=backend)
    with pytest.raises(TypeError, match="y0 must have the dtype of y_probes"):
        ops.hutchinson_reduce(x(4, 3), x(2, 3, dtype=torch.float64), 2, 0.1, 0, backend=backend)


def test_scalars(backend):
    for bad in (0, -1):
        with pytest.raises(ValueError, match="num_probes must be positive"):
            ops.rademacher_perturb(x(2, 3), bad, 0.1, 0, backend=backend)
    with pytest.raises(TypeError, match="num_probes must be an int"):
        ops.rademacher_perturb(x(2, 3), 2.5, 0.1, 0, backend=backend)
    for bad in (0.0, -0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="h must be"):
            ops.rademacher_perturb(x(2, 3), 2, bad, 0, backend=backend)
        with pytest.raises(ValueError, match="h must be"):
            ops.fd_direction(x(2, 3), x(2, 3), x(2, 3), bad, backend=backend)
    for bad in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match="guidance_scale must be finite"):
            ops.cfg_combine(x(2, 3), x(2, 3), bad, backend=backend)
    with pytest.raises(TypeError, match="guidance_scale must be a real number"):
        ops.cfg_combine(x(2, 3), x(2, 3), "7.5", backend=backend)
    for bad in (-1, 2**63):
        with pytest.raises(ValueError, match="seed must be in"):
            ops.rademacher_perturb(x(2, 3), 2, 0.1, bad, backend=backend)


def test_empty_batches(backend):
    with pytest.raises(ValueError, match="eps_uncond must be a non-empty batch"):
        ops.cfg_combine(x(0, 3), x(0, 3), 1.0, backend=backend)
    with pytest.raises(ValueError, match="x must be a non-empty batch"):
        ops.rademacher_perturb(torch.tensor(1.0), 2, 0.1, 0, backend=backend)


def test_backend_names_and_devices():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.cfg_combine(x(2, 3), x(2, 3), 1.0, backend="cuDNN")
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, ValueError), match="backend='cuda'"):
            ops.cfg_combine(x(2, 3), x(2, 3), 1.0, backend="cuda")
    assert "torch" in ops.available_backends()
    if torch.backends.mps.is_available() is False and "cpp" in ops.available_backends():
        meta = torch.empty(2, 3, device="meta")
        with pytest.raises(ValueError, match="backend='cpp' runs on CPU tensors"):
            ops.cfg_combine(meta, meta, 1.0, backend="cpp")


def test_inputs_are_not_modified(backend):
    u, c, xx = x(3, 4, 5), x(3, 4, 5), x(3, 4, 5)
    copies = [t.clone() for t in (u, c, xx)]
    ops.cfg_combine(u, c, 7.5, backend=backend)
    ops.fd_direction(xx, u, c, 0.1, backend=backend)
    probes = ops.rademacher_perturb(xx, 2, 0.1, 0, backend=backend)
    ops.hutchinson_reduce(probes, xx, 2, 0.1, 0, backend=backend)
    ops.diff_of_diffs_norm(u, c, xx, u, backend=backend)
    for t, saved in zip((u, c, xx), copies):
        assert torch.equal(t, saved)


def test_native_extension_checks_named_arguments():
    """The C++ host code checks shapes itself when called directly."""
    from sharpfast.ops import _backends

    ext = _backends.cpp_module()
    if ext is None:
        pytest.skip("C++ extension not built")
    with pytest.raises(ValueError, match="eps_cond must have the shape of eps_uncond"):
        ext.cfg_combine(x(2, 3), x(2, 4), 1.0)
    with pytest.raises(ValueError, match="num_probes must be positive"):
        ext.rademacher_perturb(x(2, 3), 0, 0.1, 0, False)
    with pytest.raises(ValueError, match="x must be contiguous"):
        ext.rademacher_perturb(x(3, 2).t(), 1, 0.1, 0, False)
    with pytest.raises(TypeError, match="x must be float32"):
        ext.rademacher_perturb(torch.ones(2, 3, dtype=torch.int32), 1, 0.1, 0, False)
