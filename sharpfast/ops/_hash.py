"""The Rademacher sign of element i of probe k: a pure function of (seed, k, i).

This is the Python twin of ``kernels/sf_common.h`` (used by the C++ and CUDA backends); the
Triton kernels call :func:`sharpfast.ops._triton_kernels` versions written from the same
constants. ``tests/test_ops_signs.py`` checks that all of them agree bit for bit.

Signs come 32 at a time: bit (i % 32) of mix32(mix32(i // 32) ^ probe_key(k)) is the sign of
element i (a set bit means -1). Element index i is the flat index inside ONE sample, so every
sample of a batch sees the same probe and a sample's estimate does not depend on the batch it was in.
"""
from __future__ import annotations

from typing import Any

import torch

MASK32 = 0xFFFFFFFF
MIX_C1 = 0x7FEB352D
MIX_C2 = 0x846CA68B
WEYL = 0x9E3779B9
MAX_SEED = 2**63 - 1


def mix32(x: int) -> int:
    """32-bit avalanche hash of a Python int in [0, 2**32)."""
    x ^= x >> 16
    x = (x * MIX_C1) & MASK32
    x ^= x >> 15
    x = (x * MIX_C2) & MASK32
    x ^= x >> 16
    return x


def seed_key(seed: int) -> int:
    return mix32((seed >> 32 & MASK32) ^ mix32(seed & MASK32))


def probe_key(key0: int, k: int) -> int:
    return mix32((key0 + k * WEYL) & MASK32)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # x * c mod 2**32 for int64 tensors holding values in [0, 2**32), without int64 overflow
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def mix32_tensor(x: torch.Tensor) -> torch.Tensor:
    """:func:`mix32` elementwise on an int64 tensor of values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_C1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_C2)
    return x ^ (x >> 16)


def rademacher_signs(num_probes: int, numel: int, seed: int, device: Any = None,
                     dtype: Any = torch.float32) -> torch.Tensor:
    """Signs (+1 / -1) of probes 0..num_probes-1 on elements 0..numel-1, shape (num_probes, numel)."""
    key0 = seed_key(seed)
    keys = torch.tensor([probe_key(key0, k) for k in range(num_probes)], dtype=torch.int64, device=device)
    i = torch.arange(numel, dtype=torch.int64, device=device)
    words = mix32_tensor(mix32_tensor(i >> 5)[None, :] ^ keys[:, None])  # one hash per 32 elements
    bits = (words >> (i & 31)[None, :]) & 1
    return (1 - 2 * bits).to(dtype)
