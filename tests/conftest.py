import os

# The Triton backend runs on CPU tensors only under the interpreter, which must be chosen
# before triton is first imported: conftest is loaded before any test module.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from sharpfast.ops import available_backends  # noqa: E402

NATIVE_CPU = [b for b in available_backends() if b in ("cpp", "triton")]
ALL_CPU = ["torch"] + NATIVE_CPU
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# awkward sizes: a single element, odd row lengths, rows just over a kernel block / chunk
SHAPES = [(1, 1), (3, 4, 5, 7), (2, 1025), (5, 4097), (2, 4, 33, 31)]


@pytest.fixture(params=NATIVE_CPU)
def native(request):
    return request.param


@pytest.fixture(params=ALL_CPU)
def backend(request):
    return request.param


def randn(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
