"""Gradients of every backend (gradcheck in float64), torch.library.opcheck of the custom
operators, and torch.compile(fullgraph=True) through them without graph breaks."""
import pytest
import torch

from sharpfast import ops
from sharpfast.ops import _custom


def f64(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)


CASES = {
    "cfg_combine": (lambda be: (lambda u, c: ops.cfg_combine(u, c, 4.0, backend=be)), 2),
    "rademacher_perturb": (lambda be: (lambda x: ops.rademacher_perturb(x, 2, 0.3, 5, True, backend=be)), 1),
    "hutchinson_reduce": (lambda be: (lambda y, y0: ops.hutchinson_reduce(y, y0, 2, 0.3, 5, backend=be)), None),
    "fd_direction": (lambda be: (lambda x, u, c: ops.fd_direction(x, u, c, 0.4, backend=be)), 3),
    "diff_of_diffs_norm": (lambda be: (lambda a, b, c, d: ops.diff_of_diffs_norm(a, b, c, d, backend=be)), 4),
}


@pytest.mark.parametrize("op", list(CASES))
def test_gradcheck(backend, op):
    make, n_inputs = CASES[op]
    if op == "hutchinson_reduce":
        inputs = (f64(2 * 3, 2, 5, seed=1), f64(3, 2, 5, seed=2))
    else:
        inputs = tuple(f64(3, 2, 5, seed=i) for i in range(n_inputs))
    assert torch.autograd.gradcheck(make(backend), inputs, eps=1e-6, atol=1e-6)


def test_gradcheck_central_hutchinson(backend):
    fn = lambda y: ops.hutchinson_reduce(y, None, 2, 0.3, 5, central=True, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (f64(4 * 3, 7),))


def _opcheck_args():
    x = torch.randn(3, 2, 5)
    u, c = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    y = torch.randn(6, 2, 5)
    return {
        _custom.cfg_combine: (u, c, 3.0),
        _custom.rademacher_perturb: (x, 2, 0.1, 3, True),
        _custom.hutchinson_reduce: (y, x, 2, 0.1, 3, False),
        _custom.fd_direction: (x, u, c, 0.2),
        _custom.diff_of_diffs_norm: (u, c, x, y[:3]),
    }


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(native, requires_grad):
    for op, args in _opcheck_args().items():
        args = tuple(a.clone().requires_grad_(requires_grad) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args + (native,))


def test_compile_fullgraph(native):
    if native == "triton":
        pytest.skip("the Triton interpreter is not traceable by dynamo; covered by the GPU check")

    def step(u, c, x):
        guided, wen = ops.cfg_combine(u, c, 7.5, backend=native)
        shifted = ops.fd_direction(x, u, c, 0.01, backend=native)
        probes = ops.rademacher_perturb(x, 2, 0.1, 0, backend=native)
        return guided, wen, shifted, probes

    u, c, x = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(u, c, x), step(u, c, x)):
        torch.testing.assert_close(got, want)
