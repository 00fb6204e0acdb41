"""hutchinson_trace: exact for diagonal linear maps, unbiased for dense ones, one fn call."""
import pytest
import torch

from sharpfast import ops


def linear(A):
    def fn(x):
        flat = x.reshape(x.shape[0], -1).double()
        return (flat @ A.T).to(x.dtype).reshape(x.shape)

    return fn


@pytest.mark.parametrize("central", [False, True])
def test_exact_for_diagonal(backend, central):
    g = torch.Generator().manual_seed(0)
    D = 3 * 5 * 7
    diag = torch.randn(D, generator=g, dtype=torch.float64)
    x = torch.randn(4, 3, 5, 7, generator=g, dtype=torch.float64)
    est = ops.hutchinson_trace(linear(torch.diag(diag)), x, num_probes=2, h=0.5, seed=3, central=central,
                               backend=backend)
    assert est.shape == (4,)
    torch.testing.assert_close(est, torch.full((4,), diag.sum().item(), dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_unbiased_on_dense_symmetric(backend):
    g = torch.Generator().manual_seed(1)
    D = 24
    M = torch.randn(D, D, generator=g, dtype=torch.float64)
    A = (M + M.T) / 2
    x = torch.randn(1, D, generator=g, dtype=torch.float64)
    seeds = 400
    est = torch.stack([ops.hutchinson_trace(linear(A), x, 1, 1.0, seed=s, backend=backend)[0] for s in range(seeds)])
    se = est.std().item() / seeds**0.5
    assert se > 0
    assert abs(est.mean().item() - torch.trace(A).item()) < 4 * se


def test_one_call_of_fn_and_shapes(backend):
    calls = []

    def fn(x):
        calls.append(x.shape[0])
        return 2 * x

    x = torch.randn(3, 10, dtype=torch.float64)
    est = ops.hutchinson_trace(fn, x, num_probes=4, h=0.1, seed=0, backend=backend)
    assert calls == [3 + 4 * 3]
    torch.testing.assert_close(est, torch.full((3,), 20.0, dtype=torch.float64))
    calls.clear()
    ops.hutchinson_trace(fn, x, num_probes=4, h=0.1, seed=0, central=True, backend=backend)
    assert calls == [2 * 4 * 3]
    y0 = fn(x)
    calls.clear()
    est = ops.hutchinson_trace(fn, x, num_probes=4, h=0.1, seed=0, y0=y0, backend=backend)
    assert calls == [4 * 3], "with y0 given, only the probe points are evaluated"
    torch.testing.assert_close(est, torch.full((3,), 20.0, dtype=torch.float64))


def test_nonlinear_fd_matches_jacobian_trace(backend):
    # fn(x) = tanh(x) elementwise: tr J = sum(1 - tanh(x)^2); central differences are O(h^2)
    x = torch.randn(2, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    est = ops.hutchinson_trace(torch.tanh, x, num_probes=3, h=1e-4, seed=9, central=True, backend=backend)
    torch.testing.assert_close(est, (1 - torch.tanh(x) ** 2).sum(dim=1), rtol=1e-6, atol=1e-6)


def test_sample_estimate_independent_of_batch(backend):
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    A = torch.randn(12, 12, dtype=torch.float64)
    full = ops.hutchinson_trace(linear(A), x, 3, 0.5, seed=4, backend=backend)
    alone = ops.hutchinson_trace(linear(A), x[2:3], 3, 0.5, seed=4, backend=backend)
    torch.testing.assert_close(full[2:3], alone)


def test_fn_with_wrong_output_shape_is_rejected():
    with pytest.raises(ValueError, match="same shape"):
        ops.hutchinson_trace(lambda z: z[:1], torch.randn(2, 3), 2, 0.1)
    with pytest.raises(TypeError, match="callable"):
        ops.hutchinson_trace(None, torch.randn(2, 3), 2, 0.1)


def test_any_curvature_operator_gets_the_one_estimator():
    """A new operator is a CurvatureOperator with a matvec: the Hutchinson trace, matmat and the
    SciPy view come with it (Rademacher probes make a diagonal operator's trace exact)."""
    from sharpfast.curvature import CurvatureOperator

    class Diagonal(CurvatureOperator):
        def __init__(self, d):
            self.d, self.shape, self.device = d, tuple(d.shape), d.device

        def matvec(self, v):
            return self.d * v

    d = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(Diagonal(d).trace(num_probes=2, seed=1), d.flatten(1).sum(dim=1))
    one = Diagonal(d[:1]).to_scipy()
    assert one.shape == (10, 10)
