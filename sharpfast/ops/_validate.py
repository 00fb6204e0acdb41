"""Argument checks of the public ops: errors that name the argument and the problem."""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from ._hash import MAX_SEED

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(t: Any, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if t.dim() < 1 or t.shape[0] == 0 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty batch (B, ...) with B >= 1, got shape {tuple(t.shape)}")
    return t


def like(t: Any, name: str, ref: torch.Tensor, ref_name: str) -> torch.Tensor:
    tensor(t, name)
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    return t


def _real(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def finite(v: Any, name: str) -> float:
    return _real(v, name)


def positive(v: Any, name: str) -> float:
    v = _real(v, name)
    if v <= 0:
        raise ValueError(f"{name} must be positive, got {v}")
    return v


def count(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v <= 0:
        raise ValueError(f"{name} must be positive, got {v}")
    return int(v)


def seed(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(v).__name__}")
    v = int(v)
    if not 0 <= v <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63), got {v}")
    return int(v)
