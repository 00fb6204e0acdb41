"""The Rademacher probes: one pure function of (seed, k, i), identical on every backend."""
import pytest
import torch
from conftest import ALL_CPU

from sharpfast import ops
from sharpfast.ops import _hash


def signs_via(backend, K, shape, seed):
    # x = 0, h = 1: the probe batch is the signs themselves
    x = torch.zeros(shape)
    return ops.rademacher_perturb(x, K, 1.0, seed, backend=backend).reshape(K, shape[0], -1)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**40 + 7, 2**63 - 1])
def test_identical_signs_on_every_backend(seed):
    K, shape = 5, (3, 4, 7, 9)
    expected = ops.rademacher_signs(K, 4 * 7 * 9, seed)
    for backend in ALL_CPU:
        got = signs_via(backend, K, shape, seed)
        for b in range(shape[0]):
            assert torch.equal(got[:, b], expected), f"{backend} seed {seed} sample {b}"


def test_different_seeds_and_probes_differ():
    a = ops.rademacher_signs(4, 4096, 1)
    b = ops.rademacher_signs(4, 4096, 2)
    c = ops.rademacher_signs(4, 4096, 2**32 + 1)  # same low 32 bits as seed 1
    for other in (b, c):
        agree = (a == other).float().mean().item()
        assert 0.45 < agree < 0.55, "independent probes agree on about half the elements"
    for k in range(1, 4):
        assert 0.45 < (a[0] == a[k]).float().mean().item() < 0.55


def test_signs_are_balanced_and_uncorrelated():
    v = ops.rademacher_signs(64, 4096, 7, dtype=torch.float64)
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    n = v.numel()
    assert abs(v.mean().item()) < 4 / n**0.5  # mean 0 within 4 standard errors
    lag1 = (v[:, 1:] * v[:, :-1]).mean().item()
    assert abs(lag1) < 4 / n**0.5


def test_python_and_tensor_hash_agree():
    xs = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 123456789]
    t = _hash.mix32_tensor(torch.tensor(xs, dtype=torch.int64))
    assert t.tolist() == [_hash.mix32(x) for x in xs]
    # known values of the mix function (computed with uint32 arithmetic by hand-checked C)
    assert _hash.mix32(0) == 0
    assert all(0 <= v < 2**32 for v in t.tolist())
