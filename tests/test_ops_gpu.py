"""The CUDA and Triton backends on a GPU: float64 accuracy with NaN-poisoned outputs, probes
identical to the CPU's, opcheck, and CUDA-graph capture. Skipped without a GPU (CI); run by
benchmarks/gpu_check.sh on a lent one."""
import pytest
import torch
from conftest import DTYPES, SHAPES, randn
from test_ops_accuracy import check, fresh_seed, three_ways

from sharpfast import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_BACKENDS = [b for b in ("cuda", "triton") if torch.cuda.is_available() and b in ops.available_backends()]
GPU_SHAPES = SHAPES + [(8, 4, 64, 64), (3, 4, 127, 129)]


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request):
    return request.param


def cuda_randn(shape, dtype, seed):
    return randn(shape, dtype, seed).cuda()


def test_both_gpu_backends_are_available():
    assert set(GPU_BACKENDS) == {"cuda", "triton"}, ops.available_backends()


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_all_ops_against_float64(gpu_backend, dtype, shape):
    s = fresh_seed()
    u, c, x, u1 = (cuda_randn(shape, dtype, s + i) for i in range(4))
    what = f"{gpu_backend} {dtype} {shape}"
    check(*three_ways(ops.cfg_combine, gpu_backend, (u, c), guidance_scale=7.5), "cfg_combine " + what)
    check(*three_ways(ops.fd_direction, gpu_backend, (x, u, c), h=0.3), "fd_direction " + what)
    check(*three_ways(ops.diff_of_diffs_norm, gpu_backend, (u, c, u1, x)), "diff_of_diffs_norm " + what)
    for central in (False, True):
        K, h, seed = 3, 0.25, fresh_seed()
        kw = dict(num_probes=K, h=h, seed=seed, central=central)
        outs, refs, truths = three_ways(ops.rademacher_perturb, gpu_backend, (x,), **kw)
        check(outs, refs, truths, "rademacher_perturb " + what)
        assert torch.equal(outs[0], refs[0])
        n = 2 * K if central else K
        y = cuda_randn((n * shape[0], *shape[1:]), dtype, s + 9)

        def reduce(y, y0=None, *, backend):
            return ops.hutchinson_reduce(y, y0, K, h, seed, central, backend=backend)

        rows = y.double().reshape(n, *shape)
        terms = (rows[:K] - (rows[K:] if central else x.double()[None])).abs()
        magnitude = terms.reshape(K, shape[0], -1).sum(dim=(0, 2)).max().item() / (n * h)
        check(*three_ways(reduce, gpu_backend, (y,) if central else (y, x)), "hutchinson_reduce " + what, magnitude)


def test_probes_identical_to_cpu(gpu_backend):
    for seed in (0, 7, 2**40 + 3):
        x = torch.zeros(2, 4, 33, 31)
        cpu = ops.rademacher_perturb(x, 4, 1.0, seed, backend="torch")
        gpu = ops.rademacher_perturb(x.cuda(), 4, 1.0, seed, backend=gpu_backend)
        assert torch.equal(gpu.cpu(), cpu)


def test_opcheck_on_gpu(gpu_backend):
    from test_ops_autograd import _opcheck_args

    for op, args in _opcheck_args().items():
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args + (gpu_backend,))


def test_cuda_graph_capture(gpu_backend):
    u, c, x = (cuda_randn((8, 4, 64, 64), torch.float16, i) for i in range(3))

    def step():
        g, n = ops.cfg_combine(u, c, 7.5, backend=gpu_backend)
        p = ops.rademacher_perturb(x, 2, 0.1, 3, backend=gpu_backend)
        t = ops.hutchinson_reduce(p, x, 2, 0.1, 3, backend=gpu_backend)
        return g, n, ops.fd_direction(x, u, c, 0.1, backend=gpu_backend), t

    eager = step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up (Triton compiles) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


def test_compile_fullgraph_on_gpu(gpu_backend):
    u, c = cuda_randn((2, 4, 8, 8), torch.float32, 0), cuda_randn((2, 4, 8, 8), torch.float32, 1)
    fn = lambda u, c: ops.cfg_combine(u, c, 7.5, backend=gpu_backend)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    for a, b in zip(compiled(u, c), fn(u, c)):
        torch.testing.assert_close(a, b)
